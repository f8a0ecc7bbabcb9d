"""Training checkpoints: everything an exact resume needs.

Written by :func:`save_checkpoint` under a checkpoint root (:mod:`megakd.formats.checkpoints`)
as ``iter_%07d`` and read by :func:`load_checkpoint`: student weights, optimizer state (plain
or distributed), LR scheduler, per-rank RNG states, iteration and consumed samples. Never the
teacher. Writes are staged and the tracker moves last, so a crash at any point leaves the
previous checkpoint as the one that loads. Details: docs/checkpoints.md.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megakd.formats.checkpoints import (
    RELEASE,
    CheckpointError,
    checkpoint_name,
    holds_checkpoint,
    is_checkpoint_dir,
    load_model_states,
    load_common,
    load_sharded,
    model_sharded_state,
    remove_staging_dirs,
    resolve_checkpoint_dir,
    save_staged,
    unwrap,
    write_tracker,
)
from megakd.formats.model_metadata import model_metadata
from megakd.distill import is_projection_key
from megakd.runtime import processes, watchdog
from megakd.training.nonfinite import check_finite_state
from megakd.training.state import TrainingState


# Common (rank 0) entry: iteration, consumed samples, LR scheduler, parallel layout.
TRAINING_STATE_KEY = "megakd_training"
OPTIMIZER_KEY = "optimizer"
RNG_STATE_KEY = "rng_state"
SOURCE_STATE_KEY = "microbatch_source"  # e.g. DistiLLM's replay buffer and schedule
# The distributed optimizer's state as its flat per-bucket shards (Megatron-LM's default): every
# rank writes and reads its own shard with no gather, and a resume may change the DP size but
# not TP/PP. (megatron-core 0.16's layout-free formats fail with torch's Adam: the model-space
# one is unsupported, "fully_reshardable" cannot restore Adam's per-parameter step.)
DISTRIBUTED_OPTIMIZER_SHARDING = "dp_reshardable"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored, for the log line and for tests."""

    directory: str
    iteration: int
    consumed_samples: int
    weights_only: bool  # release / weights-only directory / --finetune: a fresh start
    optimizer: bool
    rng: bool


def _parallel_layout() -> Dict[str, int]:
    from megatron.core import parallel_state

    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }


def _rng_sharded_object(data: Optional[dict]):
    """This rank's RNG states as a ShardedObject: one object per (PP, TP, DP) coordinate."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    layout = _parallel_layout()
    shape = (layout["pipeline_model_parallel_size"], layout["tensor_model_parallel_size"],
             layout["data_parallel_size"])
    offset = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank())
    return ShardedObject(RNG_STATE_KEY, data, shape, offset, replica_id=0)


def _source_sharded_object(data: Optional[dict]):
    """The microbatch source's state as a ShardedObject: one object per DP replica (its TP/PP
    ranks hold the same state, only the first of them writes it)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    replica = (parallel_state.get_pipeline_model_parallel_rank()
               * parallel_state.get_tensor_model_parallel_world_size()
               + parallel_state.get_tensor_model_parallel_rank())
    return ShardedObject(SOURCE_STATE_KEY, data, (parallel_state.get_data_parallel_world_size(),),
                         (parallel_state.get_data_parallel_rank(),), replica_id=replica)


def get_rng_state(device: torch.device) -> dict:
    """Python, NumPy, torch CPU (+ CUDA on a GPU) and megatron's model-parallel RNG tracker,
    as tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
    from megatron.core import tensor_parallel

    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {
        "random": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "tracker": {name: value.clone() for name, value in
                    tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Inverse of :func:`get_rng_state`."""
    from megatron.core import tensor_parallel

    numpy_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    random.setstate(state["random"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {name: value.clone() for name, value in state["tracker"].items()})


def _optimizer_metadata(distributed_sharding: Optional[str]) -> dict:
    """``sharded_state_dict`` metadata: the distributed optimizer's format (None: plain)."""
    return {} if distributed_sharding is None else {"distrib_optim_sharding_type":
                                                    distributed_sharding}


def _prepare_fresh_optimizer_state(optimizer) -> None:
    """Give every parameter an Adam state (zeros, step 0) before loading into a fresh optimizer.

    The distributed optimizer's ``sharded_state_dict`` reads the inner optimizer's common
    ``step``, which torch's Adam creates only at its first step; megatron's own init function
    (used for the plain optimizer) sets the moments but not the step.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = inner.optimizer
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                slot = torch_optimizer.state[param]
                if "step" not in slot:
                    slot["step"] = torch.zeros((), dtype=torch.float32)
                    slot.setdefault("exp_avg", torch.zeros_like(param.data))
                    slot.setdefault("exp_avg_sq", torch.zeros_like(param.data))


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor, equal to the restored step.

    With torch's Adam (no Apex/TE), megatron's distributed optimizer restores the common step
    into its param groups and one ``step`` tensor shared by all parameters (whose value the
    per-parameter state copy can then overwrite); torch's Adam increments each parameter's
    step in place, so a shared tensor would advance once per parameter per iteration.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = inner.optimizer
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                slot = torch_optimizer.state.get(param)
                if not slot or not torch.is_tensor(slot.get("step")):
                    continue
                step = group["step"] if "step" in group else slot["step"].item()
                slot["step"] = torch.full_like(slot["step"], float(step))


def _load_scheduler(scheduler, saved: dict, load: str) -> None:
    """Restore the LR schedule; a schedule that differs from the flags' (e.g. another
    --global-batch-size or --lr-decay-iters) fails with the flags that resolve it."""
    try:
        scheduler.load_state_dict(saved)
    except AssertionError as error:
        raise CheckpointError(
            f"--load {load}: the checkpoint's LR schedule differs from the flags ({error}); "
            "pass --override-opt_param-scheduler to use the flags' schedule or "
            "--use-checkpoint-opt_param-scheduler to keep the checkpoint's") from None


def save_checkpoint(state: TrainingState, root: str, log: Callable[[str], None] = print) -> str:
    """Collective: write the student's full training state to ``root/iter_%07d`` and point the
    root's tracker at it. Returns the checkpoint directory."""
    config = state.config
    rank = torch.distributed.get_rank()
    check_finite_state(state.student, state.optimizer, state.runtime.device)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        remove_staging_dirs(root)  # interrupted earlier saves
    torch.distributed.barrier()

    model_state = model_sharded_state(state.student)
    sharded_state = dict(model_state)
    use_distributed = config.parallel.use_distributed_optimizer
    sharding = DISTRIBUTED_OPTIMIZER_SHARDING if use_distributed else None
    sharded_state[OPTIMIZER_KEY] = state.optimizer.sharded_state_dict(
        model_state, is_loading=False, metadata=_optimizer_metadata(sharding))
    sharded_state[RNG_STATE_KEY] = _rng_sharded_object(get_rng_state(state.runtime.device))
    source_state = state.source.state_dict()
    if source_state:
        sharded_state[SOURCE_STATE_KEY] = _source_sharded_object(source_state)
    sharded_state[TRAINING_STATE_KEY] = {
        "iteration": state.iteration,
        "consumed_samples": state.consumed_samples,
        "scheduler": state.scheduler.state_dict(),
        "layout": _parallel_layout(),
        "global_batch_size": config.training.global_batch_size,
        "use_distributed_optimizer": use_distributed,
        "distributed_optimizer_sharding": sharding,
        "nonfinite_skips": state.skips.state_dict(),
        "microbatch_source": bool(source_state),
    }
    directory = os.path.join(root, checkpoint_name(state.iteration))
    processes.start()  # megatron's write-results server must die with this rank
    save_staged(sharded_state, directory,
                model_metadata(config.student, state.vocab.padded,
                               tokenizer=state.tokenizer_identity),
                before_commit=lambda: _may_commit(state))
    if rank == 0:
        write_tracker(root, state.iteration)
        log(f"megakd: saved checkpoint at iteration {state.iteration} to {directory}")
    torch.distributed.barrier()
    return directory


def _may_commit(state: TrainingState) -> None:
    """Rank 0, right before a checkpoint is renamed into place: the launcher still runs and
    this job still owns the root (raises otherwise; the staging directory stays behind)."""
    watchdog.check_launcher()
    if state.save_lock is not None:
        state.save_lock.check_owned()


def _no_checkpoint_yet(load: str, save: Optional[str]) -> bool:
    """``--load`` names the run's own ``--save`` root and that root holds no checkpoint yet
    (a resumable job's first launch, or a relaunch after a kill during the first save): start
    from scratch, as Megatron-LM does."""
    if save is None or os.path.abspath(load) != os.path.abspath(save):
        return False
    return not os.path.isdir(load) or not holds_checkpoint(load)


def _student_state(state: TrainingState, directory: str, flag: str, with_optimizer: bool,
                   log: Callable[[str], None]) -> Tuple[Dict[str, dict], List[str]]:
    """The student's sharded state to request from ``directory``, and the hidden-state
    projections (``--kd-intermediate-pairs``) it lacks: a checkpoint of a run without them, a
    converted or pruned model. Those keep their initialisation (weights only: their optimizer
    state cannot be resumed, so a full resume is refused naming the way out)."""
    model_state = model_sharded_state(state.student)
    wanted = [key for chunk in model_state.values() for key in chunk if is_projection_key(key)]
    if not wanted:
        return model_state, []
    from megatron.core import dist_checkpointing

    stored = dist_checkpointing.load_tensors_metadata(directory)
    absent = [key for key in wanted if key not in stored]
    if absent and with_optimizer:
        raise CheckpointError(f"{flag} {directory} holds no hidden-state projection "
                              f"({', '.join(absent)}) for --kd-intermediate-pairs, so its "
                              "optimizer state cannot resume them: pass --no-load-optim or "
                              "--finetune")
    if absent and torch.distributed.get_rank() == 0:
        log(f"megakd: {flag} {directory} has no hidden-state projection "
            f"{', '.join(absent)}; starting from its initialisation")
    return {name: {key: value for key, value in chunk.items() if key not in absent}
            for name, chunk in model_state.items()}, absent


def _load_student_states(chunks: List[torch.nn.Module], loaded: dict,
                         absent: Sequence[str]) -> None:
    """Load each chunk's weights; only the ``absent`` projections may be missing."""
    if not absent:
        load_model_states(chunks, loaded)
        return
    names = list(model_sharded_state(chunks))
    for chunk, name in zip(chunks, names):
        result = unwrap(chunk).load_state_dict(loaded[name], strict=False)
        wrong = [k for k in result.missing_keys if k not in absent] + result.unexpected_keys
        if wrong:
            raise CheckpointError(f"checkpoint keys do not match the student: {wrong[:4]}")


def _load_pretrained(state: TrainingState, path: str, log: Callable[[str], None]
                     ) -> LoadedCheckpoint:
    """``--pretrained-checkpoint``: the student's initial weights (any layout, weights only),
    for a run whose ``--load`` root has no checkpoint yet; iteration 0, fresh optimizer."""
    flag = "--pretrained-checkpoint"
    directory = resolve_checkpoint_dir(path, flag)
    # sharded tensor keys are global: weights saved at any TP/PP/VPP layout load here
    model_state, absent = _student_state(state, directory, flag, False, log)
    _load_student_states(state.student, load_sharded(model_state, directory, flag), absent)
    state.optimizer.reload_model_params()  # main (fp32) params from the loaded weights
    if torch.distributed.get_rank() == 0:
        log(f"megakd: loaded initial weights from --pretrained-checkpoint {path}; "
            "starting at iteration 0")
    return LoadedCheckpoint(directory=directory, iteration=0, consumed_samples=0,
                            weights_only=True, optimizer=False, rng=False)


def _check_optimizer_compatible(training: dict, use_distributed_optimizer: bool,
                                load: str) -> None:
    """Refuse, before any tensor is read, optimizer state that cannot load at this layout."""
    if training["use_distributed_optimizer"] != use_distributed_optimizer:
        raise CheckpointError(
            f"--load {load}: optimizer state was saved "
            f"{'with' if training['use_distributed_optimizer'] else 'without'} "
            "--use-distributed-optimizer; resume with the same setting, or pass "
            "--no-load-optim (fresh optimizer)")
    if training["distributed_optimizer_sharding"] == "dp_reshardable":
        saved, now = training["layout"], _parallel_layout()
        for size in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if saved[size] != now[size]:
                flag = "--" + size.replace("_", "-")
                raise CheckpointError(
                    f"--load {load}: distributed-optimizer state saved at {flag}="
                    f"{saved[size]} cannot be loaded at {now[size]} (only the data-parallel "
                    "size may change); pass --no-load-optim to start a fresh optimizer")


def load_checkpoint(state: TrainingState, log: Callable[[str], None] = print
                    ) -> Optional[LoadedCheckpoint]:
    """Collective: restore ``--load`` into a fully built ``state`` (student DDP chunks,
    optimizer, scheduler). Returns None when there is nothing to load yet.

    A training checkpoint restores weights, optimizer, scheduler, RNG, iteration and consumed
    samples; ``--no-load-optim`` / ``--no-load-rng`` skip those parts, and a ``release`` or
    weights-only directory or ``--finetune`` loads weights only and starts at iteration 0.
    RNG states are per rank, so they are restored only at the layout they were saved at.
    """
    options = state.config.checkpoint
    if options.load is None or _no_checkpoint_yet(options.load, options.save):
        if options.pretrained_checkpoint is not None:
            return _load_pretrained(state, options.pretrained_checkpoint, log)
        if torch.distributed.get_rank() == 0 and options.load is not None:
            log(f"megakd: no checkpoint in {options.load} yet; starting from scratch")
        return None
    directory = resolve_checkpoint_dir(options.load)
    if not is_checkpoint_dir(directory):
        raise CheckpointError(f"--load {options.load}: {directory} is not a complete "
                              "checkpoint (no metadata.json)")
    training = load_common(directory, "--load").get(TRAINING_STATE_KEY)
    weights_only = (training is None or options.finetune
                    or os.path.basename(directory.rstrip("/")) == RELEASE)
    with_optimizer = not weights_only and not options.no_load_optim
    with_rng = (not weights_only and not options.no_load_rng
                and training["layout"] == _parallel_layout())
    if with_optimizer:
        _check_optimizer_compatible(training, state.config.parallel.use_distributed_optimizer,
                                    options.load)
    if not weights_only:
        _load_scheduler(state.scheduler, training["scheduler"], options.load)

    model_state, absent = _student_state(state, directory, "--load", with_optimizer, log)
    request = dict(model_state)
    if with_optimizer:
        _prepare_fresh_optimizer_state(state.optimizer)
        request[OPTIMIZER_KEY] = state.optimizer.sharded_state_dict(
            model_state, is_loading=True,
            metadata=_optimizer_metadata(training["distributed_optimizer_sharding"]))
    if with_rng:
        request[RNG_STATE_KEY] = _rng_sharded_object(None)
    with_source = (not weights_only and training.get("microbatch_source", False)
                   and training["layout"]["data_parallel_size"]
                   == _parallel_layout()["data_parallel_size"])
    if with_source:
        request[SOURCE_STATE_KEY] = _source_sharded_object(None)
    loaded = load_sharded(request, directory, "--load")

    _load_student_states(state.student, loaded, absent)
    if with_optimizer:
        with torch.no_grad():  # fp32 main shards can be views of the (grad-requiring) params
            state.optimizer.load_state_dict(loaded[OPTIMIZER_KEY])
        _restore_adam_steps(state.optimizer)
    else:
        state.optimizer.reload_model_params()  # main (fp32) params from the loaded weights
    if with_rng:
        set_rng_state(loaded[RNG_STATE_KEY], state.runtime.device)
    if with_source:
        state.source.load_state_dict(loaded[SOURCE_STATE_KEY])
    if not weights_only:
        state.iteration = training["iteration"]
        state.consumed_samples = training["consumed_samples"]
        if "nonfinite_skips" in training:  # absent from checkpoints of older megakd
            state.skips.load_state_dict(training["nonfinite_skips"])
    if torch.distributed.get_rank() == 0:
        what = "weights only" if weights_only else "weights, scheduler" + \
            (", optimizer" if with_optimizer else "") + (", rng" if with_rng else "")
        log(f"megakd: loaded {directory} ({what}); starting at iteration {state.iteration}, "
            f"consumed samples {state.consumed_samples}")
    return LoadedCheckpoint(directory, state.iteration, state.consumed_samples, weights_only,
                            with_optimizer, with_rng)
