"""Adaptive KL (Wu et al. 2024): forward KL on the teacher's head, reverse KL on its tail,
weighted by how far the student is from the teacher on each.

value  wh F + wt R,  F = KL(p || q),  R = KL(q || p),  wh = gh / (gh + gt),  wt = gt / (gh + gt)
       gh = Sum_head |p - q|,  gt = Sum_tail |p - q|  (weights detached)
grad   wh (q_i - p_i) + wt q_i (d_i - R)

The head is the smallest set of the teacher's most likely tokens whose mass reaches mu, the
token that crosses mu included (tied probabilities at the crossing all included). Dense: found
exactly without gathering the vocab by a bisection over the float32 bit patterns of -lp (31
steps of one ``[N]`` all-reduce each). Top-k: over the teacher's k sorted buckets (a bucket is
in the head iff the mass of the buckets before it is < mu); the tail bucket is tail.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._vocab_parallel import ShardLogProbs
from .base import Block, Divergence, Parameter, row_sum

AKL_MU = Parameter(
    name="akl_mu",
    flag="--kd-akl-mu",
    default=0.5,
    low=0.0,
    high=1.0,
    low_inclusive=False,
    high_inclusive=False,
    help="akl: teacher mass mu of the head (its most likely tokens) that gets forward KL",
)
# Guard of the weights' denominator gh + gt: only matters when p == q to within fp32, where both
# weights become 0 (and so does the value) instead of NaN.
AKL_EPS = 1e-30
_FLOAT_BITS_INF = 0x7F800000  # bit pattern of +inf in float32; keys -lp are non-negative floats


class AdaptiveKL(Divergence):
    name = "akl"
    summary = ("adaptive KL (Wu et al. 2024): fkl on the teacher's head (mass mu), rkl on its "
               "tail, weighted by the gap on each")
    parameters = (AKL_MU,)
    order = 6
    n_terms = 4
    akl_mu: float

    def partial_sums(self, block: Block) -> torch.Tensor:  # [F, R, gh, gt]
        if block.extra is None:
            raise ValueError("akl needs the teacher's head mask (Block.extra)")
        gap = block.abs_gap()
        total_gap = row_sum(gap)
        head_gap = row_sum(gap.masked_fill_(~block.extra, 0.0))
        fkl = row_sum(block.d.mul(block.p)).neg_()
        rkl = row_sum(block.d.mul(block.q))
        return torch.stack([fkl, rkl, head_gap, total_gap - head_gap], dim=-1)

    def finalize(self, totals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        fkl, rkl, gh, gt = totals.unbind(dim=-1)
        den = (gh + gt).clamp_min(AKL_EPS)
        wh, wt = gh / den, gt / den
        return wh * fkl + wt * rkl, torch.stack([wh, wt, rkl], dim=-1)

    def logit_grad(self, block: Block, aux: torch.Tensor) -> torch.Tensor:
        wh, wt, rkl = aux[:, 0:1], aux[:, 1:2], aux[:, 2:3]
        g = (block.d - rkl).mul_(block.q).mul_(wt)
        return g.add_((block.q - block.p).mul_(wh))

    # head: lp >= thr per row (dense), or the cumulative-mass rule over the sorted buckets
    def dense_state(self, teacher: ShardLogProbs) -> Optional[torch.Tensor]:
        return head_threshold(teacher, self.akl_mu)

    def dense_extra(self, state: torch.Tensor, lp: torch.Tensor) -> Optional[torch.Tensor]:
        return lp >= state.unsqueeze(-1)

    def bucket_extra(self, lp: torch.Tensor, n_top: int) -> Optional[torch.Tensor]:
        p_top = lp[:, :n_top].exp()
        head = (torch.cumsum(p_top, dim=-1) - p_top) < self.akl_mu
        if lp.shape[1] > n_top:  # the tail bucket is never head
            head = torch.cat([head, torch.zeros_like(head[:, : lp.shape[1] - n_top])], dim=-1)
        return head


def head_threshold(teacher: ShardLogProbs, mu: float) -> torch.Tensor:
    """Per-row threshold ``thr`` ``[N]``: the teacher's head is ``lp >= thr``.

    ``thr`` is the log-prob of the token that crosses ``mu``, found by bisection over the
    float32 bit patterns of ``key = -lp >= 0`` (monotone as integers): 31 steps, each one
    ``[N]`` all-reduce of the mass ``Sum p [lp >= thr]``.
    """
    n = teacher.n_rows
    lo = torch.zeros(n, dtype=torch.int64, device=teacher.device)
    hi = torch.full((n,), _FLOAT_BITS_INF, dtype=torch.int64, device=teacher.device)

    def threshold(bits: torch.Tensor) -> torch.Tensor:
        return -(bits.to(torch.int32).view(torch.float32))

    for _ in range(31):
        mid = (lo + hi) // 2
        thr = threshold(mid)
        mass = torch.zeros(n, dtype=torch.float32, device=teacher.device)
        for sl in teacher.chunks():
            lp = teacher.log_probs(sl)
            outside = lp < thr[sl].unsqueeze(-1)
            mass[sl] = lp.exp_().masked_fill_(outside, 0.0).sum(-1)
        teacher.all_reduce_(mass)
        ok = mass >= mu
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid + 1)
    return threshold(hi)
