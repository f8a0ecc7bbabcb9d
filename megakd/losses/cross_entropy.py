"""Vocab-parallel cross entropy that leaves the caller's logits untouched.

megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy`` normalises in place on
``logits.float()``, which *is* the caller's tensor when the logits are fp32 (DESIGN.md). This
version never writes to its input: it keeps a reference to the logits and the ``[N]``
log-normalizer, recomputes the softmax row chunk by row chunk in backward straight into the one
fp32 ``[N, V/tp]`` tensor it allocates (the gradient), and excludes padded vocab entries from
the softmax. Communication: two ``[N]`` all-reduces (log-normalizer) and one ``[N]``
all-reduce (target logit).
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
        x = logits.reshape(-1, logits.shape[-1])[:, :n_valid]
        lse = vp.vocab_parallel_logsumexp(x, 1.0, group)
        cols = vp.local_cols(target.reshape(-1, 1), start, n_valid)  # [N, 1], -1 if elsewhere
        predicted = torch.zeros(x.shape[0], dtype=torch.float32, device=logits.device)
        if n_valid > 0:
            picked = vp.scaled_fp32(x.gather(1, cols.clamp_min(0))[:, 0], 1.0)
            predicted = torch.where(cols[:, 0] >= 0, picked, predicted)
        vp.all_reduce_(predicted, group, op="sum")
        ctx.save_for_backward(logits, cols, lse)
        ctx.n_valid = n_valid
        return (lse - predicted).reshape(target.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        logits, cols, lse = ctx.saved_tensors
        n_valid = ctx.n_valid
        x = logits.reshape(-1, logits.shape[-1])[:, :n_valid]
        n_rows = x.shape[0]
        scale = grad_output.reshape(-1).to(torch.float32)
        grad = torch.empty((n_rows, logits.shape[-1]), dtype=torch.float32, device=logits.device)
        grad[:, n_valid:].zero_()
        if n_valid > 0:
            for sl in vp.row_chunks(n_rows, n_valid):  # softmax - onehot(target)
                grad[sl, :n_valid] = vp.log_probs_chunk(x, sl, 1.0, lse).exp_()
            here = torch.nonzero(cols[:, 0] >= 0, as_tuple=True)[0]
            grad[here, cols[here, 0]] -= 1.0
            grad[:, :n_valid].mul_(scale.unsqueeze(-1))
        return grad.view(logits.shape), None, None, None, None


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
            f"target {tuple(target.shape)} must match logits {tuple(logits.shape)} "
            "without the vocab dim"
        )
    start, n_valid = vp.shard_bounds(logits.shape[-1], valid_vocab_size, tp_group)
    return _VocabParallelCrossEntropy.apply(logits, target, start, n_valid, tp_group)
