"""Per-kind math of the divergences on log-probabilities; no communication here.

Every function works on row blocks ``lq, lp`` (student / teacher log-probs, fp32, finite,
shape ``[n, c]``) that may hold only *part* of each row's distribution (one vocab shard, one
row chunk), so a divergence is evaluated in three steps:

1. ``partial_sums``: per-row sums over the columns present -> ``[n, n_terms]``; summing these
   over shards (all-reduce) gives the totals.
2. ``finalize``: totals -> per-row value ``[n]`` and ``aux`` ``[n, n_aux]``, the per-row
   scalars the gradient needs.
3. ``logit_grad``: the gradient of the per-row value with respect to the row's logits
   ``x = z / T`` (elementwise, uses ``aux``). The caller multiplies by ``grad_output / T``.

The same code serves the dense loss (columns = vocab shard) and the top-k loss (columns =
k + 1 buckets, complete on every rank).

Gradients (q = softmax(x), p = teacher, lq/lp their logs, Sum over the valid vocab): for a
value L(lq), with a_i = dL/dlq_i and dlq_j/dx_i = delta_ij - q_i, dL/dx_i = a_i - q_i * Sum_j a_j.

=====  ==================================================  =====================================
kind   value                                               dL/dx_i
=====  ==================================================  =====================================
fkl    Sum p (lp - lq)                                     q - p
rkl    R = Sum q (lq - lp)                                 q (lq - lp - R)
skl    Sum p (lp - lm),  m = a p + (1-a) q                 -p w + q S,  w = (1-a) q / m,
                                                           S = Sum p w
srkl   Rs = Sum q (lq - lm),  m = (1-a) p + a q            q (lq - lm - v - Rs + Sum q v),
                                                           v = a q / m
jsd    b Kp + (1-b) Kq,  m = b p + (1-b) q,                (1-b) q (lq - lm - Kq)
       Kp = Sum p (lp - lm), Kq = Sum q (lq - lm)
tvd    1/2 Sum |p - q|                                     q (sign(q - p) / 2 - A),
                                                           A = 1/2 Sum q sign(q - p)
akl    wh F + wt R,  F = fkl, R = rkl,                     wh (q - p) + wt q (lq - lp - R)
       wh = gh / (gh + gt), wt = gt / (gh + gt)            (weights detached)
=====  ==================================================  =====================================

Mixture log-probs ``lm`` are formed with ``logaddexp`` of ``log(weight) + log-prob``, never as
the log of a sum of (possibly underflowed) probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

DIVERGENCE_KINDS = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd", "akl")

# Guard of the AKL weights' denominator gh + gt (both are sums of |p - q| >= 0); only matters
# when p == q to within fp32, where both weights become 0 (and so does the value).
AKL_EPS = 1e-30


def _log(w: float) -> float:
    return math.log(w) if w > 0 else float("-inf")


@dataclass(frozen=True)
class DivergenceSpec:
    """A divergence kind and its parameter (validated)."""

    kind: str
    skew_alpha: float = 0.1
    jsd_beta: float = 0.5
    akl_mu: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in DIVERGENCE_KINDS:
            raise ValueError(
                f"unknown divergence kind {self.kind!r}; expected one of {DIVERGENCE_KINDS}"
            )
        for name in ("skew_alpha", "jsd_beta"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1]")

    @property
    def n_terms(self) -> int:
        return {"fkl": 1, "rkl": 1, "skl": 2, "srkl": 2, "jsd": 2, "tvd": 2, "akl": 4}[self.kind]


def _mixture(
    spec: DivergenceSpec, lq: torch.Tensor, lp: torch.Tensor
) -> Tuple[torch.Tensor, float]:
    """(log m, log of the student's weight in m) for skl / srkl / jsd."""
    if spec.kind == "skl":
        wp, wq = spec.skew_alpha, 1.0 - spec.skew_alpha
    elif spec.kind == "srkl":
        wp, wq = 1.0 - spec.skew_alpha, spec.skew_alpha
    else:  # jsd
        wp, wq = spec.jsd_beta, 1.0 - spec.jsd_beta
    lwq = _log(wq)
    return torch.logaddexp(lp + _log(wp), lq + lwq), lwq


def _rowsum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=-1)


def partial_sums(
    spec: DivergenceSpec,
    lq: torch.Tensor,
    lp: torch.Tensor,
    head: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-row partial sums ``[n, n_terms]`` over the columns of ``lq, lp`` ``[n, c]``.

    ``head`` (bool ``[n, c]``) marks the teacher's head tokens; used by ``akl`` only.
    """
    kind = spec.kind
    if kind == "fkl":
        d = lp - lq
        return _rowsum(d.mul_(lp.exp())).unsqueeze(-1)
    if kind == "rkl":
        d = lq - lp
        return _rowsum(d.mul_(lq.exp())).unsqueeze(-1)
    if kind in ("skl", "srkl", "jsd"):
        lm, lwq = _mixture(spec, lq, lp)
        if kind == "skl":  # [Sum p (lp - lm), Sum p w]
            p = lp.exp()
            w = (lq + lwq).sub_(lm).exp_()
            return torch.stack([_rowsum((lp - lm).mul_(p)), _rowsum(w.mul_(p))], dim=-1)
        if kind == "srkl":  # [Sum q (lq - lm), Sum q v]
            q = lq.exp()
            v = (lq + lwq).sub_(lm).exp_()
            return torch.stack([_rowsum((lq - lm).mul_(q)), _rowsum(v.mul_(q))], dim=-1)
        p, q = lp.exp(), lq.exp()  # jsd: [Kp, Kq]
        return torch.stack([_rowsum((lp - lm).mul_(p)), _rowsum(lq.sub(lm).mul_(q))], dim=-1)
    p, q = lp.exp(), lq.exp()
    d = q - p
    if kind == "tvd":  # [Sum |q - p|, Sum q sign(q - p)]
        return torch.stack([_rowsum(d.abs()), _rowsum(d.sign_().mul_(q))], dim=-1)
    # akl: [F, R, gap over head, gap over tail]
    if head is None:
        raise ValueError("akl needs the teacher's head mask")
    gap = d.abs_()
    head_gap = _rowsum(gap.masked_fill(~head, 0.0))
    return torch.stack(
        [
            _rowsum((lp - lq).mul_(p)),
            _rowsum((lq - lp).mul_(q)),
            head_gap,
            _rowsum(gap) - head_gap,
        ],
        dim=-1,
    )


def finalize(spec: DivergenceSpec, totals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Totals ``[N, n_terms]`` -> (per-row value ``[N]``, aux ``[N, n_aux]``)."""
    kind = spec.kind
    t = totals
    if kind == "fkl":
        return t[:, 0].clone(), t[:, :0]
    if kind == "rkl":
        return t[:, 0].clone(), t[:, :1].clone()
    if kind == "skl":
        return t[:, 0].clone(), t[:, 1:2].clone()
    if kind == "srkl":
        return t[:, 0].clone(), t[:, 0:2].clone()
    if kind == "jsd":
        beta = spec.jsd_beta
        return beta * t[:, 0] + (1.0 - beta) * t[:, 1], t[:, 1:2].clone()
    if kind == "tvd":
        return 0.5 * t[:, 0], 0.5 * t[:, 1:2]
    # akl
    fkl, rkl, gh, gt = t.unbind(dim=-1)
    den = (gh + gt).clamp_min(AKL_EPS)
    wh, wt = gh / den, gt / den
    return wh * fkl + wt * rkl, torch.stack([wh, wt, rkl], dim=-1)


def logit_grad(
    spec: DivergenceSpec, lq: torch.Tensor, lp: torch.Tensor, aux: torch.Tensor
) -> torch.Tensor:
    """dValue/dx for the columns of ``lq, lp`` ``[n, c]`` (x = logits / T); a new tensor."""
    kind = spec.kind
    q = lq.exp()
    if kind == "fkl":
        return q.sub_(lp.exp())
    if kind == "rkl":
        return (lq - lp).sub_(aux[:, 0:1]).mul_(q)
    if kind in ("skl", "srkl", "jsd"):
        lm, lwq = _mixture(spec, lq, lp)
        if kind == "skl":  # -p w + q S
            w = (lq + lwq).sub_(lm).exp_()
            return w.mul_(lp.exp()).neg_().add_(q * aux[:, 0:1])
        if kind == "srkl":  # q (lq - lm - v - Rs + Sum q v)
            v = (lq + lwq).sub_(lm).exp_()
            g = (lq - lm).sub_(v)
            return g.add_(aux[:, 1:2] - aux[:, 0:1]).mul_(q)
        # jsd: (1 - b) q (lq - lm - Kq)
        return (lq - lm).sub_(aux[:, 0:1]).mul_(q).mul_(1.0 - spec.jsd_beta)
    if kind == "tvd":
        s = (q - lp.exp()).sign_().mul_(0.5)
        return s.sub_(aux[:, 0:1]).mul_(q)
    # akl: wh (q - p) + wt q (lq - lp - R)
    wh, wt, rkl = aux[:, 0:1], aux[:, 1:2], aux[:, 2:3]
    g = (lq - lp).sub_(rkl).mul_(q).mul_(wt)
    return g.add_((q - lp.exp()).mul_(wh))
