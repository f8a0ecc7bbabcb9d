"""Worker bodies for tests/test_resume.py: save, interrupt, resume, compare (real gloo groups).

Models, data and flags are tests/e2e_workers.py's tiny student/teacher, with a warm-up + cosine
LR schedule, weight decay and gradient clipping so that every piece of optimizer and scheduler
state matters. Every run loads the same teacher weights (saved by the first run), so runs at
different layouts distill from the same teacher.
"""

from __future__ import annotations

import os
import random
import signal
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megakd.configs import ConfigError
from tests.dist_harness import init_layout
from tests.e2e_workers import make_config

ITERS = 6
SCHEDULE = ["--train-iters", str(ITERS), "--lr-decay-iters", str(ITERS),
            "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--min-lr", "1e-3",
            "--weight-decay", "0.01", "--clip-grad", "1.0"]


def _consume_rng(rank: int) -> None:
    """Advance every RNG a rank-dependent amount, as dropout would (the tiny models have none),
    so that a resumed run matches only if the RNG states were restored."""
    from megatron.core import tensor_parallel

    torch.rand(rank + 1)
    np.random.rand(rank + 2)
    random.random()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        torch.rand(rank + 3)


def _rng_draws() -> List[float]:
    from megatron.core import tensor_parallel

    draws = [torch.rand(1).item(), float(np.random.rand()), random.random()]
    with tensor_parallel.get_cuda_rng_tracker().fork():
        draws.append(torch.rand(1).item())
    return draws


def _after_step_hook(rank: int, sigterm_rank: int, sigterm_at: Optional[int]):
    """An after-step hook: consume RNG after each iteration and, at iteration ``sigterm_at``,
    send SIGTERM to this process on rank ``sigterm_rank`` only."""
    def hook(state, record) -> None:
        _consume_rng(rank)
        if state.iteration == sigterm_at and rank == sigterm_rank:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def run(rank: int, tp: int, pp: int, flags: Sequence[str], sigterm_at: Optional[int] = None,
        teacher_dir: Optional[str] = None, save_teacher: bool = False) -> Dict[str, object]:
    """Set up (restoring ``--load``), train with ``megakd.training.loop.train`` and report the
    per-iteration losses and learning rates, this rank's final parameters and RNG draws."""
    from megakd.formats.checkpoints import save_model_weights
    from megakd.training import TrainingHooks, setup, train

    world = int(os.environ["WORLD_SIZE"])
    extra = [*SCHEDULE, *flags]
    if teacher_dir is not None and not save_teacher:
        extra += ["--teacher-load", teacher_dir]
    config = make_config(tp, pp, world, extra)
    logs: List[str] = []
    state = setup(config, init_layout(config), log=logs.append)
    if save_teacher:
        save_model_weights(state.teacher.chunks, teacher_dir)
    start = (state.iteration, state.consumed_samples)
    hooks = TrainingHooks(after_step=[_after_step_hook(rank, sigterm_rank=1,
                                                       sigterm_at=sigterm_at)])
    history = train(state, log=logs.append, hooks=hooks)
    params = torch.cat([p.detach().flatten().clone() for chunk in state.student
                        for p in chunk.parameters()])
    return {
        "start": start,
        "end": (state.iteration, state.consumed_samples),
        "iterations": [r.iteration for r in history.records],
        "losses": [r.losses for r in history.records],
        "lr": [r.learning_rate for r in history.records],
        "params": params.numpy(),  # plain array: safe to return through the harness queue
        "rng": _rng_draws(),
        "exit_reason": history.exit_reason,
        "logs": logs,
    }


def interrupted_checkpoints(rank: int, source: str, root: str,
                            teacher_dir: str) -> Dict[str, object]:
    """In a copy of the checkpoint root ``source``, leave behind what interrupted saves leave (a
    staging directory; an iteration directory the tracker never pointed at, without
    metadata.json) and check the last good checkpoint loads and the next save cleans up; then a
    tracker naming an incomplete directory must be refused with a clear error."""
    import shutil

    from megakd.formats.checkpoints import checkpoint_name, write_tracker

    world = int(os.environ["WORLD_SIZE"])
    good = os.path.join(root, checkpoint_name(ITERS))
    if rank == 0:
        shutil.copytree(source, root)
        shutil.copytree(good, os.path.join(root, checkpoint_name(ITERS + 3) + ".tmp"))
        partial = os.path.join(root, checkpoint_name(ITERS + 6))
        shutil.copytree(good, partial)
        os.remove(os.path.join(partial, "metadata.json"))  # written last by dist_checkpointing
    torch.distributed.barrier()
    result = run(rank, 2, 2, ["--load", root, "--save", root, "--train-iters", str(ITERS + 1)],
                 teacher_dir=teacher_dir)
    after_save = sorted(os.listdir(root))  # the save at ITERS + 1 removed the staging dir

    torch.distributed.barrier()
    if rank == 0:
        write_tracker(root, ITERS + 6)
    torch.distributed.barrier()
    from megakd.training import setup

    try:  # refused by the preflight (before process groups), or at the latest by setup
        config = make_config(2, 2, world, [*SCHEDULE, "--load", root,
                                           "--teacher-load", teacher_dir])
        setup(config, init_layout(config))
        refused = None
    except ConfigError as error:
        refused = str(error)
    return {"resumed": result, "listing": after_save, "refused": refused}


def exit_duration(rank: int, teacher_dir: str) -> Dict[str, object]:
    """``--exit-duration-in-mins``: a limit already passed stops after the first iteration."""
    result = run(rank, 2, 1, ["--exit-duration-in-mins", "1e-6"], teacher_dir=teacher_dir)
    return {"iterations": result["iterations"], "exit_reason": result["exit_reason"]}


def refused(rank: int, tp: int, pp: int, flags: Sequence[str], teacher_dir: str) -> str:
    """The message of the ConfigError that ``setup`` raises for these flags ("" if none)."""
    from megakd.training import setup

    world = int(os.environ["WORLD_SIZE"])
    config = make_config(tp, pp, world, [*SCHEDULE, "--teacher-load", teacher_dir, *flags])
    try:
        setup(config, init_layout(config))
    except ConfigError as error:
        return str(error)
    return ""
