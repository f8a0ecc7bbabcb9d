"""Training: setup, the loop, checkpoints. Entry point: :func:`pretrain_kd`."""

from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

from megakd.arguments import KDRunConfig


def pretrain_kd(config: KDRunConfig, log=print):
    """Distill ``config.teacher`` into ``config.student``; returns the training history.

    Reads the launcher's environment (torchrun, SLURM, MPI), starts process groups, trains,
    and tears the groups down.
    """
    from megakd.runtime import destroy, initialize
    from megakd.training.loop import is_logging_rank, train
    from megakd.training.setup import setup

    par = config.parallel
    runtime = initialize(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_size(config.student.num_layers),
        device=config.runtime.device,
        seed=config.training.seed,
        timeout_minutes=config.runtime.distributed_timeout_minutes,
    )
    try:
        start = time.perf_counter()
        state = setup(config, runtime, log=log)
        if runtime.launch.rank == 0:
            log(f"megakd: world {par.world_size} = TP {par.tensor_model_parallel_size} x PP "
                f"{par.pipeline_model_parallel_size} x DP {par.data_parallel_size} on "
                f"{runtime.device.type} ({runtime.backend}); vocab {state.valid_vocab_size} "
                f"padded to {state.padded_vocab_size}; kd loss {config.kd.loss}"
                f"{'' if config.kd.topk is None else f' top-{config.kd.topk}'}, weight "
                f"{config.kd.loss_weight}, T={config.kd.temperature}")
        history = train(state, log=log)  # checkpoints to --save periodically, on exit, at the end
        if is_logging_rank() and history.records:  # none when resumed at --train-iters
            lm = history.first_last("lm loss")
            kd = history.first_last("kd loss")
            summary = f"megakd: done {state.iteration} iterations in {time.perf_counter() - start:.1f} s"
            summary += f" | lm loss {lm[0]:.4f} -> {lm[1]:.4f}"
            if kd[0] is not None:
                summary += f" | kd loss {kd[0]:.4f} -> {kd[1]:.4f}"
            log(summary)
        return history
    finally:
        destroy()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry (``tools/pretrain_kd.py``): flags are validated before any
    process group starts; a bad flag exits with status 2 and a message naming it."""
    from megakd.arguments import ConfigError, parse_args

    try:
        config = parse_args(argv)
    except ConfigError as error:
        print(f"pretrain_kd.py: error: {error}", file=sys.stderr)
        return 2
    pretrain_kd(config, log=lambda line: print(line, flush=True))
    return 0
