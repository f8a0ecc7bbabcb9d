"""Teacher windows: an iteration's microbatches in groups of W, teacher then student per group.

Unwindowed, the teacher's forward-only pass runs over all ``n`` microbatches of an iteration
before the student's schedule, and the last pipeline stage holds every microbatch's teacher
output: ``n x b x s x V/tp`` logits (or ``n x b x s`` top-k entries). With a window of ``W``
microbatches the teacher runs over ``W``, the student's schedule over the same ``W`` with
gradients accumulating in the DDP buffers, and so on; the held teacher output is at most
``W x b x s x V/tp``. Gradients are finalized (DP all-reduce, division by the iteration's token
count) once, after the last window, and the optimizer steps once per iteration, as before.

Each microbatch's forward and backward are the same computation as unwindowed and gradients
accumulate in the same order, so losses and gradients are bitwise equal. The cost is one
pipeline flush per window: each schedule call has ``pp - 1`` bubble slots, so the bubble grows
from ``(pp - 1) / (n + pp - 1)`` to ``(pp - 1) / (W + pp - 1)`` of the step. With PP = 1 there
is no bubble and a window costs nothing measurable.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, TypeVar

import torch

from megakd.configs import KDConfig
from megakd.configs.kd import AUTO_TEACHER_WINDOW_GIB

AUTO_WINDOW_BUDGET_BYTES = AUTO_TEACHER_WINDOW_GIB * 2**30

T = TypeVar("T")


def teacher_output_bytes(kd: KDConfig, micro_batch_size: int, seq_length: int,
                         vocab_shard: int, logits_bytes: int, topk_token_bytes: int) -> int:
    """Bytes of one microbatch's teacher output on the last stage: the logits shard
    ``[b, s, V/tp]`` (dense KD) or ``b x s`` top-k entries (``--kd-topk``, ``--teacher-cache``)."""
    per_token = topk_token_bytes if kd.topk is not None else vocab_shard * logits_bytes
    return micro_batch_size * seq_length * per_token


def resolve_teacher_window(kd: KDConfig, num_microbatches: int, bytes_per_microbatch: int,
                           min_window: int = 1,
                           budget_bytes: int = AUTO_WINDOW_BUDGET_BYTES) -> int:
    """Microbatches per teacher window: ``--kd-teacher-window`` when set (capped at the
    iteration's microbatches); otherwise every microbatch when their outputs fit in
    ``budget_bytes``, else the most that fit. ``min_window`` (PP with virtual pipeline
    stages: megatron's interleaved schedule needs that many microbatches per call) bounds
    every window of the auto choice from below, the last one included."""
    if not kd.uses_teacher:
        return num_microbatches
    if kd.teacher_window:
        return min(kd.teacher_window, num_microbatches)
    fitting = max(1, budget_bytes // max(1, bytes_per_microbatch))
    for window in range(min(num_microbatches, fitting), min_window - 1, -1):
        remainder = num_microbatches % window
        if window >= min_window and (remainder == 0 or remainder >= min_window):
            return window
    return num_microbatches


def windows(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive groups of ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


class WindowedGradients:
    """Gradient accumulation across several calls of megatron-core's schedule in one iteration.

    A schedule call normally ends by calling ``config.finalize_model_grads_func`` (DP
    all-reduce of the grad buffers, division by the call's token count) and lets DDP sync
    gradients on its last microbatch. Inside :meth:`window` for every window but the last,
    grad sync stays disabled for the whole call and finalize only records the call's token
    count; the last window's finalize gets the iteration's total. No communication is added.
    """

    def __init__(self, chunks: List[torch.nn.Module]) -> None:
        from megatron.core.utils import get_model_config

        self.chunks = chunks
        self.config = get_model_config(chunks[0])
        self._earlier_tokens: Optional[torch.Tensor] = None

    @contextlib.contextmanager
    def window(self, last: bool):
        config = self.config
        saved = (config.finalize_model_grads_func, config.no_sync_func, config.grad_sync_func)
        finalize = saved[0]
        try:
            if last:
                if finalize is not None:
                    config.finalize_model_grads_func = self._finalizer(finalize)
                yield
            else:
                config.finalize_model_grads_func = self._record_tokens
                config.no_sync_func = contextlib.nullcontext  # grad sync stays off, below
                config.grad_sync_func = None
                with contextlib.ExitStack() as stack:
                    for chunk in self.chunks:
                        if hasattr(chunk, "no_sync"):
                            stack.enter_context(chunk.no_sync())
                    yield
        finally:
            config.finalize_model_grads_func, config.no_sync_func, config.grad_sync_func = saved
            if last:
                self._earlier_tokens = None

    def _record_tokens(self, model, num_tokens=None, *args, **kwargs) -> None:
        if num_tokens is not None:
            self._earlier_tokens = (num_tokens.clone() if self._earlier_tokens is None
                                    else self._earlier_tokens + num_tokens)

    def _finalizer(self, finalize):
        def finalize_iteration(model, num_tokens=None, *args, **kwargs):
            if num_tokens is not None and self._earlier_tokens is not None:
                num_tokens = num_tokens + self._earlier_tokens
            return finalize(model, num_tokens, *args, **kwargs)

        return finalize_iteration
