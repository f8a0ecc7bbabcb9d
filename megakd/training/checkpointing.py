"""Megatron-core distributed checkpoints: model weights, and full training state for resume.

Two kinds of directory, both one ``dist_checkpointing`` checkpoint that loads at any
tensor/pipeline/virtual-pipeline layout:

- weights only, written by :func:`save_model_weights` (the teacher, converted HF weights, and
  initial weights in tests) and read by :func:`load_model_weights`;
- training checkpoints, written by :func:`save_checkpoint` under a checkpoint root as
  ``iter_%07d`` and read by :func:`load_checkpoint`: student weights, optimizer state
  (plain or distributed), LR scheduler, per-rank RNG states, iteration and consumed samples.
  Never the teacher.

Every write goes to a staging directory (``<name>.tmp``) that is renamed into place only once
complete, and the root's tracker file is replaced atomically after that rename, so a crash at
any point leaves the previous checkpoint as the one that loads. Details: docs/checkpoints.md.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import numpy as np
import torch

from megakd.fsutil import fsync_dir, write_text_atomic

if TYPE_CHECKING:
    from megakd.training.setup import TrainingState

_MODEL_PREFIX = "model"

# Layout (as Megatron-LM): a checkpoint *root* holds ``latest_checkpointed_iteration.txt`` (an
# iteration number, or ``release`` for converted weights) and one directory per checkpoint,
# ``iter_0000100`` or ``release``. Each such directory is one dist_checkpointing checkpoint and
# carries ``megakd_model.json``: the model's architecture, so a loader needs no model flags.
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MODEL_METADATA_FILENAME = "megakd_model.json"
RELEASE = "release"


def checkpoint_name(iteration: Optional[int]) -> str:
    """``iter_0000100`` for a training checkpoint, ``release`` for converted weights (None)."""
    return RELEASE if iteration is None else f"iter_{iteration:07d}"


def read_tracker(root: str) -> Optional[str]:
    """The tracker's content (``"100"`` or ``"release"``), or None when there is no tracker."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return handle.read().strip()


def write_tracker(root: str, iteration: Optional[int]) -> None:
    """Atomically point the tracker at ``checkpoint_name(iteration)`` (rank 0 only)."""
    write_text_atomic(os.path.join(root, TRACKER_FILENAME),
                      RELEASE if iteration is None else str(iteration))


def resolve_checkpoint_dir(path: str, flag: str = "--load") -> str:
    """The checkpoint directory a ``--load``-style flag names: the tracker's entry when ``path``
    is a root, or ``path`` itself when it is one checkpoint directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: no such checkpoint directory")
    tracked = read_tracker(path)
    if tracked is not None:
        name = RELEASE if tracked == RELEASE else checkpoint_name(int(tracked))
        resolved = os.path.join(path, name)
        if not os.path.isdir(resolved):
            raise FileNotFoundError(f"{flag} {path}: {TRACKER_FILENAME} names {tracked!r} but "
                                    f"{resolved} does not exist")
        return resolved
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    raise FileNotFoundError(f"{flag} {path}: neither a checkpoint root (no {TRACKER_FILENAME}) "
                            "nor a megatron distributed checkpoint (no metadata.json)")


def read_model_metadata(checkpoint_dir: str) -> Optional[dict]:
    """The ``megakd_model.json`` stored with a checkpoint, or None for older checkpoints."""
    path = os.path.join(checkpoint_dir, MODEL_METADATA_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _sharded_state_dict(chunks: List[torch.nn.Module]) -> dict:
    if len(chunks) == 1:
        return {_MODEL_PREFIX: _unwrap(chunks[0]).sharded_state_dict()}
    return {f"{_MODEL_PREFIX}{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _chunk_keyed(state: dict, chunks: List[torch.nn.Module]):
    if len(chunks) == 1:
        return [state[_MODEL_PREFIX]]
    return [state[f"{_MODEL_PREFIX}{i}"] for i in range(len(chunks))]


def _commit(staging: str, directory: str) -> None:
    """Rename a complete ``staging`` directory to ``directory`` (rank 0). An existing
    ``directory`` is moved aside first and removed only after the new one is in place."""
    aside = None
    if os.path.exists(directory):
        aside = directory + ".old"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(directory, aside)
    os.replace(staging, directory)
    fsync_dir(os.path.dirname(os.path.abspath(directory)))
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _save_staged(sharded_state: dict, directory: str, model_metadata: Optional[dict]) -> None:
    """Collective: ``dist_checkpointing.save`` into ``directory.tmp``, add ``megakd_model.json``,
    then rename to ``directory``. Nothing appears under the final name until all is written."""
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    staging = directory.rstrip("/") + ".tmp"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded_state, staging)
    torch.distributed.barrier()
    if rank == 0:
        if model_metadata is not None:
            with open(os.path.join(staging, MODEL_METADATA_FILENAME), "w") as handle:
                json.dump(model_metadata, handle, indent=2, sort_keys=True)
        _commit(staging, directory)
    torch.distributed.barrier()


def save_model_weights(chunks: List[torch.nn.Module], directory: str,
                       model_metadata: Optional[dict] = None) -> None:
    """Collective over all ranks: write the chunks' weights to ``directory`` atomically, with
    ``model_metadata`` (architecture) as ``megakd_model.json`` when given."""
    _save_staged(_sharded_state_dict(chunks), directory, model_metadata)


def load_model_weights(chunks: List[torch.nn.Module], directory: str, strict: bool = True) -> None:
    """Collective: load weights saved by :func:`save_model_weights` at any layout. ``directory``
    is one checkpoint directory or a checkpoint root (its tracker picks the directory)."""
    from megatron.core import dist_checkpointing

    directory = resolve_checkpoint_dir(directory)
    sharded = _sharded_state_dict(chunks)
    # The checkpoint's keys name the chunks of the layout it was saved at; with virtual
    # pipelining they differ, but sharded tensor keys are global, so load by flat key set.
    state = dist_checkpointing.load(sharded, directory)
    for chunk, chunk_state in zip(chunks, _chunk_keyed(state, chunks)):
        _unwrap(chunk).load_state_dict(chunk_state, strict=strict)


# ----------------------------------------------------------------------------------------------
# Training checkpoints: everything an exact resume needs
# ----------------------------------------------------------------------------------------------

# Common (rank 0) entry: iteration, consumed samples, LR scheduler, parallel layout.
TRAINING_STATE_KEY = "megakd_training"
OPTIMIZER_KEY = "optimizer"
RNG_STATE_KEY = "rng_state"
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
        raise ValueError(
            f"--load {load}: the checkpoint's LR schedule differs from the flags ({error}); "
            "pass --override-opt_param-scheduler to use the flags' schedule or "
            "--use-checkpoint-opt_param-scheduler to keep the checkpoint's") from None


def save_checkpoint(state: "TrainingState", root: str, log: Callable[[str], None] = print) -> str:
    """Collective: write the student's full training state to ``root/iter_%07d`` and point the
    root's tracker at it. Returns the checkpoint directory."""
    config = state.config
    rank = torch.distributed.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for stale in glob.glob(os.path.join(root, "iter_*.tmp")):  # interrupted earlier saves
            shutil.rmtree(stale, ignore_errors=True)
    torch.distributed.barrier()

    model_state = _sharded_state_dict(state.student)
    sharded_state = dict(model_state)
    use_distributed = config.parallel.use_distributed_optimizer
    sharding = DISTRIBUTED_OPTIMIZER_SHARDING if use_distributed else None
    sharded_state[OPTIMIZER_KEY] = state.optimizer.sharded_state_dict(
        model_state, is_loading=False, metadata=_optimizer_metadata(sharding))
    sharded_state[RNG_STATE_KEY] = _rng_sharded_object(get_rng_state(state.runtime.device))
    sharded_state[TRAINING_STATE_KEY] = {
        "iteration": state.iteration,
        "consumed_samples": state.consumed_samples,
        "scheduler": state.scheduler.state_dict(),
        "layout": _parallel_layout(),
        "global_batch_size": config.training.global_batch_size,
        "use_distributed_optimizer": use_distributed,
        "distributed_optimizer_sharding": sharding,
    }

    from megakd.models.metadata import model_metadata

    directory = os.path.join(root, checkpoint_name(state.iteration))
    _save_staged(sharded_state, directory,
                 model_metadata(config.student, state.padded_vocab_size,
                                tokenizer=state.tokenizer_identity))
    if rank == 0:
        write_tracker(root, state.iteration)
        fsync_dir(root)
        log(f"megakd: saved checkpoint at iteration {state.iteration} to {directory}")
    torch.distributed.barrier()
    return directory


def _no_checkpoint_yet(load: str, save: Optional[str]) -> bool:
    """``--load`` names the run's own ``--save`` root before its first save (a resumable job's
    first launch): start from scratch, as Megatron-LM does."""
    if save is None or os.path.abspath(load) != os.path.abspath(save):
        return False
    return read_tracker(load) is None and not os.path.isfile(os.path.join(load, "metadata.json"))


def _load_pretrained(state: "TrainingState", path: str, log: Callable[[str], None]
                     ) -> LoadedCheckpoint:
    """``--pretrained-checkpoint``: the student's initial weights (any layout, weights only),
    for a run whose ``--load`` root has no checkpoint yet; iteration 0, fresh optimizer."""
    load_model_weights(state.student, path)
    state.optimizer.reload_model_params()  # main (fp32) params from the loaded weights
    if torch.distributed.get_rank() == 0:
        log(f"megakd: loaded initial weights from --pretrained-checkpoint {path}; "
            "starting at iteration 0")
    return LoadedCheckpoint(directory=resolve_checkpoint_dir(path, "--pretrained-checkpoint"),
                            iteration=0, consumed_samples=0, weights_only=True, optimizer=False,
                            rng=False)


def load_checkpoint(state: "TrainingState", log: Callable[[str], None] = print
                    ) -> Optional[LoadedCheckpoint]:
    """Collective: restore ``--load`` into a fully built ``state`` (student DDP chunks,
    optimizer, scheduler). Returns None when there is nothing to load yet.

    A training checkpoint restores weights, optimizer, scheduler, RNG, iteration and consumed
    samples; ``--no-load-optim`` / ``--no-load-rng`` skip those parts, and a ``release`` or
    weights-only directory or ``--finetune`` loads weights only and starts at iteration 0.
    RNG states are per rank, so they are restored only at the layout they were saved at.
    """
    from megatron.core import dist_checkpointing

    options = state.config.checkpoint
    if options.load is None or _no_checkpoint_yet(options.load, options.save):
        if options.pretrained_checkpoint is not None:
            return _load_pretrained(state, options.pretrained_checkpoint, log)
        if torch.distributed.get_rank() == 0:
            log(f"megakd: no checkpoint in {options.load} yet; starting from scratch")
        return None
    directory = resolve_checkpoint_dir(options.load)
    if not os.path.isfile(os.path.join(directory, "metadata.json")):
        raise FileNotFoundError(f"--load {options.load}: {directory} is not a complete "
                                "checkpoint (no metadata.json)")
    training = dist_checkpointing.load_common_state_dict(directory).get(TRAINING_STATE_KEY)
    weights_only = (training is None or options.finetune
                    or os.path.basename(directory.rstrip("/")) == RELEASE)
    with_optimizer = not weights_only and not options.no_load_optim
    with_rng = (not weights_only and not options.no_load_rng
                and training["layout"] == _parallel_layout())

    # Mismatches fail here, before any tensor is read.
    if with_optimizer and (training["use_distributed_optimizer"]
                           != state.config.parallel.use_distributed_optimizer):
        raise ValueError(
            f"--load {options.load}: optimizer state was saved "
            f"{'with' if training['use_distributed_optimizer'] else 'without'} "
            "--use-distributed-optimizer; resume with the same setting, or pass "
            "--no-load-optim (fresh optimizer)")
    if with_optimizer and training["distributed_optimizer_sharding"] == "dp_reshardable":
        saved, now = training["layout"], _parallel_layout()
        for size in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if saved[size] != now[size]:
                flag = "--" + size.replace("_", "-")
                raise ValueError(
                    f"--load {options.load}: distributed-optimizer state saved at {flag}="
                    f"{saved[size]} cannot be loaded at {now[size]} (only the data-parallel "
                    "size may change); pass --no-load-optim to start a fresh optimizer")
    if not weights_only:
        _load_scheduler(state.scheduler, training["scheduler"], options.load)

    model_state = _sharded_state_dict(state.student)
    request = dict(model_state)
    if with_optimizer:
        _prepare_fresh_optimizer_state(state.optimizer)
        request[OPTIMIZER_KEY] = state.optimizer.sharded_state_dict(
            model_state, is_loading=True,
            metadata=_optimizer_metadata(training["distributed_optimizer_sharding"]))
    if with_rng:
        request[RNG_STATE_KEY] = _rng_sharded_object(None)
    loaded = dist_checkpointing.load(request, directory)

    for chunk, chunk_state in zip(state.student, _chunk_keyed(loaded, state.student)):
        _unwrap(chunk).load_state_dict(chunk_state, strict=True)
    if with_optimizer:
        with torch.no_grad():  # fp32 main shards can be views of the (grad-requiring) params
            state.optimizer.load_state_dict(loaded[OPTIMIZER_KEY])
        _restore_adam_steps(state.optimizer)
    else:
        state.optimizer.reload_model_params()  # main (fp32) params from the loaded weights
    if with_rng:
        set_rng_state(loaded[RNG_STATE_KEY], state.runtime.device)
    if not weights_only:
        state.iteration = training["iteration"]
        state.consumed_samples = training["consumed_samples"]

    result = LoadedCheckpoint(directory, state.iteration, state.consumed_samples, weights_only,
                              with_optimizer, with_rng)
    if torch.distributed.get_rank() == 0:
        what = "weights only" if weights_only else "weights, scheduler" + \
            (", optimizer" if with_optimizer else "") + (", rng" if with_rng else "")
        log(f"megakd: loaded {directory} ({what}); starting at iteration {state.iteration}, "
            f"consumed samples {state.consumed_samples}")
    return result
