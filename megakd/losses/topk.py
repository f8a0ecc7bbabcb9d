"""Teacher top-k across the TP group, its compressed form, and top-k divergences.

Wire format (``TeacherTopK``), per token, identical on every TP rank:

* ``logprobs`` ``[..., k]`` (bf16 / float8_e4m3fn / fp32): the teacher's tempered log-probs of
  its k most likely tokens *relative to the top-1 token*, ``log(p_i / p_1) <= 0`` (sorted, so
  ``logprobs[..., 0] == 0``). For fp8 they are clamped at -448 (e4m3's largest magnitude;
  e^-448 underflows fp32 anyway).
* ``indices`` ``[..., k]`` int32: global vocab ids.
* ``tail_logprob`` ``[...]`` fp32: ``log(1 - Sum_topk p)``, the teacher's exact mass outside the
  top-k (``-inf`` when the top-k covers the whole valid vocab). It is computed from the full
  shards before compression, as the log-sum-exp of the complement (no cancellation).

``values_fp32()`` returns normalised log-probs: the k relative values are renormalised so that
the k buckets carry exactly ``1 - exp(tail_logprob)``, so compression never changes the tail
or the total mass, only how the top-k mass is shared. Bytes per token: ``k * (value bytes + 4)
+ 4`` (``topk_bytes_per_token``). ``scale`` is None for every supported dtype: e4m3 is a
floating format, so a per-token multiplicative scale would not change its relative precision,
and relative values in [-448, 0] need no range adjustment.

``topk_divergence`` compares the (k+1)-bucket distributions (k teacher tokens + tail).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist

from . import _vocab_parallel as vp
from ._kernels import DivergenceSpec, finalize, logit_grad, partial_sums

FP8_MAX = 448.0  # largest finite magnitude of torch.float8_e4m3fn
TOPK_DTYPES = (torch.bfloat16, torch.float8_e4m3fn, torch.float32)
_FLOOR = -1e30  # stands in for log(0) of an empty bucket, so 0 * (log 0 - log 0) stays 0


def topk_bytes_per_token(k: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one token's ``TeacherTopK`` occupies: k values, k int32 ids, one fp32 tail."""
    return k * (torch.empty((), dtype=dtype).element_size() + 4) + 4


@dataclass
class TeacherTopK:
    """A teacher's per-token top-k distribution (see module docstring for the format)."""

    logprobs: torch.Tensor
    indices: torch.Tensor
    tail_logprob: torch.Tensor
    temperature: float
    scale: Optional[torch.Tensor] = None

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.logprobs.dtype

    def bytes_per_token(self) -> int:
        return topk_bytes_per_token(self.k, self.logprobs.dtype)

    def to(self, device: torch.device | str) -> "TeacherTopK":
        """A copy on ``device`` (dtypes unchanged)."""
        return replace(
            self,
            logprobs=self.logprobs.to(device),
            indices=self.indices.to(device),
            tail_logprob=self.tail_logprob.to(device),
            scale=None if self.scale is None else self.scale.to(device),
        )

    def values_fp32(self) -> torch.Tensor:
        """Normalised teacher log-probs ``[..., k]`` fp32 (k buckets carry 1 - tail mass)."""
        rel = self.logprobs.to(torch.float32)
        if self.scale is not None:
            rel = rel * self.scale.unsqueeze(-1)
        log_topk_mass = vp.log1mexp(self.tail_logprob.to(torch.float32))
        return rel - torch.logsumexp(rel, dim=-1, keepdim=True) + log_topk_mass.unsqueeze(-1)

    def bucket_logprobs(self) -> torch.Tensor:
        """Teacher log-probs of the k + 1 buckets ``[..., k + 1]`` (tail last)."""
        return torch.cat([self.values_fp32(), self.tail_logprob.unsqueeze(-1).float()], dim=-1)


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
    """Global top-k of softmax(teacher / T) from vocab shards ``[..., V/tp]``.

    Each rank takes its local top-k (padding excluded), the group all-gathers the ``k * tp``
    candidates (fp32 values + int64 ids), and every rank keeps the same global top-k. The tail
    mass is the log-sum-exp over the complement, reduced with two ``[N]`` all-reduces.
    """
    if dtype not in TOPK_DTYPES:
        raise ValueError(f"top-k dtype must be one of {TOPK_DTYPES}, got {dtype}")
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

    # Exact tail: log-sum-exp of everything but the top-k, over all shards.
    top_cols = vp.local_cols(top_i, start, n_valid)
    m, s = vp.local_logsumexp_stats(z, temperature, exclude_cols=top_cols)
    lse_tail = vp.combine_logsumexp(m, s, tp_group)
    lse_top = torch.logsumexp(top_v, dim=-1)
    tail_logprob = lse_tail - torch.logaddexp(lse_top, lse_tail)

    rel = top_v - top_v[:, :1]
    if dtype == torch.float8_e4m3fn:
        rel = rel.clamp_min(-FP8_MAX)
    return TeacherTopK(
        logprobs=rel.to(dtype).reshape(*lead, k),
        indices=top_i.to(torch.int32).reshape(*lead, k),
        tail_logprob=tail_logprob.reshape(lead),
        temperature=float(temperature),
        scale=None,
    )


class _TopKDivergence(torch.autograd.Function):
    """Divergence of (k+1)-bucket distributions; gradient to the student's full shard.

    Student bucket logits are ``X = (x[idx_1..k], lse_tail)`` with ``x = z / T`` and ``lse_tail``
    the log-sum-exp of x over the complement of the top-k; the bucket distribution is
    softmax(X). With ``G = dL/dX`` from ``_kernels.logit_grad`` on the buckets, the chain rule
    gives ``dL/dx_j = G_i`` for ``j = idx_i`` and ``G_tail * exp(x_j - lse_tail)`` elsewhere
    (the tail bucket's gradient shared in proportion to the student's own tail softmax).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_logits: torch.Tensor,
        indices: torch.Tensor,
        teacher_lp: torch.Tensor,
        spec: DivergenceSpec,
        temperature: float,
        renormalize: bool,
        start: int,
        n_valid: int,
        group: Optional[dist.ProcessGroup],
    ) -> torch.Tensor:
        lead, local_vocab = student_logits.shape[:-1], student_logits.shape[-1]
        z = student_logits.reshape(-1, local_vocab)[:, :n_valid]
        n_rows = z.shape[0]
        cols = vp.local_cols(indices, start, n_valid)  # [N, k]

        # Student logits at the teacher's ids: one owner per id, all-reduce [N, k].
        x_top = torch.zeros(cols.shape, dtype=torch.float32, device=z.device)
        if n_valid > 0:
            picked = vp.scaled_fp32(z.gather(1, cols.clamp_min(0)), temperature)
            x_top = torch.where(cols >= 0, picked, x_top)
        vp.all_reduce_(x_top, group, op="sum")

        if renormalize:
            bucket_x = x_top
            lse_tail = None
        else:
            m, s = vp.local_logsumexp_stats(z, temperature, exclude_cols=cols)
            lse_tail = vp.combine_logsumexp(m, s, group)
            bucket_x = torch.cat([x_top, lse_tail.unsqueeze(-1)], dim=-1)
        lq = torch.log_softmax(bucket_x, dim=-1).clamp_min(_FLOOR)
        lp = teacher_lp.clamp_min(_FLOOR)

        head = None
        if spec.kind == "akl":  # head over the teacher's sorted top-k; the tail bucket is tail
            p_top = lp[:, : cols.shape[1]].exp()
            head_top = (torch.cumsum(p_top, dim=-1) - p_top) < spec.akl_mu
            head = head_top if renormalize else torch.cat(
                [head_top, torch.zeros_like(head_top[:, :1])], dim=-1
            )
        value, aux = finalize(spec, partial_sums(spec, lq, lp, head))
        bucket_grad = logit_grad(spec, lq, lp, aux)  # dL/dX, [N, k(+1)]

        if lse_tail is None:  # unused in backward
            lse_tail = torch.empty(0, dtype=torch.float32, device=z.device)
        ctx.save_for_backward(student_logits, cols, bucket_grad, lse_tail)
        ctx.temperature, ctx.renormalize, ctx.n_valid = temperature, renormalize, n_valid
        return value.reshape(lead)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        student_logits, cols, bucket_grad, lse_tail = ctx.saved_tensors
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
            # exp(x_j - lse_tail) * G_tail; lse_tail = -inf means an empty tail: contributes 0.
            empty = torch.isinf(lse_tail)
            lse_safe = torch.where(empty, torch.full_like(lse_tail, float("inf")), lse_tail)
            tail_coef = bucket_grad[:, k] * scale
            for sl in vp.row_chunks(n_rows, n_valid):
                t = vp.scaled_fp32(z[sl], temperature)
                t.sub_(lse_safe[sl].unsqueeze(-1)).exp_().mul_(tail_coef[sl].unsqueeze(-1))
                g[sl] = t
        hit = cols >= 0
        if bool(hit.any()):
            rows = torch.arange(n_rows, device=g.device).unsqueeze(1).expand_as(cols)
            g[rows[hit], cols[hit]] = (bucket_grad[:, :k] * scale.unsqueeze(-1))[hit]
        return grad.view(student_logits.shape), None, None, None, None, None, None, None, None


def topk_divergence(
    student_logits: torch.Tensor,
    topk: TeacherTopK,
    kind: str,
    *,
    temperature: float = 1.0,
    skew_alpha: float = 0.1,
    jsd_beta: float = 0.5,
    akl_mu: float = 0.5,
    renormalize: bool = False,
    valid_vocab_size: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token divergence ``[...]`` (fp32) between the teacher's top-k and the student.

    Default: both sides as (k+1)-bucket distributions (the k teacher tokens + everything else);
    the student's tail follows from its own vocab-parallel normaliser, so every valid student
    logit gets gradient. A lower bound of the dense divergence for every kind but ``akl``,
    equal to it when k = valid vocab (with fp32 values). ``renormalize=True``: both sides
    renormalised over the k tokens only (no tail; logits outside the top-k get no gradient).

    ``temperature`` is the student's and must equal ``topk.temperature``. Communication:
    ``[N, k]`` all-reduce (student logits at the ids) and two ``[N]`` all-reduces.
    """
    if abs(float(temperature) - topk.temperature) > 1e-12 * max(1.0, topk.temperature):
        raise ValueError(
            f"student temperature {temperature} differs from the teacher top-k's {topk.temperature}"
        )
    if student_logits.shape[:-1] != topk.indices.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and top-k {tuple(topk.indices.shape)} "
            "must share their leading dims"
        )
    spec = DivergenceSpec(kind, skew_alpha=skew_alpha, jsd_beta=jsd_beta, akl_mu=akl_mu)
    start, n_valid = vp.shard_bounds(student_logits.shape[-1], valid_vocab_size, tp_group)
    k = topk.k
    teacher_lp = topk.values_fp32().reshape(-1, k)
    if renormalize:
        teacher_lp = torch.log_softmax(teacher_lp, dim=-1)
    else:
        teacher_lp = torch.cat([teacher_lp, topk.tail_logprob.reshape(-1, 1).float()], dim=-1)
    indices = topk.indices.reshape(-1, k)
    return _TopKDivergence.apply(
        student_logits, indices, teacher_lp.detach(), spec, float(temperature),
        bool(renormalize), start, n_valid, tp_group,
    )
