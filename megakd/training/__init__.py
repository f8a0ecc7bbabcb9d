"""Training: setup, the loop with its hooks, checkpoints. Entry point: :func:`pretrain_kd`."""

from __future__ import annotations

import time
from typing import Callable, Optional

from megakd.configs import KDRunConfig
from megakd.runtime import running
from megakd.training.loop import TrainingHistory, is_logging_rank, train
from megakd.training.setup import setup
from megakd.training.state import TrainingHooks, TrainingState

__all__ = ["TrainingHistory", "TrainingHooks", "TrainingState", "pretrain_kd", "setup", "train"]


def _start_line(config: KDRunConfig, state: TrainingState) -> str:
    par, kd, runtime = config.parallel, config.kd, state.runtime
    topk = "" if kd.topk is None else f" top-{kd.topk}"
    return (f"megakd: world {par.world_size} = TP {par.tensor_model_parallel_size} x PP "
            f"{par.pipeline_model_parallel_size} x DP {par.data_parallel_size} on "
            f"{runtime.device.type} ({runtime.backend}); vocab {state.vocab.valid} padded to "
            f"{state.vocab.padded}; kd loss {kd.loss}{topk}, weight {kd.loss_weight}, "
            f"T={kd.temperature}")


def pretrain_kd(config: KDRunConfig, log: Callable[[str], None] = print,
                hooks: Optional[TrainingHooks] = None) -> TrainingHistory:
    """Distill ``config.teacher`` into ``config.student``; returns the training history.

    Reads the launcher's environment (torchrun, SLURM, MPI), starts process groups, trains,
    and tears the groups down. ``config`` comes from :func:`megakd.preflight.parse_pretrain_args`
    (flags validated and files checked before any process group starts).
    """
    with running(config.parallel, config.runtime, config.training.seed,
                 config.student.num_layers) as runtime:
        start = time.perf_counter()
        state = setup(config, runtime, log=log)
        if runtime.launch.rank == 0:
            log(_start_line(config, state))
        history = train(state, log=log, hooks=hooks)  # checkpoints to --save as configured
        if is_logging_rank() and history.records:  # none when resumed at --train-iters
            summary = (f"megakd: done {state.iteration} iterations in "
                       f"{time.perf_counter() - start:.1f} s")
            # on-policy runs have no CE tokens: no lm loss
            for name in ("lm loss", "kd loss", "hidden loss"):
                first, last = history.first_last(name)
                if first is not None:
                    summary += f" | {name} {first:.4f} -> {last:.4f}"
            log(summary)
        return history
