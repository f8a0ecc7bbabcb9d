"""What a run reports besides its log lines' losses: metric writers, timers, progress.

- :class:`MetricsWriters` fans scalars out to TensorBoard (``--tensorboard-dir``) and W&B
  (``--wandb-project``); it exists on the logging rank only (elsewhere it holds no writer).
- :func:`build_timers` gives megatron-core ``Timers`` at ``--timing-log-level``;
  :func:`report_timers` prints and writes them (a collective: every rank calls it).
- :class:`ProgressMeter` makes the progress line with an ETA.
"""

from __future__ import annotations

import datetime
import time
from typing import Dict, List, Optional, Protocol, Sequence

import torch

from megakd.configs import KDRunConfig, LoggingConfig, as_dict

# Timers megakd starts around each training iteration (all at log level 1): data loading, the
# teacher's forward-only pass, the student's forward-backward schedule (loss included), and the
# optimizer step.
TRAINING_TIMERS = ("batch-generator", "teacher-forward", "forward-backward", "optimizer")


def is_logging_rank() -> bool:
    """Megatron logs from the last rank, which sits on the last pipeline stage."""
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


class MetricsWriter(Protocol):
    """One metrics backend (TensorBoard, W&B, or a test double)."""

    def add_scalar(self, tag: str, value: float, step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardWriter:
    """TensorBoard event files in ``--tensorboard-dir``."""

    def __init__(self, log_dir: str, max_queue: int = 1000) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # the preflight checks this first
            raise RuntimeError("--tensorboard-dir needs the tensorboard package: "
                               "pip install tensorboard") from error
        self.summary_writer = SummaryWriter(log_dir=log_dir, max_queue=max_queue)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.summary_writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.summary_writer.flush()

    def close(self) -> None:
        self.summary_writer.close()


class WandbWriter:
    """A Weights & Biases run (``--wandb-project``, ``--wandb-exp-name``, ``--wandb-save-dir``)."""

    def __init__(self, logging_config: LoggingConfig, run_config: dict) -> None:
        try:
            import wandb
        except ImportError as error:  # the preflight checks this first
            raise RuntimeError("--wandb-project needs the wandb package: pip install wandb") from error
        self._wandb = wandb
        self._run = wandb.init(
            project=logging_config.wandb_project,
            name=logging_config.wandb_exp_name,
            dir=logging_config.wandb_save_dir,
            config=run_config,
        )

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._run.log({tag: value}, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._run.finish()


class MetricsWriters:
    """Every configured backend; with none (other ranks, or no flags) every call is a no-op."""

    def __init__(self, writers: Sequence[MetricsWriter] = ()) -> None:
        self.writers: List[MetricsWriter] = list(writers)

    def __bool__(self) -> bool:
        return bool(self.writers)

    def add_scalar(self, tag: str, value: Optional[float], step: int) -> None:
        if value is None:
            return
        for writer in self.writers:
            writer.add_scalar(tag, float(value), step)

    def add_scalars(self, values: Dict[str, Optional[float]], step: int) -> None:
        for tag, value in values.items():
            self.add_scalar(tag, value, step)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def build_metrics_writers(config: KDRunConfig) -> MetricsWriters:
    """TensorBoard and/or W&B writers on the logging rank (Megatron's last rank); none elsewhere."""
    logging_config = config.logging
    if not is_logging_rank():
        return MetricsWriters()
    writers: List[MetricsWriter] = []
    if logging_config.tensorboard_dir:
        writers.append(TensorBoardWriter(logging_config.tensorboard_dir))
    if logging_config.wandb_project:
        writers.append(WandbWriter(logging_config, as_dict(config)))
    return MetricsWriters(writers)


def build_timers(logging_config: LoggingConfig):
    """megatron-core ``Timers`` at ``--timing-log-level``, with megakd's training timers
    registered (real timers at level >= 1, no-op timers at level 0)."""
    from megatron.core.timers import Timers

    timers = Timers(logging_config.timing_log_level, logging_config.timing_log_option)
    for name in TRAINING_TIMERS:
        timers(name, log_level=1)
    return timers


def report_timers(timers, logging_config: LoggingConfig, writers: MetricsWriters,
                  iteration: int, iterations: int, device: torch.device) -> Optional[str]:
    """Mean per-iteration time of each training timer over the last ``iterations`` iterations,
    as Megatron's "(min, max) time across ranks (ms)" block; the maximum over ranks goes to the
    writers as ``<name>-time`` (ms). Resets the timers. Collective: call on every rank.

    Returns the block on the logging rank, None elsewhere or at ``--timing-log-level 0``.
    """
    if logging_config.timing_log_level < 1:
        return None
    elapsed = torch.tensor([timers(name).elapsed(reset=False) for name in TRAINING_TIMERS],
                           dtype=torch.float64, device=device)
    torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    for name, seconds in zip(TRAINING_TIMERS, elapsed.tolist()):
        if seconds > 0:  # a timer that never ran (no teacher): nothing to report
            writers.add_scalar(f"{name}-time", seconds * 1000.0 / iterations, iteration)
    text = timers.get_all_timers_string(list(TRAINING_TIMERS), normalizer=iterations, reset=True)
    return text if is_logging_rank() else None


def tokens_per_second(tokens_per_iteration: int, elapsed_ms: Sequence[float]) -> float:
    """Global training throughput over the given iterations' wall times."""
    seconds = sum(elapsed_ms) / 1000.0
    return tokens_per_iteration * len(elapsed_ms) / seconds if seconds > 0 else 0.0


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class ProgressMeter:
    """Progress line with an ETA from this run's mean wall time per iteration (validation
    included), e.g. ``progress: 25.0% (10/40 iterations) | elapsed: 0:00:12 | ETA: 0:00:36``."""

    def __init__(self, train_iters: int, start_iteration: int) -> None:
        self.train_iters = train_iters
        self.start_iteration = start_iteration
        self.start_time = time.perf_counter()

    def line(self, iteration: int) -> str:
        elapsed = time.perf_counter() - self.start_time
        done = iteration - self.start_iteration
        remaining = self.train_iters - iteration
        eta = _clock(elapsed / done * remaining) if done > 0 else "unknown"
        percent = 100.0 * iteration / self.train_iters
        return (f" progress: {percent:5.1f}% ({iteration}/{self.train_iters} iterations) | "
                f"elapsed: {_clock(elapsed)} | ETA: {eta}")
