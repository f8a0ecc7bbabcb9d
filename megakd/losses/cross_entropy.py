"""Vocab-parallel cross entropy that leaves the caller's logits untouched.

megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy`` normalises in place on
``logits.float()``, which *is* the caller's tensor when the logits are fp32 (DESIGN.md). This
version never writes to its input: it keeps a reference to the logits and the per-token
log-normaliser (``_vocab_parallel.Normalizer``), recomputes the softmax row chunk by row chunk
in backward straight into the one fp32 ``[N, V/tp]`` tensor it allocates (the gradient), and
excludes padded vocab entries from the softmax. Communication: one ``[N]`` MAX and one
``[N, 2]`` SUM all-reduce (log-normaliser) and one ``[N]`` all-reduce (target logit).
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
        norm = vp.normalizer(x, 1.0, group)
        cols = vp.local_cols(target.reshape(-1, 1), start, n_valid)  # [N, 1], -1 if elsewhere
        predicted = torch.zeros(x.shape[0], dtype=torch.float32, device=logits.device)
        if n_valid > 0:
            picked = vp.scaled_fp32(x.gather(1, cols.clamp_min(0))[:, 0], 1.0)
            predicted = torch.where(cols[:, 0] >= 0, picked, predicted)
        vp.all_reduce_(predicted, group, op="sum")
        target_lp = (predicted - norm.max).double() - norm.log_sum  # log q(target), float64
        ctx.save_for_backward(logits, cols, norm.max, norm.log_sum, target_lp)
        ctx.n_valid = n_valid
        return target_lp.neg().float().reshape(target.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        logits, cols, q_max, q_log_sum, target_lp = ctx.saved_tensors
        n_valid = ctx.n_valid
        norm = vp.Normalizer(q_max, q_log_sum)
        x = logits.reshape(-1, logits.shape[-1])[:, :n_valid]
        n_rows = x.shape[0]
        scale = grad_output.reshape(-1).to(torch.float32)
        grad = torch.empty((n_rows, logits.shape[-1]), dtype=torch.float32, device=logits.device)
        grad[:, n_valid:].zero_()
        if n_valid > 0:
            for sl in vp.row_chunks(n_rows, n_valid):  # softmax - onehot(target)
                grad[sl, :n_valid] = norm.log_probs(x, sl, 1.0).exp_()
            here = torch.nonzero(cols[:, 0] >= 0, as_tuple=True)[0]
            # q - 1 at the target, as expm1(log q): no cancellation where q saturates
            grad[here, cols[here, 0]] = torch.expm1(target_lp[here]).float()
            grad[:, :n_valid].mul_(scale.unsqueeze(-1))
        return grad.view(logits.shape), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    valid_vocab_size: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token cross entropy ``[b, s]`` (fp32) of global ``target`` ids ``[b, s]``.

    ``logits`` is this rank's shard ``[b, s, V/tp]`` (any leading dims; fp32 or bf16); padded
    entries (ids ``>= valid_vocab_size``) are excluded from the softmax. A target outside
    ``[0, valid)`` (e.g. an ignore index) contributes no target term (loss = log-normaliser):
    mask it out. ``logits`` is never modified; differentiable w.r.t. ``logits``.
    """
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target {tuple(target.shape)} must match logits {tuple(logits.shape)} "
            "without the vocab dim"
        )
    start, n_valid = vp.shard_bounds(logits.shape[-1], valid_vocab_size, tp_group)
    return _VocabParallelCrossEntropy.apply(logits, target, start, n_valid, tp_group)
