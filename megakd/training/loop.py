"""The training loop: iterations of (microbatches, teacher outputs, student forward-backward,
optimizer step), with hooks after each step, after each validation and before each save."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch

from megakd.configs import LoggingConfig
from megakd.formats.checkpoints import remove_staging_dirs
from megakd.formats.root_lock import REFRESH_SECONDS, RootLock
from megakd.models.moe import router_loss_report
from megakd.runtime import watchdog
from megakd.distill import reduce_reported
from megakd.training.checkpointing import save_checkpoint
from megakd.training.evaluation import (
    ValidationRecord,
    Validator,
    format_validation,
    validation_scalars,
)
from megakd.training.exits import ExitConditions
from megakd.training.nonfinite import guarded_optimizer_step
from megakd.training.observability import (
    MetricsWriters,
    ProgressMeter,
    build_metrics_writers,
    build_timers,
    is_logging_rank,
    report_timers,
    tokens_per_second,
)
from megakd.training.state import TrainingHooks, TrainingState


@dataclass
class IterationRecord:
    iteration: int
    consumed_samples: int
    learning_rate: float
    # token means (last pipeline stage only): "lm loss", "kd loss" (logits), "hidden loss"
    # (--kd-intermediate-pairs: summed over the pairs, reduced from the stages that own them)
    losses: Dict[str, float]
    grad_norm: Optional[float]
    skipped: bool
    elapsed_ms: float
    # the microbatch source's figures (student samples: generated tokens, generation seconds)
    data: Dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingHistory:
    records: List[IterationRecord] = field(default_factory=list)
    validations: List[ValidationRecord] = field(default_factory=list)
    exit_reason: Optional[str] = None  # set when an --exit-* condition stopped training early

    def first_last(self, name: str):
        values = [r.losses[name] for r in self.records if name in r.losses]
        return (values[0], values[-1]) if values else (None, None)


def format_log_line(record: IterationRecord, train_iters: int, global_batch_size: int,
                    skipped_total: int, tokens_per_second: Optional[float] = None) -> str:
    """One line in Megatron-LM's training-log format (throughput with ``--log-throughput``)."""
    parts = [
        f" iteration {record.iteration:8d}/{train_iters:8d}",
        f"consumed samples: {record.consumed_samples:12d}",
        f"elapsed time per iteration (ms): {record.elapsed_ms:.1f}",
    ]
    if tokens_per_second is not None:
        parts.append(f"throughput (tokens/s): {tokens_per_second:.1f}")
    parts += [
        f"learning rate: {record.learning_rate:.6E}",
        f"global batch size: {global_batch_size:5d}",
    ]
    for name in ("lm loss", "kd loss", "hidden loss", "load_balancing_loss"):
        if name in record.losses:
            parts.append(f"{name}: {record.losses[name]:.6E}")
    if record.grad_norm is not None:
        parts.append(f"grad norm: {record.grad_norm:.3f}")
    parts.append(f"number of skipped iterations: {skipped_total:3d}")
    generation_s = record.data.get("generation seconds", 0.0)
    if generation_s > 0:
        share = 100.0 * generation_s * 1000.0 / max(record.elapsed_ms, 1e-9)
        parts.append(f"generation: {generation_s * 1000:.0f} ms ({share:.0f}% of the step), "
                     f"{record.data['generated tokens'] / generation_s:.1f} generated tokens/s")
    return " | ".join(parts) + " |"


def train_step(state: TrainingState, timers=None) -> IterationRecord:
    """One iteration on this rank; returns the reduced losses (meaningful on the last stage).

    ``timers`` (from :func:`~megakd.training.observability.build_timers`) time data loading,
    the teacher pass, the student's forward-backward and the optimizer step.
    """
    from megatron.core import parallel_state

    train = state.config.training
    timers = timers if timers is not None else build_timers(LoggingConfig())
    start = time.perf_counter()
    timers("batch-generator", log_level=1).start()
    microbatches = state.source.microbatches(state.consumed_samples)
    timers("batch-generator").stop()
    for chunk in state.student:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    per_microbatch = state.step.run(microbatches, timers=timers)
    router = router_loss_report(state.config.student, len(microbatches))  # collective; MoE
    timers("optimizer", log_level=1).start()
    outcome = guarded_optimizer_step(state.optimizer, per_microbatch,
                                     train.check_for_nan_in_loss_and_grad, state.runtime.device)
    timers("optimizer").stop()
    if outcome.updated:
        state.scheduler.step(increment=train.global_batch_size)
    state.iteration += 1
    state.consumed_samples += train.global_batch_size
    state.skips.after_step(outcome, state.iteration)  # stops a diverged run here
    losses = {**reduce_reported(per_microbatch, parallel_state.get_data_parallel_group()),
              **router}
    return IterationRecord(
        iteration=state.iteration,
        consumed_samples=state.consumed_samples,
        learning_rate=state.optimizer.param_groups[0]["lr"],
        losses=losses,
        grad_norm=outcome.grad_norm,
        skipped=not outcome.updated,
        elapsed_ms=(time.perf_counter() - start) * 1000.0,
        data=state.source.report(),
    )


def _report_iteration(state: TrainingState, history: TrainingHistory, timers,
                      writers: MetricsWriters, progress: ProgressMeter, log) -> None:
    """The log line, timers and progress line (logging rank) and the training scalars
    (TensorBoard/W&B). Every rank calls it: the timers are gathered over ranks."""
    config = state.config
    train = config.training
    record = history.records[-1]
    interval = history.records[-train.log_interval:]
    throughput = tokens_per_second(train.global_batch_size * config.data.seq_length,
                                   [r.elapsed_ms for r in interval])
    timing = report_timers(timers, config.logging, writers, record.iteration, len(interval),
                           state.runtime.device)
    if not is_logging_rank():
        return
    log(format_log_line(record, train.train_iters, train.global_batch_size, state.skips.skipped,
                        throughput if config.logging.log_throughput else None))
    if timing:
        log(timing)
    log(progress.line(record.iteration))
    writers.add_scalars({
        "lm loss": record.losses.get("lm loss"),
        "kd loss": record.losses.get("kd loss"),
        "hidden loss": record.losses.get("hidden loss"),
        "load-balancing-loss": record.losses.get("load_balancing_loss"),
        "total loss": config.kd.objective(record.losses.get("lm loss"),
                                          record.losses.get("kd loss"),
                                          record.losses.get("hidden loss")),
        "learning-rate": record.learning_rate,
        "grad-norm": record.grad_norm,
        "tokens-per-sec": throughput,
        "iteration-time": record.elapsed_ms,
        "skipped-iterations": state.skips.skipped,
        "generation-time": record.data.get("generation seconds", 0.0) * 1000.0 or None,
        "generated-tokens": record.data.get("generated tokens") or None,
    }, record.iteration)
    writers.flush()


def _validate(validator: Validator, title: str, history: TrainingHistory,
              writers: MetricsWriters, hooks: TrainingHooks, log) -> None:
    """One validation of the student; printed and written on the logging rank, next to the
    teacher's baseline (so both curves share a chart); then the after-validation hooks."""
    iteration = validator.state.iteration
    losses = validator.student_losses()
    record = ValidationRecord(iteration, "student", losses)
    history.validations.append(record)
    if is_logging_rank():
        log(format_validation(title, losses))
        if validator.last_example:
            log(validator.last_example)
        writers.add_scalars(validation_scalars(losses), iteration)
        for baseline in (v for v in history.validations if v.model == "teacher"):
            writers.add_scalars(validation_scalars(baseline.losses, "teacher "), iteration)
        writers.flush()
    for hook in hooks.after_validation:
        hook(validator.state, record)


def _validate_teacher(validator: Validator, history: TrainingHistory,
                      writers: MetricsWriters, log) -> None:
    """The teacher's own validation CE, once, before training: the student's target."""
    if not validator.has_teacher:
        return
    losses = validator.teacher_losses()
    history.validations.append(ValidationRecord(validator.state.iteration, "teacher", losses))
    if is_logging_rank():
        log(format_validation("teacher validation loss (baseline)", losses))
        writers.add_scalars(validation_scalars(losses, "teacher "), validator.state.iteration)


def checkpoint_and_check_exit(state: TrainingState, exits: ExitConditions,
                              hooks: Optional[TrainingHooks] = None, log=print) -> Optional[str]:
    """After an iteration: save when ``--save-interval``, the last iteration or an exit
    condition says so (needs ``--save``); returns the exit reason, the same on every rank."""
    ckpt = state.config.checkpoint
    reason = exits.check(state.iteration)
    interval_due = ckpt.save_interval is not None and state.iteration % ckpt.save_interval == 0
    last = state.iteration >= state.config.training.train_iters
    if ckpt.save and (reason or interval_due or last):
        for hook in (hooks.before_save if hooks else ()):
            hook(state)
        save_checkpoint(state, ckpt.save, log=log)
    if reason and torch.distributed.get_rank() == 0:
        log(f"megakd: exiting at iteration {state.iteration} ({reason})")
    return reason


@contextlib.contextmanager
def _owning_save_root(state: TrainingState, log) -> Iterator[None]:
    """With ``--save``: rank 0 owns the root for the block (one writer per checkpoint root,
    :mod:`megakd.formats.root_lock`), refreshes the lock from the watchdog thread, and clears
    what interrupted saves left behind; the lock is released at the end."""
    root = state.config.checkpoint.save
    if root is None or torch.distributed.get_rank() != 0:
        yield
        return
    lock = RootLock(root)
    lock.acquire(log)
    stale = remove_staging_dirs(root)
    if stale:
        log(f"megakd: removed {len(stale)} staging director{'y' if len(stale) == 1 else 'ies'} "
            f"of interrupted saves in {root}")
    state.save_lock = lock
    watchdog.every(REFRESH_SECONDS, lock.refresh)
    try:
        yield
    finally:
        state.save_lock = None
        lock.release()


def train(state: TrainingState, log=print, hooks: Optional[TrainingHooks] = None
          ) -> TrainingHistory:
    """Run until ``--train-iters`` or an ``--exit-*`` condition, logging every
    ``--log-interval`` iterations and checkpointing as :func:`checkpoint_and_check_exit` says.
    With ``--eval-interval``: the teacher's validation baseline first, a validation every
    interval, and one at the end of training (not after an early exit)."""
    train_config = state.config.training
    hooks = (state.hooks or TrainingHooks()) + (hooks or TrainingHooks())
    history = TrainingHistory()
    exits = ExitConditions(state.config.checkpoint, state.runtime.device)
    writers = build_metrics_writers(state.config)
    timers = build_timers(state.config.logging)
    progress = ProgressMeter(train_config.train_iters, state.iteration)
    validator = Validator(state) if state.config.eval.interval else None
    with _owning_save_root(state, log), exits.installed(), contextlib.closing(writers):
        if validator is not None:
            _validate_teacher(validator, history, writers, log)
            if validator.initial and state.iteration == 0:
                _validate(validator, "validation loss before training", history, writers,
                          hooks, log)
        while state.iteration < train_config.train_iters:
            record = train_step(state, timers)
            history.records.append(record)
            for hook in hooks.after_step:
                hook(state, record)
            if record.iteration % train_config.log_interval == 0:
                _report_iteration(state, history, timers, writers, progress, log)
            if validator is not None and validator.due(record.iteration):
                _validate(validator, f"validation loss at iteration {record.iteration}",
                          history, writers, hooks, log)
            history.exit_reason = checkpoint_and_check_exit(state, exits, hooks, log=log)
            if history.exit_reason:
                break
        if validator is not None and not history.exit_reason:
            _validate(validator, f"validation loss at the end of training (iteration "
                                 f"{state.iteration})", history, writers, hooks, log)
    return history
