"""Float64 single-process references for megakd.losses, written from the definitions.

Everything here works on the full (gathered) vocabulary and differentiates with torch.autograd;
it shares no code with megakd.losses. Every registered divergence kind needs an entry in
``REFERENCES`` (the tests fail naming the kind otherwise). The same formulas evaluated in fp32
(``dtype=torch.float32``) are the "plain fp32 autograd" that megakd's precision is held to.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

F64 = torch.float64
Params = Mapping[str, float]  # the kind's parameter values by name (``Divergence.values``)
# (student log-probs, teacher log-probs, params, n_top) -> per-row value. n_top is None for the
# dense distributions, else the number of teacher top-k buckets (sorted, first), followed by
# the tail bucket if there is one.
Reference = Callable[[torch.Tensor, torch.Tensor, Params, Optional[int]], torch.Tensor]
REFERENCES: Dict[str, Reference] = {}


def reference(name: str) -> Callable[[Reference], Reference]:
    def register(fn: Reference) -> Reference:
        REFERENCES[name] = fn
        return fn
    return register


def _lw(w: float) -> float:
    return math.log(w) if w > 0 else float("-inf")


def kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = Sum a (log a - log b) over the last dim, with 0 log 0 = 0."""
    a = la.exp()
    pos = a > 0
    zero = torch.zeros_like(a)
    d = torch.where(pos, la, zero) - torch.where(pos, lb, zero)
    return torch.where(pos, a * d, zero).sum(-1)


def _mix(lp: torch.Tensor, lq: torch.Tensor, w_p: float) -> torch.Tensor:
    """log(w_p p + (1 - w_p) q), formed in log space."""
    return torch.logaddexp(lp + _lw(w_p), lq + _lw(1 - w_p))


@reference("fkl")
def _fkl(lq, lp, params, n_top=None):
    return kl(lp, lq)


@reference("rkl")
def _rkl(lq, lp, params, n_top=None):
    return kl(lq, lp)


@reference("skl")
def _skl(lq, lp, params, n_top=None):
    return kl(lp, _mix(lp, lq, params["skew_alpha"]))


@reference("srkl")
def _srkl(lq, lp, params, n_top=None):
    return kl(lq, _mix(lp, lq, 1 - params["skew_alpha"]))


@reference("jsd")
def _jsd(lq, lp, params, n_top=None):
    beta = params["jsd_beta"]
    lm = _mix(lp, lq, beta)
    return beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)


@reference("tvd")
def _tvd(lq, lp, params, n_top=None):
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)


@reference("akl")
def _akl(lq, lp, params, n_top=None):
    mu = params["akl_mu"]
    p, q = lp.exp(), lq.exp()
    if n_top is None:  # head: smallest set of top teacher tokens reaching mu (crossing incl.)
        p_sorted, order = torch.sort(p.detach(), dim=-1, descending=True)
        before = torch.cumsum(p_sorted, dim=-1) - p_sorted
        head = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, before < mu)
    else:  # over the sorted top-k buckets; the tail bucket is tail
        p_top = p[..., :n_top].detach()
        head = (torch.cumsum(p_top, -1) - p_top) < mu
        head = torch.cat([head, torch.zeros_like(p[..., n_top:], dtype=torch.bool)], -1)
    gap = (p - q).abs().detach()
    gh = (gap * head).sum(-1)
    gt = (gap * ~head).sum(-1)
    den = (gh + gt).clamp_min(1e-30)
    return gh / den * kl(lp, lq) + gt / den * kl(lq, lp)


def divergence(lq: torch.Tensor, lp: torch.Tensor, kind: str, params: Params,
               n_top: Optional[int] = None) -> torch.Tensor:
    """Per-row divergence of student log-probs ``lq`` and teacher ``lp`` (last dim = support).

    Empty buckets may be given as -inf log-probs; 0 * log 0 is taken as 0.
    """
    if kind not in REFERENCES:
        raise KeyError(f"divergence {kind!r} has no reference: add one to "
                       "tests/_losses_reference.py (see docs/losses.md, 'Adding a divergence')")
    # zero-probability tokens as a huge negative log-prob, so that logaddexp and its gradient
    # stay defined (exp(-1e300) == 0 exactly in float64, exp(-1e30) in float32)
    floor = -1e300 if lq.dtype == F64 else -1e30
    return REFERENCES[kind](lq.clamp_min(floor), lp.clamp_min(floor), params, n_top)


def log_probs(logits: torch.Tensor, temperature: float, valid: int,
              dtype: torch.dtype = F64) -> torch.Tensor:
    """log softmax(z / T) over the valid vocab, in ``dtype``."""
    return torch.log_softmax(logits[..., :valid].to(dtype) / temperature, dim=-1)


def dense(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float, valid: int,
          params: Params, dtype: torch.dtype = F64) -> torch.Tensor:
    lq = log_probs(student, temperature, valid, dtype)
    return divergence(lq, log_probs(teacher, temperature, valid, dtype), kind, params)


def topk_buckets(student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float,
                 valid: int, renormalize: bool, dtype: torch.dtype = F64):
    """(student bucket log-probs, teacher bucket log-probs, teacher top-k ids) in ``dtype``.

    Buckets: the teacher's k most likely tokens (descending), then the tail (unless
    ``renormalize``, where both sides are renormalised over the k tokens).
    """
    lq_full = log_probs(student, temperature, valid, dtype)
    lp_full = log_probs(teacher, temperature, valid, dtype)
    top_lp, idx = torch.topk(lp_full, k, dim=-1)
    top_lq = lq_full.gather(-1, idx)
    if renormalize:
        return (torch.log_softmax(top_lq, -1), torch.log_softmax(top_lp, -1), idx)
    outside = torch.ones_like(lp_full, dtype=torch.bool).scatter(-1, idx, False)
    neg = torch.tensor(float("-inf"), dtype=dtype)
    tail_q = torch.logsumexp(torch.where(outside, lq_full, neg), -1, keepdim=True)
    tail_p = torch.logsumexp(torch.where(outside, lp_full, neg), -1, keepdim=True)
    return torch.cat([top_lq, tail_q], -1), torch.cat([top_lp, tail_p], -1), idx


def topk(student, teacher, kind, k, temperature, valid, params, renormalize=False,
         dtype: torch.dtype = F64):
    lq, lp, _ = topk_buckets(student, teacher, k, temperature, valid, renormalize, dtype)
    return divergence(lq, lp, kind, params, n_top=k)


def value_and_grad(student: torch.Tensor, teacher: torch.Tensor, kind: str, params: Params, *,
                   temperature: float, valid: int, k: Optional[int] = None,
                   renormalize: bool = False,
                   dtype: torch.dtype = F64) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-token value, gradient of their sum w.r.t. ``student`` over the padded vocab), by
    autograd of the formula evaluated in ``dtype``: dense (``k`` None) or top-k buckets."""
    x = student.detach().to(dtype).requires_grad_(True)
    t = teacher.detach().to(dtype)
    if k is None:
        value = dense(x, t, kind, temperature, valid, params, dtype)
    else:
        value = topk(x, t, kind, k, temperature, valid, params, renormalize, dtype)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, valid: int) -> torch.Tensor:
    x = logits[..., :valid].to(F64)
    return torch.nn.functional.cross_entropy(
        x.reshape(-1, valid), target.reshape(-1), reduction="none").reshape(target.shape)
