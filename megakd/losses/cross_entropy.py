"""Vocab-parallel cross entropy that leaves the caller's logits untouched.

megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy`` normalises in place on
``logits.float()``, which *is* the caller's tensor when the logits are fp32 (DESIGN.md). This
version copies the valid columns of the shard into its own fp32 buffer (the one buffer it keeps
for backward, as the softmax) and excludes padded vocab entries from the softmax.
Communication: two ``[N]`` all-reduces (log-normalizer) and one ``[N]`` all-reduce (target
logit).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import _vocab_parallel as vp


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        start: int,
        n_valid: int,
        group: Optional[dist.ProcessGroup],
    ) -> torch.Tensor:
        local_vocab = logits.shape[-1]
        x2d = logits.reshape(-1, local_vocab)
        n_rows = x2d.shape[0]
        buf = torch.empty((n_rows, local_vocab), dtype=torch.float32, device=logits.device)
        x = buf[:, :n_valid]
        vp.load_scaled_(x, x2d[:, :n_valid], 1.0)
        lse = vp.combine_logsumexp(*vp.local_logsumexp_stats(x, prepared=True), group)

        cols = vp.local_cols(target.reshape(-1, 1), start, n_valid)  # [N, 1], -1 if elsewhere
        here = cols[:, 0] >= 0
        predicted = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
        if n_valid > 0:
            predicted = torch.where(here, x.gather(1, cols.clamp_min(0))[:, 0], predicted)
        vp.all_reduce_(predicted, group, op="sum")
        loss = lse - predicted

        x.sub_(lse.unsqueeze(-1)).exp_()  # buf now holds the softmax (valid columns)
        ctx.save_for_backward(buf, cols)
        ctx.n_valid = n_valid
        ctx.input_shape = logits.shape
        return loss.reshape(target.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        buf, cols = ctx.saved_tensors
        n_valid = ctx.n_valid
        softmax = buf[:, :n_valid]
        here = cols[:, 0] >= 0
        if bool(here.any()):
            rows = torch.nonzero(here, as_tuple=True)[0]
            softmax[rows, cols[rows, 0]] -= 1.0
        softmax.mul_(grad_output.reshape(-1, 1).to(torch.float32))
        buf[:, n_valid:].zero_()
        return buf.view(ctx.input_shape), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    valid_vocab_size: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token cross entropy ``[...]`` (fp32) of global ``target`` ids ``[...]``.

    ``logits`` is this rank's shard ``[..., V/tp]`` (fp32 or bf16); padded entries (ids ``>=
    valid_vocab_size``) are excluded from the softmax. A target outside ``[0, valid)`` (e.g. an
    ignore index) contributes no target term (loss = log-normalizer): mask it out. ``logits``
    is never modified; differentiable w.r.t. ``logits``.
    """
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target {tuple(target.shape)} must match logits {tuple(logits.shape)} without the vocab dim"
        )
    start, n_valid = vp.shard_bounds(logits.shape[-1], valid_vocab_size, tp_group)
    return _VocabParallelCrossEntropy.apply(logits, target, start, n_valid, tp_group)
