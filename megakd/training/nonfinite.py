"""A diverged run is caught at the first non-finite value, before it reaches the weights.

Each iteration, after the student's forward-backward and before the optimizer step:

* the last pipeline stage turns its reported loss sums into two flags (CE, KD non-finite),
  all-reduced (MAX) over all ranks in one small asynchronous collective that overlaps the
  gradient-norm computation;
* the global gradient norm (megatron-core's, the one clipping uses) is checked on every rank.

Both are the same on every rank, so every rank takes the same decision: by default stop with
a :class:`DivergenceError` naming the iteration, what went non-finite and the last good
checkpoint (the optimizer step is not taken and nothing is saved); with
``--skip-nonfinite-iterations`` skip the step and stop only after too many skips. A KD loss
that is non-finite while the student's own CE is finite comes from the teacher's outputs (a
broken ``--teacher-load``), and is reported as such. :func:`check_finite_state` refuses to save
non-finite weights or optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from megakd.configs import CheckpointConfig, TrainingConfig
from megakd.formats.checkpoints import checkpoint_name, read_tracker

_LOSS_NAMES = ("lm loss", "kd loss")


class DivergenceError(RuntimeError):
    """The run produced a non-finite loss or gradient (or would save non-finite state)."""

    exit_status = 3


@dataclass(frozen=True)
class NonFinite:
    """What was non-finite in one iteration (the same on every rank)."""

    lm_loss: bool
    kd_loss: bool
    grad_norm: bool

    @property
    def teacher_fault(self) -> bool:
        """KD non-finite while the student's own CE is finite: the teacher's outputs are."""
        return self.kd_loss and not self.lm_loss

    def describe(self, teacher_flag: str) -> str:
        if self.teacher_fault:
            return (f"the KD loss is non-finite while the student's own CE is finite: the "
                    f"teacher's outputs hold NaN/inf (check {teacher_flag})")
        parts = [name for name, bad in (("lm loss", self.lm_loss), ("kd loss", self.kd_loss),
                                        ("gradient norm", self.grad_norm)) if bad]
        return f"non-finite {' and '.join(parts)} (the student diverged)"


@dataclass
class StepOutcome:
    updated: bool
    grad_norm: Optional[float]
    nonfinite: Optional[NonFinite]


def _loss_flags(per_microbatch: List[Dict[str, torch.Tensor]],
                device: torch.device) -> torch.Tensor:
    """``[2]`` float: 1 where this rank's summed CE / KD is non-finite (zeros off the last
    stage). Built on ``device`` without a host synchronisation."""
    flags = []
    for name in _LOSS_NAMES:
        sums = [mb[name][0] for mb in per_microbatch if name in mb]
        total = torch.stack(sums).sum() if sums else torch.zeros((), device=device)
        flags.append((~torch.isfinite(total)).to(device=device, dtype=torch.float32))
    return torch.stack(flags)


def _clip(optimizer, grad_norm: float) -> None:
    """Clip every (chained) optimizer's gradients by the global norm, as megatron's step."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(inner, "is_stub_optimizer", False) or inner.config.clip_grad <= 0.0:
            continue
        parameters = inner.get_parameters()
        if parameters:
            clip_grad_by_total_norm_fp32(
                parameters, max_norm=inner.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


def guarded_optimizer_step(optimizer, per_microbatch: List[Dict[str, torch.Tensor]],
                           check: bool, device: torch.device) -> StepOutcome:
    """megatron-core's optimizer step (prepare grads, global grad norm, clip, update) with the
    non-finite check between the norm and the update. Collective: call on every rank."""
    if not check:
        updated, grad_norm, _ = optimizer.step()
        return StepOutcome(updated, None if grad_norm is None else float(grad_norm), None)
    flags = _loss_flags(per_microbatch, device)
    reduction = torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX,
                                             async_op=True)
    found_inf = optimizer.prepare_grads()  # loss-scaler overflow (fp16 only)
    grad_norm = float(optimizer.get_grad_norm())
    reduction.wait()
    lm_bad, kd_bad = (bool(v) for v in flags.tolist())
    nonfinite = NonFinite(lm_bad, kd_bad, bool(found_inf) or not torch.isfinite(
        torch.tensor(grad_norm)).item())
    if nonfinite.lm_loss or nonfinite.kd_loss or nonfinite.grad_norm:
        return StepOutcome(False, grad_norm, nonfinite)
    _clip(optimizer, grad_norm)
    return StepOutcome(optimizer.step_with_ready_grads(), grad_norm, None)


def last_good_checkpoint(ckpt: CheckpointConfig) -> str:
    """Where the run's last good checkpoint is (what a relaunch resumes from)."""
    for root in (ckpt.save, ckpt.load):
        if root is not None:
            tracked = read_tracker(root)
            if tracked is not None:
                name = tracked if tracked == "release" else checkpoint_name(int(tracked))
                return f"{root}/{name}"
    return "none saved by this run yet"


class SkipPolicy:
    """Stops or skips on a non-finite iteration (``--skip-nonfinite-iterations`` and its
    limits); its counters travel in the training checkpoint."""

    def __init__(self, training: TrainingConfig, ckpt: CheckpointConfig) -> None:
        self.training, self.ckpt = training, ckpt
        self.skipped = 0  # in the whole run
        self.consecutive = 0

    def state_dict(self) -> Dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])

    def after_step(self, outcome: StepOutcome, iteration: int) -> None:
        """``iteration``: the one just run. Raises DivergenceError when the run must stop."""
        if outcome.nonfinite is None:
            self.consecutive = 0
            return
        teacher_flag = "--teacher-cache" if self.ckpt.teacher_cache else "--teacher-load"
        what = outcome.nonfinite.describe(teacher_flag)
        where = f"last good checkpoint: {last_good_checkpoint(self.ckpt)}"
        train = self.training
        if not train.skip_nonfinite_iterations:
            raise DivergenceError(f"iteration {iteration}: {what}; stopped before the optimizer "
                                  f"step, nothing saved; {where}")
        self.skipped += 1
        self.consecutive += 1
        for count, limit, flag in (
                (self.consecutive, train.max_consecutive_skipped_iterations,
                 "--max-consecutive-skipped-iterations"),
                (self.skipped, train.max_skipped_iterations, "--max-skipped-iterations")):
            if count >= limit:
                raise DivergenceError(f"iteration {iteration}: {what}; {count} skipped "
                                      f"iterations reach {flag}={limit}; stopped, nothing "
                                      f"saved; {where}")


def check_finite_state(chunks: List[torch.nn.Module], optimizer, device: torch.device) -> None:
    """Collective: refuse (DivergenceError) to save weights or optimizer state holding
    NaN/inf. One pass over this rank's parameters and optimizer state, one all-reduce."""
    bad = torch.zeros(1, dtype=torch.float32, device=device)
    with torch.no_grad():
        tensors = [p for chunk in chunks for p in chunk.parameters()]
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            for slot in inner.optimizer.state.values():
                tensors += [v for v in slot.values() if torch.is_tensor(v) and v.is_floating_point()]
        for tensor in tensors:
            if not bool(torch.isfinite(tensor).all()):
                bad.fill_(1.0)
                break
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item():
        raise DivergenceError("refusing to save a checkpoint: the weights or the optimizer "
                              "state hold NaN/inf (the tracker still names the last good one)")
