"""Worker bodies for tests/test_divergence.py (one 4-rank launch, TP=2 x PP=2, gloo).

Divergence is injected three ways: a huge learning rate, a teacher checkpoint with one NaN
weight, and a teacher source that hands the loss NaN logits at chosen iterations (through the
teacher-source seam, no monkeypatching).
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Set

import torch

from megakd.distill import TeacherOutput
from tests.dist_harness import init_layout
from tests.e2e_workers import make_config

ITERS = 6
HUGE_LR = ["--lr", "1e5", "--clip-grad", "1.0", "--lr-decay-style", "constant"]


class PoisonedTeacher:
    """A teacher source whose outputs are NaN at the given iterations (1-based)."""

    def __init__(self, inner, state, iterations: Set[int]) -> None:
        self.inner, self.state, self.iterations = inner, state, iterations

    def outputs(self, microbatches) -> List[TeacherOutput]:
        outputs = self.inner.outputs(microbatches)
        if self.state.iteration + 1 not in self.iterations:
            return outputs
        return [TeacherOutput(logits=torch.full_like(out.logits, float("nan")))
                for out in outputs]


def _run(workdir: str, flags: Sequence[str], poison: Set[int] = frozenset()) -> Dict[str, object]:
    """Train with ``flags``; what happened: records, the error message, the tracker."""
    from megakd.training import TrainingHooks, setup, train
    from megakd.training.nonfinite import DivergenceError

    config = make_config(2, 2, int(os.environ["WORLD_SIZE"]), [
        "--teacher-load", f"{workdir}/teacher", "--load", f"{workdir}/student",
        "--train-iters", str(ITERS), "--log-interval", "1", *flags])
    state = setup(config, init_layout(config), log=lambda line: None)
    if poison:
        state.step.teacher = PoisonedTeacher(state.step.teacher, state, set(poison))
    lines: List[str] = []
    records: list = []  # every finished iteration, also those before a DivergenceError
    hooks = TrainingHooks(after_step=[lambda state, record: records.append(record)])
    error = None
    try:
        train(state, log=lines.append, hooks=hooks)
    except DivergenceError as caught:
        error = str(caught)
    params = torch.cat([p.detach().flatten() for c in state.student for p in c.parameters()])
    return {"error": error, "iteration": state.iteration, "skipped": state.skips.skipped,
            "skipped_iterations": [r.iteration for r in records if r.skipped],
            "losses": [r.losses for r in records], "lines": lines,
            "params_finite": bool(torch.isfinite(params).all())}


def save_models(rank: int, workdir: str) -> None:
    """The student's initial weights, and two teachers: a sound one and one whose final
    norm holds a NaN (every logit of every token becomes NaN)."""
    from megakd.formats.checkpoints import save_model_weights
    from megakd.formats.model_metadata import model_metadata
    from megakd.training import setup

    config = make_config(2, 2, int(os.environ["WORLD_SIZE"]))
    state = setup(config, init_layout(config), log=lambda line: None)
    save_model_weights(state.student, f"{workdir}/student")
    teacher = state.teacher.chunks
    metadata = model_metadata(config.teacher, state.vocab.padded)
    save_model_weights(teacher, f"{workdir}/teacher", metadata)
    with torch.no_grad():
        for chunk in teacher:
            norm = getattr(chunk.decoder, "final_layernorm", None)
            if norm is not None:  # the last pipeline stage
                norm.weight[0] = float("nan")
    save_model_weights(teacher, f"{workdir}/broken_teacher", metadata)


def huge_lr(rank: int, workdir: str) -> Dict[str, object]:
    """lr 1e5, a checkpoint every iteration: stops at the first non-finite iteration."""
    return _run(workdir, [*HUGE_LR, "--save", f"{workdir}/huge", "--save-interval", "1"])


def huge_lr_reference(rank: int, workdir: str) -> Dict[str, object]:
    """The same run stopped cleanly after the diverged run's last good iteration (what its
    tracker names), and saved."""
    from megakd.formats.checkpoints import read_tracker

    return _run(workdir, [*HUGE_LR, "--train-iters", read_tracker(f"{workdir}/huge"),
                          "--save", f"{workdir}/huge_reference"])


def resume_huge_lr(rank: int, workdir: str) -> Dict[str, object]:
    """Relaunch from the diverged run's last good checkpoint: the same stop, same message."""
    return _run(workdir, [*HUGE_LR, "--load", f"{workdir}/huge", "--save", f"{workdir}/huge"])


def compare_checkpoints(rank: int, first: str, second: str) -> float:
    """max |difference| of the student weights in two checkpoint roots (any layout)."""
    from megakd.formats.checkpoints import load_model_weights
    from megakd.models import build_student

    config = make_config(2, 2, int(os.environ["WORLD_SIZE"]))
    init_layout(config)
    worst = torch.zeros(1)
    models = []
    for root in (first, second):
        chunks = build_student(config.student, config.parallel, 64, 16)
        load_model_weights(chunks, root)
        models.append([p.detach() for c in chunks for p in c.parameters()])
    for a, b in zip(*models):
        worst = torch.maximum(worst, (a - b).abs().max().reshape(1))
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return worst.item()


def broken_teacher(rank: int, workdir: str) -> Dict[str, object]:
    return _run(workdir, ["--teacher-load", f"{workdir}/broken_teacher"])


def skipping(rank: int, workdir: str) -> Dict[str, object]:
    """NaN teacher outputs at iterations 2 and 4, --skip-nonfinite-iterations: those two
    steps are skipped, the others train, and the run saves finite weights at the end."""
    return _run(workdir, ["--skip-nonfinite-iterations", "--save", f"{workdir}/skipping"],
                poison={2, 4})


def skipping_limit(rank: int, workdir: str) -> Dict[str, object]:
    """Three poisoned iterations in a row reach --max-consecutive-skipped-iterations 3."""
    return _run(workdir, ["--skip-nonfinite-iterations", "--max-consecutive-skipped-iterations",
                          "3"], poison={2, 3, 4})


def unchecked_save(rank: int, workdir: str) -> Dict[str, object]:
    """Without the check, lr 1e5 reaches NaN weights; the save at the end is refused."""
    return _run(workdir, [*HUGE_LR, "--no-check-for-nan-in-loss-and-grad", "--clip-grad", "0",
                          "--save", f"{workdir}/unchecked"])
