"""The training loop: iterations of (teacher pass, student forward-backward, optimizer step)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from megakd.data import iteration_microbatches
from megakd.distill import reduce_reported
from megakd.training.setup import TrainingState


@dataclass
class IterationRecord:
    iteration: int
    consumed_samples: int
    learning_rate: float
    losses: Dict[str, float]  # token means: "lm loss", "kd loss" (last pipeline stage only)
    grad_norm: Optional[float]
    skipped: bool
    elapsed_ms: float


@dataclass
class TrainingHistory:
    records: List[IterationRecord] = field(default_factory=list)

    def first_last(self, name: str):
        values = [r.losses[name] for r in self.records if name in r.losses]
        return (values[0], values[-1]) if values else (None, None)


def format_log_line(record: IterationRecord, train_iters: int, global_batch_size: int,
                    skipped_total: int) -> str:
    """One line in Megatron-LM's training-log format."""
    parts = [
        f" iteration {record.iteration:8d}/{train_iters:8d}",
        f"consumed samples: {record.consumed_samples:12d}",
        f"elapsed time per iteration (ms): {record.elapsed_ms:.1f}",
        f"learning rate: {record.learning_rate:.6E}",
        f"global batch size: {global_batch_size:5d}",
    ]
    for name in ("lm loss", "kd loss"):
        if name in record.losses:
            parts.append(f"{name}: {record.losses[name]:.6E}")
    if record.grad_norm is not None:
        parts.append(f"grad norm: {record.grad_norm:.3f}")
    parts.append(f"number of skipped iterations: {skipped_total:3d}")
    return " | ".join(parts) + " |"


def is_logging_rank() -> bool:
    """Megatron logs from the last rank, which sits on the last pipeline stage."""
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def train_step(state: TrainingState) -> IterationRecord:
    """One iteration on this rank; returns the reduced losses (meaningful on the last stage)."""
    from megatron.core import parallel_state

    config = state.config
    train = config.training
    start = time.perf_counter()
    microbatches = iteration_microbatches(
        state.train_dataset, state.consumed_samples, train.global_batch_size,
        train.micro_batch_size, parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(), state.runtime.device,
    )
    for chunk in state.student:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    per_microbatch = state.step.run(microbatches)
    update_ok, grad_norm, _ = state.optimizer.step()
    if update_ok:
        state.scheduler.step(increment=train.global_batch_size)
    state.iteration += 1
    state.consumed_samples += train.global_batch_size
    losses = reduce_reported(per_microbatch, parallel_state.get_data_parallel_group())
    return IterationRecord(
        iteration=state.iteration,
        consumed_samples=state.consumed_samples,
        learning_rate=state.optimizer.param_groups[0]["lr"],
        losses=losses,
        grad_norm=None if grad_norm is None else float(grad_norm),
        skipped=not update_ok,
        elapsed_ms=(time.perf_counter() - start) * 1000.0,
    )


def train(state: TrainingState, log=print) -> TrainingHistory:
    """Run until ``--train-iters``, logging every ``--log-interval`` iterations."""
    train_config = state.config.training
    history = TrainingHistory()
    skipped = 0
    while state.iteration < train_config.train_iters:
        record = train_step(state)
        skipped += int(record.skipped)
        history.records.append(record)
        if is_logging_rank() and record.iteration % train_config.log_interval == 0:
            log(format_log_line(record, train_config.train_iters,
                                train_config.global_batch_size, skipped))
    return history
