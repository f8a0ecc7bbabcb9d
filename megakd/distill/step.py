"""One distillation iteration's forward and backward: teacher outputs, then the student."""

from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from megakd.data import Microbatch
from megakd.distill.hidden import HiddenStateKD
from megakd.distill.loss import DistillationLoss, GlobalTokenCounts, count_global_tokens
from megakd.distill.schedules import forward_backward_func, microbatch_iterators
from megakd.distill.teachers import TeacherOutput, TeacherSource
from megakd.distill.window import WindowedGradients, windows


class DistillationStep:
    """Runs forward and backward for one iteration's microbatches on this rank.

    Per teacher window of ``window`` microbatches (:mod:`megakd.distill.window`; all of them
    unless ``--kd-teacher-window`` or its auto choice splits the iteration): the teacher source
    (when the KD weight is > 0) produces the window's outputs (a live teacher runs
    forward-only), then the student runs megatron-core's forward-backward schedule over the
    window with :class:`DistillationLoss` on its last stage. Gradients accumulate in the DDP
    buffers and are finalized (DP all-reduce, token scaling) once per iteration by
    megatron-core's ``finalize_model_grads``; the optimizer step is the caller's.

    With ``hidden`` (``--kd-intermediate-pairs``, :mod:`megakd.distill.hidden`), the teacher's
    paired hidden states are sent to the student's stages after each teacher window, the
    hidden-state losses are attached on the stages that own the student layers, and the
    report gains ``"hidden loss"``.
    """

    def __init__(
        self,
        student_chunks: List[torch.nn.Module],
        teacher: Optional[TeacherSource],
        loss: DistillationLoss,
        seq_length: int,
        micro_batch_size: int,
        dp_group,
        window: Optional[int] = None,
        hidden: Optional[HiddenStateKD] = None,
    ) -> None:
        self.student_chunks = student_chunks
        self.teacher = teacher
        self.loss = loss
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.dp_group = dp_group
        self.window = window  # microbatches per teacher window; None: the whole iteration
        self.gradients = WindowedGradients(student_chunks)
        self.hidden = hidden

    def _student_forward_step(self, teacher_outputs: Dict[int, TeacherOutput],
                              counts: GlobalTokenCounts, data_iterator: Iterator[Microbatch],
                              model: torch.nn.Module):
        batch = next(data_iterator)
        hidden = (self.hidden.student_microbatch(batch, counts) if self.hidden is not None
                  else contextlib.nullcontext())
        with hidden:  # the hidden-state losses of this chunk's paired layers, if any
            # [b, s, V/tp] on the last stage; attention_mask is None unless sequences are packed
            logits = model(batch.tokens, batch.position_ids, batch.attention_mask)
        teacher_output = teacher_outputs[batch.index] if teacher_outputs else None
        return logits, functools.partial(self.loss, batch, teacher_output, counts)

    def run(self, microbatches: Sequence[Microbatch], forward_only: bool = False,
            timers=None) -> List[Dict[str, torch.Tensor]]:
        """Forward (and backward unless ``forward_only``) over the microbatches.

        Returns, on the last pipeline stage, one ``{name: tensor([sum, count])}`` per microbatch
        (``"hidden loss"`` included, reduced over the stages that hold it).
        ``timers`` (megatron-core ``Timers``) times ``teacher-forward`` and ``forward-backward``
        (the student's schedule, loss included), summed over windows.
        """
        counts = count_global_tokens(microbatches, self.loss.kd, self.dp_group)
        groups = list(windows(microbatches, self.window or len(microbatches)))
        reported: List[Dict[str, torch.Tensor]] = []
        for number, window in enumerate(groups):
            last = number == len(groups) - 1
            with self.gradients.window(last) if not forward_only else contextlib.nullcontext():
                reported += self._run_window(window, counts, forward_only, timers)
        if self.hidden is not None:
            reported = self.hidden.report(reported, microbatches)
        return reported

    def _run_window(self, window: Sequence[Microbatch], counts: GlobalTokenCounts,
                    forward_only: bool, timers) -> List[Dict[str, torch.Tensor]]:
        """The teacher's outputs for ``window`` (held only while it runs), then the student's
        schedule over it."""
        with _timed(timers, "teacher-forward"):
            outputs = self.teacher.outputs(window) if self.teacher else []
            if self.hidden is not None:
                self.hidden.exchange(window)  # teacher hidden states to the student's stages
        teacher_outputs = {batch.index: output for batch, output in zip(window, outputs)}
        step = functools.partial(self._student_forward_step, teacher_outputs, counts)
        num_chunks = len(self.student_chunks)
        with torch.set_grad_enabled(not forward_only), _timed(timers, "forward-backward"), \
                _end_window(self.hidden):
            return forward_backward_func(num_chunks)(
                forward_step_func=step,
                data_iterator=microbatch_iterators(window, num_chunks),
                model=self.student_chunks,
                num_microbatches=len(window),
                seq_length=self.seq_length,
                micro_batch_size=self.micro_batch_size,
                forward_only=forward_only,
            )


@contextlib.contextmanager
def _end_window(hidden: Optional[HiddenStateKD]):
    """Free the window's teacher hidden states once the student's schedule has used them."""
    try:
        yield
    finally:
        if hidden is not None:
            hidden.end_window()


@contextlib.contextmanager
def _timed(timers, name: str):
    """Time the block with megatron-core ``Timers`` at log level 1 (no-op without timers)."""
    if timers is None:
        yield
        return
    timers(name, log_level=1).start()
    try:
        yield
    finally:
        timers(name, log_level=1).stop()


def reduce_reported(per_microbatch: List[Dict[str, torch.Tensor]], dp_group) -> Dict[str, float]:
    """Token means of each reported loss over microbatches and DP ranks (last stage only)."""
    if not per_microbatch:
        return {}
    names = sorted(per_microbatch[0])
    sums = torch.stack([
        torch.stack([mb[name] for mb in per_microbatch]).sum(dim=0) for name in names
    ]).double()  # [names, 2]: (sum, count)
    if dp_group is not None and torch.distributed.get_world_size(dp_group) > 1:
        torch.distributed.all_reduce(sums, group=dp_group)
    # a loss with no token in the whole batch (CE when every answer is the student's) is absent
    return {name: (sums[i, 0] / sums[i, 1]).item() for i, name in enumerate(names)
            if sums[i, 1] > 0}
