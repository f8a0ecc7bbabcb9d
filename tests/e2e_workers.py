"""Worker bodies for tests/test_e2e.py (run on real gloo process groups by dist_harness).

A tiny teacher (4 layers, hidden 64) and student (2 layers, hidden 32) on megatron-core's mock
data; vocab 61 (60 + EOD) padded to 64, so every layout also exercises padded vocab entries.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megakd.configs import KDRunConfig
from megakd.preflight import parse_pretrain_args
from tests.dist_harness import init_layout

SEQ = 16
MBS = 2
GBS = 8


def make_config(tp: int, pp: int, world_size: int, extra: Sequence[str] = ()) -> KDRunConfig:
    argv = [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--teacher-num-layers", "4", "--teacher-hidden-size", "64",
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--disable-bias-linear",
        "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--global-batch-size", str(GBS),
        "--train-iters", "8", "--lr", "1e-2", "--lr-decay-style", "constant",
        "--weight-decay", "0.0", "--clip-grad", "0", "--seed", "7",
        "--mock-data", "--vocab-size", "60", "--make-vocab-size-divisible-by", "16",
        "--kd-loss", "fkl", "--kd-temperature", "2.0", "--kd-loss-weight", "0.5",
        "--device", "cpu", *extra,
    ]
    return parse_pretrain_args(argv, world_size=world_size)


def full_logits(chunks, microbatches, seq_length: int = SEQ,
                micro_batch_size: int = MBS) -> Optional[torch.Tensor]:
    """Logits ``[n_mb, b, s, V]`` of ``chunks`` on the last stage (TP shards all-gathered: test
    only; None on other stages)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tp_group = parallel_state.get_tensor_model_parallel_group()

    def keep(logits, non_loss_data=True):
        shards = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(tp_group))]
        torch.distributed.all_gather(shards, logits.contiguous(), group=tp_group)
        return torch.cat(shards, dim=-1)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch.tokens, batch.position_ids, None), keep

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(microbatches),
            model=chunks, num_microbatches=len(microbatches), seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True, collect_non_loss_data=True,
        )
    return torch.stack(out) if out else None


def _gather_full_logits(state, microbatches) -> Optional[torch.Tensor]:
    """Student logits ``[n_mb, b, s, V]`` on the last stage."""
    return full_logits(state.student, microbatches)


def _microbatches(state):
    from megatron.core import parallel_state

    from megakd.data import iteration_microbatches

    return iteration_microbatches(
        state.train_dataset, state.consumed_samples, GBS, MBS,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
        torch.device("cpu"),
    )


def _observe(state) -> Dict[str, object]:
    """Losses (forward only) and full logits for the current iteration's microbatches."""
    from megakd.distill import reduce_reported
    from megatron.core import parallel_state

    microbatches = _microbatches(state)
    losses = reduce_reported(state.step.run(microbatches, forward_only=True),
                             parallel_state.get_data_parallel_group())
    return {"losses": losses, "logits": _gather_full_logits(state, microbatches)}


def layouts_worker(rank: int, layouts: List[Tuple[int, int]], workdir: str,
                   save_init: bool) -> Dict[str, dict]:
    """For each (tp, pp): load the shared initial weights, observe logits/losses, take one
    training step, observe again and save the updated weights to ``workdir/after_tpXppY``.

    With ``save_init`` (world size 1) first write the shared initial student/teacher weights.
    """
    from megakd.formats.checkpoints import save_model_weights
    from megakd.training.loop import train_step
    from megakd.training.setup import setup

    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for tp, pp in layouts:
        extra = [] if save_init else ["--load", f"{workdir}/init_student",
                                      "--teacher-load", f"{workdir}/init_teacher"]
        config = make_config(tp, pp, world, extra)
        state = setup(config, init_layout(config))
        if save_init:
            save_model_weights(state.student, f"{workdir}/init_student")
            save_model_weights(state.teacher.chunks, f"{workdir}/init_teacher")
        before = _observe(state)
        record = train_step(state)
        after = _observe(state)
        save_model_weights(state.student, f"{workdir}/after_tp{tp}pp{pp}dp{world // (tp * pp)}")
        results[f"tp{tp}pp{pp}"] = {
            "before": before, "after": after, "step_losses": record.losses,
            "grad_norm": record.grad_norm,
        }
    return results


def compare_weights_worker(rank: int, workdir: str, names: List[str]) -> Dict[str, float]:
    """Load each saved checkpoint at TP=1/PP=1; max |difference| to ``names[0]``'s weights."""
    from megakd.models import build_student
    from megakd.formats.checkpoints import load_model_weights

    config = make_config(1, 1, 1)
    init_layout(config)
    models = {}
    for name in names:
        chunks = build_student(config.student, config.parallel, 64, SEQ)
        load_model_weights(chunks, f"{workdir}/{name}")
        models[name] = dict(chunks[0].named_parameters())
    reference = models[names[0]]
    return {
        name: max((params[key] - reference[key]).abs().max().item() for key in reference)
        for name, params in models.items()
    }


def self_distill_worker(rank: int, workdir: str, tp: int, pp: int) -> Optional[Dict[str, float]]:
    """Student initialised as a copy of the teacher (same architecture): KD loss must be 0."""
    from megakd.formats.checkpoints import save_model_weights
    from megakd.training.setup import setup

    world = int(os.environ["WORLD_SIZE"])
    same_arch = ["--teacher-num-layers", "2", "--teacher-hidden-size", "32"]
    path = f"{workdir}/self_teacher"
    if not os.path.isdir(path):
        config = make_config(tp, pp, world, same_arch)
        save_model_weights(setup(config, init_layout(config)).teacher.chunks, path)
    config = make_config(tp, pp, world, same_arch + ["--load", path, "--teacher-load", path])
    state = setup(config, init_layout(config))
    return _observe(state)["losses"]


def training_worker(rank: int, workdir: str, tp: int, pp: int, iters: int,
                    extra: Sequence[str] = ()) -> Dict[str, object]:
    """Train ``iters`` iterations; return the loss curve (last stage) and a checksum of every
    parameter of this rank (to compare data-parallel replicas)."""
    from megatron.core import parallel_state

    from megakd.training.loop import train_step
    from megakd.training.setup import setup

    world = int(os.environ["WORLD_SIZE"])
    config = make_config(tp, pp, world, ["--load", f"{workdir}/init_student",
                                         "--teacher-load", f"{workdir}/init_teacher", *extra])
    state = setup(config, init_layout(config))
    curve = [train_step(state).losses for _ in range(iters)]
    params = torch.cat([p.detach().double().flatten() for p in state.student[0].parameters()])
    return {
        "curve": curve,
        "param_checksum": [params.sum().item(), params.abs().sum().item(), params.pow(2).sum().item()],
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
    }


def objectives_worker(rank: int, workdir: str, tp: int, pp: int, iters: int) -> Dict[str, list]:
    """Every ``--kd-loss`` (dense and top-k) trains a few pure-KD steps at this layout."""
    from megakd.losses import DIVERGENCES

    variants = {kind: ["--kd-loss", kind] for kind in DIVERGENCES}
    variants.update({
        "fkl-top8-bf16": ["--kd-loss", "fkl", "--kd-topk", "8"],
        "rkl-top8-fp8": ["--kd-loss", "rkl", "--kd-topk", "8", "--kd-topk-dtype", "fp8"],
        "jsd-top8-renormalized": ["--kd-loss", "jsd", "--kd-topk", "8", "--kd-topk-renormalize"],
    })
    curves = {}
    for name, flags in variants.items():
        pure_kd = ["--kd-loss-weight", "1", "--kd-temperature", "1", *flags]
        curves[name] = [r["kd loss"] for r in
                        training_worker(rank, workdir, tp, pp, iters, pure_kd)["curve"] if r]
    return curves



# Layout variants on a 4-layer student (so PP=2 can hold two virtual stages per rank), at
# lr 1e-3: with 1e-2, Adam's first steps move every weight by about half its init scale and
# the third step's grad norm jumps 2.5x, a regime where bf16 rounding is amplified by the
# dynamics rather than measured (3.2 % vs fp32 on CPUs with native bf16 dot products).
VARIANT_STUDENT = ("--num-layers", "4", "--lr", "1e-3")
VARIANTS = {
    # name: (tp, pp, extra flags)
    "tp2pp2": (2, 2, ()),
    "tp2pp2-vpp2": (2, 2, ("--num-layers-per-virtual-pipeline-stage", "1")),
    "tp2dp2": (2, 1, ()),
    "tp2dp2-distopt": (2, 1, ("--use-distributed-optimizer",)),
    "tp2dp2-sp": (2, 1, ("--sequence-parallel",)),
    "tp2dp2-bf16": (2, 1, ("--bf16",)),
}


def variants_worker(rank: int, workdir: str, iters: int) -> Dict[str, dict]:
    """Each variant in :data:`VARIANTS` trains ``iters`` steps from the same initial weights;
    returns its loss curve and grad norms (last rank) for comparison with its plain layout."""
    from megakd.formats.checkpoints import save_model_weights
    from megakd.training.loop import train_step
    from megakd.training.setup import setup

    world = int(os.environ["WORLD_SIZE"])
    init_student, init_teacher = f"{workdir}/variant_init_student", f"{workdir}/variant_init_teacher"
    results = {}
    for name, (tp, pp, extra) in VARIANTS.items():
        load = [] if not results else ["--load", init_student, "--teacher-load", init_teacher]
        config = make_config(tp, pp, world, [*VARIANT_STUDENT, *load, *extra])
        state = setup(config, init_layout(config))
        if not results:
            save_model_weights(state.student, init_student)
            save_model_weights(state.teacher.chunks, init_teacher)
        records = [train_step(state) for _ in range(iters)]
        results[name] = {
            "curve": [r.losses for r in records],
            "grad_norms": [r.grad_norm for r in records],
            "num_chunks": len(state.student),
        }
    return results



def pretrained_worker(rank: int, workdir: str) -> Dict[str, object]:
    """``--pretrained-checkpoint`` seeds a resumable run: the first launch (empty ``--load``
    root) starts from those weights at iteration 0; the next launch resumes from ``--load``."""
    from megakd.training.loop import train
    from megakd.training.setup import setup

    def checksum(state) -> float:
        return sum(p.detach().double().sum().item() for p in state.student[0].parameters())

    root = f"{workdir}/pretrained_run"
    flags = ["--load", root, "--save", root, "--pretrained-checkpoint", f"{workdir}/init_student",
             "--lr-decay-iters", "4"]  # the schedule must not change when --train-iters grows
    quiet = lambda *args: None  # noqa: E731
    reference = setup(make_config(1, 1, 1, ["--load", f"{workdir}/init_student"]),
                      init_layout(make_config(1, 1, 1)), log=quiet)
    config = make_config(1, 1, 1, [*flags, "--train-iters", "2"])
    first = setup(config, init_layout(config), log=quiet)
    facts = {"first_iteration": first.iteration,
             "first_matches_pretrained": checksum(first) == checksum(reference)}
    train(first, log=quiet)
    trained = checksum(first)
    config = make_config(1, 1, 1, [*flags, "--train-iters", "3"])
    second = setup(config, init_layout(config), log=quiet)
    facts.update(second_iteration=second.iteration, second_matches_trained=checksum(second) == trained)
    return facts



# Teacher windows (--kd-teacher-window) on the variant student: name -> (tp, pp, extra flags,
# windows compared with the same layout unwindowed). GBS 8 / MBS 2: 4 microbatches per rank at
# DP = 1 (W = 3 leaves an uneven last window), 2 at DP = 2.
_VPP = ("--num-layers-per-virtual-pipeline-stage", "1")
WINDOW_LAYOUTS = {
    "tp2pp2": (2, 2, (), (1, 3)),
    "tp2pp2-vpp2": (2, 2, _VPP, (2,)),  # interleaving needs >= PP microbatches per window
    "tp2dp2-distopt": (2, 1, ("--use-distributed-optimizer",), (1,)),
    "tp2pp2-topk": (2, 2, ("--kd-topk", "8"), (2,)),
    "pp2dp2": (1, 2, (), ()),
    "pp2dp2-vpp2": (1, 2, _VPP, ()),
}


def windows_worker(rank: int, workdir: str, iters: int) -> Dict[str, dict]:
    """Each layout of :data:`WINDOW_LAYOUTS` trains ``iters`` steps from the variant initial
    weights (written by :func:`variants_worker`), unwindowed and with each window; returns the
    loss curves, grad norms and the bytes of this rank's final parameters."""
    from megakd.training.loop import train_step
    from megakd.training.setup import setup

    world = int(os.environ["WORLD_SIZE"])
    init = ["--load", f"{workdir}/variant_init_student",
            "--teacher-load", f"{workdir}/variant_init_teacher"]
    results = {}
    for name, (tp, pp, extra, sizes) in WINDOW_LAYOUTS.items():
        for size in (None, *sizes):
            window = ["--kd-teacher-window", str(size)] if size else []
            config = make_config(tp, pp, world, [*VARIANT_STUDENT, *init, *extra, *window])
            state = setup(config, init_layout(config), log=lambda line: None)
            records = [train_step(state) for _ in range(iters)]
            params = torch.cat([p.detach().flatten() for chunk in state.student
                                for p in chunk.parameters()])
            results[f"{name}-w{size or 'all'}"] = {
                "curve": [r.losses for r in records],
                "grad_norms": [r.grad_norm for r in records],
                "params": params.numpy().tobytes(),
            }
    return results
