"""Worker bodies for tests/test_validation.py (run on real gloo process groups by dist_harness).

Models and data are tests/e2e_workers' tiny teacher and student on mock data; every layout
loads the same initial weights, written by :func:`save_init_worker` at world size 1.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch

from tests.dist_harness import init_layout
from tests.e2e_workers import GBS, MBS, make_config

# Four iterations, validating after iteration 2 and at the end; two global batches each.
EVAL_FLAGS = ("--train-iters", "4", "--eval-interval", "2", "--eval-iters", "2",
              "--log-interval", "1")
EVAL_ITERS = 2


def _config(workdir: str, tp: int, pp: int, extra: Sequence[str]):
    world = int(os.environ["WORLD_SIZE"])
    load = ["--load", f"{workdir}/init_student", "--teacher-load", f"{workdir}/init_teacher"]
    return make_config(tp, pp, world, [*load, *extra])


def _setup(workdir: str, tp: int, pp: int, extra: Sequence[str]):
    from megakd.training import setup

    config = _config(workdir, tp, pp, extra)
    return setup(config, init_layout(config), log=lambda line: None)


def save_init_worker(rank: int, workdir: str) -> None:
    """The shared initial student and teacher weights (world size 1)."""
    from megakd.formats.checkpoints import save_model_weights
    from megakd.training import setup

    config = make_config(1, 1, 1)
    state = setup(config, init_layout(config), log=lambda line: None)
    save_model_weights(state.student, f"{workdir}/init_student")
    save_model_weights(state.teacher.chunks, f"{workdir}/init_teacher")


def initial_validation_worker(rank: int, workdir: str, tp: int, pp: int) -> Dict[str, dict]:
    """Student and teacher validation losses on the first window, for the initial weights."""
    from megakd.training.evaluation import Validator

    validator = Validator(_setup(workdir, tp, pp, EVAL_FLAGS))
    return {"teacher": validator.teacher_losses(), "student": validator.student_losses()}


def independent_teacher_ce_worker(rank: int, workdir: str) -> float:
    """The teacher's CE on the first validation window without megakd's loss or schedules:
    full logits of the TP=1 teacher and ``torch.nn.functional.cross_entropy``."""
    from megakd.data import iteration_microbatches

    state = _setup(workdir, 1, 1, EVAL_FLAGS)
    (teacher,) = state.teacher.chunks
    ce_sum, tokens = 0.0, 0.0
    with torch.no_grad():
        for eval_iter in range(EVAL_ITERS):
            for batch in iteration_microbatches(state.valid_dataset, eval_iter * GBS, GBS, MBS,
                                                0, 1, torch.device("cpu")):
                logits = teacher(batch.tokens, batch.position_ids, None)[..., :state.vocab.valid]
                ce = torch.nn.functional.cross_entropy(
                    logits.double().flatten(0, 1), batch.labels.flatten(), reduction="none")
                ce_sum += (ce * batch.loss_mask.flatten().double()).sum().item()
                tokens += batch.loss_mask.sum().item()
    return ce_sum / tokens


def train_worker(rank: int, workdir: str, tp: int, pp: int,
                 extra: Sequence[str]) -> Dict[str, object]:
    """``train()`` with the given flags; its log lines, per-iteration record and validations."""
    from megakd.training import train

    state = _setup(workdir, tp, pp, extra)
    lines: List[str] = []
    history = train(state, log=lines.append)
    return {
        "lines": lines,
        "losses": [r.losses for r in history.records],
        "grad_norms": [r.grad_norm for r in history.records],
        "validations": [(v.iteration, v.model, v.losses) for v in history.validations],
    }
