"""Teacher top-k across the TP group, and divergences between the teacher's top-k and the
student's vocab shards. The top-k format itself (``TeacherTopK``) is in
``megakd.formats.topk``.

``topk_divergence`` compares (k+1)-bucket distributions: the teacher's k tokens plus one tail
bucket holding everything else (or, with ``renormalize``, the k tokens alone).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megakd.formats.topk import FP8_MAX, TeacherTopK, check_value_dtype

from . import _vocab_parallel as vp
from .divergences import Block, Divergence

_FLOOR = -1e30  # stands in for log(0) of an empty bucket, so 0 * (log 0 - log 0) stays 0


@torch.no_grad()
def teacher_topk(
    teacher_logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    valid_vocab_size: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
    dtype: torch.dtype = torch.bfloat16,
) -> TeacherTopK:
    """Global top-k of softmax(teacher / T) from vocab shards ``[b, s, V/tp]``.

    Each rank takes its local top-k (padding excluded), the group all-gathers the ``k * tp``
    candidates (fp32 values + int64 ids), and every rank keeps the same global top-k, sorted.
    The tail mass is the log-sum-exp over the complement (one ``[N]`` MAX and one ``[N, 2]``
    SUM all-reduce), relative to the top-1 token, so it is exact without cancellation.
    ``dtype``: bfloat16 or float8_e4m3fn (``TOPK_VALUE_DTYPES``), or float32.
    """
    check_value_dtype(dtype)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead, local_vocab = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    total_valid = vp.valid_vocab_total(local_vocab, valid_vocab_size, tp_group)
    if not 1 <= k <= total_valid:
        raise ValueError(f"k={k} must be in [1, valid vocab size {total_valid}]")
    start, n_valid = vp.shard_bounds(local_vocab, valid_vocab_size, tp_group)
    z = teacher_logits.detach().reshape(-1, local_vocab)[:, :n_valid]
    n_rows = z.shape[0]

    # Local candidates, padded to k with (-inf, -1) where the shard has fewer valid entries.
    cand_v = torch.full((n_rows, k), vp.NEG_INF, dtype=torch.float32, device=z.device)
    cand_i = torch.full((n_rows, k), -1, dtype=torch.int64, device=z.device)
    kk = min(k, n_valid)
    if kk > 0:
        v, i = torch.topk(z, kk, dim=-1, sorted=False)
        cand_v[:, :kk] = vp.scaled_fp32(v, temperature)
        cand_i[:, :kk] = i + start
    all_v = vp.all_gather_last_dim(cand_v, tp_group)
    all_i = vp.all_gather_last_dim(cand_i, tp_group)
    top_v, sel = torch.topk(all_v, k, dim=-1, sorted=True)
    top_i = all_i.gather(-1, sel)

    # Everything relative to the top-1 logit: rel = log(p_i / p_1) <= 0, and the tail's
    # log(tail mass / p_1) = (tail max - top-1) + tail log_sum (-inf for an empty tail);
    # per-token arithmetic in float64.
    rel = top_v - top_v[:, :1]
    tail = vp.normalizer(z, temperature, tp_group, vp.local_cols(top_i, start, n_valid))
    top1 = top_v[:, 0].double()
    tail_rel = (tail.max.double() - top1) + tail.log_sum
    others = (top_v[:, 1:].double() - top1.unsqueeze(-1)).exp().sum(-1)
    tail_logprob = (tail_rel - torch.log1p(others + tail_rel.exp())).float()  # / (1 / p_1)

    if dtype == torch.float8_e4m3fn:
        rel = rel.clamp_min(-FP8_MAX)
    return TeacherTopK(
        logprobs=rel.to(dtype).reshape(*lead, k),
        indices=top_i.to(torch.int32).reshape(*lead, k),
        tail_logprob=tail_logprob.reshape(lead),
        temperature=float(temperature),
    )


def _student_buckets(
    z: torch.Tensor, cols: torch.Tensor, temperature: float, renormalize: bool,
    group: Optional[dist.ProcessGroup],
) -> Tuple[torch.Tensor, Optional[vp.Normalizer]]:
    """Student bucket logits ``X`` ``[N, k(+1)]`` (float64) relative to the student's max,
    and the tail's ``Normalizer`` (None with ``renormalize``).

    ``X = (x[idx_1..k], lse_tail) - max``: each rank contributes the logits at the ids it
    owns (one ``[N, k]`` all-reduce); ``lse_tail`` is the log-sum-exp of x over the
    complement of the top-k (``vp.normalizer``). Centring on the max keeps the buckets near the
    top small and exact.
    """
    x_top = torch.zeros(cols.shape, dtype=torch.float32, device=z.device)
    if z.shape[1] > 0:
        picked = vp.scaled_fp32(z.gather(1, cols.clamp_min(0)), temperature)
        x_top = torch.where(cols >= 0, picked, x_top)
    vp.all_reduce_(x_top, group, op="sum")  # exact: one owner per id, zeros elsewhere
    x_top = x_top.double()
    if renormalize:
        return x_top - x_top.max(dim=-1, keepdim=True).values, None
    tail = vp.normalizer(z, temperature, group, exclude_cols=cols)
    tail_max = tail.max.double()
    ref = torch.maximum(x_top.max(dim=-1).values, tail_max).unsqueeze(-1)
    x_tail = (tail_max.unsqueeze(-1) - ref).add_(tail.log_sum.unsqueeze(-1))
    return torch.cat([x_top - ref, x_tail], dim=-1), tail


class _TopKDivergence(torch.autograd.Function):
    """Divergence of (k+1)-bucket distributions; gradient to the student's full shard.

    The student's bucket distribution is softmax(X) (``_student_buckets``); all bucket math is
    float64 (``[N, k+1]``: negligible next to the vocab passes). With
    ``G = dL/dX`` from the kind's ``logit_grad`` (its entry at the student's dominant bucket,
    q > 1/2, completed to make G sum to zero), the chain rule gives ``dL/dx_j = G_i`` for ``j = idx_i``
    and ``G_tail * exp(x_j - lse_tail)`` elsewhere (the tail bucket's gradient shared in
    proportion to the student's own tail softmax).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_logits: torch.Tensor,
        indices: torch.Tensor,
        teacher_lp: torch.Tensor,
        divergence: Divergence,
        temperature: float,
        renormalize: bool,
        start: int,
        n_valid: int,
        group: Optional[dist.ProcessGroup],
    ) -> torch.Tensor:
        lead, local_vocab = student_logits.shape[:-1], student_logits.shape[-1]
        z = student_logits.reshape(-1, local_vocab)[:, :n_valid]
        cols = vp.local_cols(indices, start, n_valid)  # [N, k]
        bucket_x, tail = _student_buckets(z, cols, temperature, renormalize, group)
        lq, top = vp.log_softmax_rows(bucket_x)
        block = Block(lq.clamp_min_(_FLOOR), teacher_lp.clamp_min(_FLOOR))
        block.extra = divergence.bucket_extra(block.lp, cols.shape[1])
        value, aux = divergence.finalize(divergence.partial_sums(block))
        bucket_grad = vp.complete_zero_sum_(divergence.logit_grad(block, aux), top)  # float64

        empty = torch.empty(0, dtype=torch.float32, device=z.device)
        ctx.save_for_backward(student_logits, cols, bucket_grad,
                              empty if tail is None else tail.max,
                              empty if tail is None else tail.log_sum)
        ctx.temperature, ctx.renormalize, ctx.n_valid = temperature, renormalize, n_valid
        return value.float().reshape(lead)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        student_logits, cols, bucket_grad, tail_max, tail_log_sum = ctx.saved_tensors
        temperature, n_valid = ctx.temperature, ctx.n_valid
        local_vocab = student_logits.shape[-1]
        z = student_logits.reshape(-1, local_vocab)[:, :n_valid]
        n_rows, k = cols.shape
        scale = grad_output.reshape(-1).to(torch.float32) / temperature
        grad = torch.empty((n_rows, local_vocab), dtype=torch.float32, device=z.device)
        grad[:, n_valid:].zero_()  # padding
        g = grad[:, :n_valid]
        if ctx.renormalize:  # only the k ids get gradient
            g.zero_()
        elif n_valid > 0:
            # G_tail * exp((x_j - tail max) - tail log_sum); an empty tail (max = -inf) gets 0.
            empty = torch.isinf(tail_max)
            shift = torch.where(empty, torch.zeros_like(tail_max), tail_max).unsqueeze(-1)
            log_sum = torch.where(empty, torch.full_like(tail_max, float("inf")),
                                  tail_log_sum.float()).unsqueeze(-1)
            tail_coef = (bucket_grad[:, k] * scale).float().unsqueeze(-1)
            for sl in vp.row_chunks(n_rows, n_valid):
                t = vp.scaled_fp32(z[sl], temperature)
                g[sl] = t.sub_(shift[sl]).sub_(log_sum[sl]).exp_().mul_(tail_coef[sl])
        hit = cols >= 0
        if bool(hit.any()):
            rows = torch.arange(n_rows, device=g.device).unsqueeze(1).expand_as(cols)
            g[rows[hit], cols[hit]] = (bucket_grad[:, :k] * scale.unsqueeze(-1))[hit].float()
        return grad.view(student_logits.shape), None, None, None, None, None, None, None, None


def topk_divergence(
    student_logits: torch.Tensor,
    topk: TeacherTopK,
    divergence: Divergence,
    *,
    temperature: float = 1.0,
    renormalize: bool = False,
    valid_vocab_size: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token divergence ``[b, s]`` (fp32) between the teacher's top-k and the student.

    Args:
        student_logits: this rank's vocab shard ``[b, s, V/tp]`` (fp32 or bf16).
        topk: the teacher's ``TeacherTopK`` with leading dims ``[b, s]``.
        divergence: the kind and its parameters (``make_divergence("fkl")``).
        temperature: the student's; must equal ``topk.temperature``.
        renormalize: False (default): both sides as (k+1)-bucket distributions (the k teacher
            tokens + everything else); the student's tail follows from its own
            vocab-parallel normaliser, so every valid student logit gets gradient. A lower
            bound of the dense divergence for every kind but ``akl``, equal to it when k =
            valid vocab (with fp32 values). True: both sides renormalised over the k tokens
            only (no tail; logits outside the top-k get no gradient).
        valid_vocab_size, tp_group: as for ``vocab_parallel_divergence``.

    Communication: one ``[N, k]`` all-reduce (student logits at the ids), and without
    ``renormalize`` one ``[N]`` MAX and one ``[N, 2]`` SUM all-reduce (the student's tail).
    """
    if not isinstance(divergence, Divergence):
        raise TypeError(f"divergence must be a Divergence (make_divergence), got {divergence!r}")
    if abs(float(temperature) - topk.temperature) > 1e-12 * max(1.0, topk.temperature):
        raise ValueError(
            f"student temperature {temperature} differs from the teacher top-k's {topk.temperature}"
        )
    if student_logits.shape[:-1] != topk.indices.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and top-k {tuple(topk.indices.shape)} "
            "must share their leading dims"
        )
    start, n_valid = vp.shard_bounds(student_logits.shape[-1], valid_vocab_size, tp_group)
    k = topk.k
    # teacher bucket log-probs [N, k(+1)]; bucket math runs in float64 ([N, k+1] is small)
    if renormalize:  # log-softmax of the relative values: exact where the top-1 saturates
        teacher_lp, _ = vp.log_softmax_rows(topk.logprobs.reshape(-1, k).to(torch.float64))
    else:
        teacher_lp = torch.cat([topk.values_fp32().reshape(-1, k),
                                topk.tail_logprob.reshape(-1, 1).float()], dim=-1).double()
    return _TopKDivergence.apply(
        student_logits, topk.indices.reshape(-1, k), teacher_lp.detach(), divergence,
        float(temperature), bool(renormalize), start, n_valid, tp_group,
    )
