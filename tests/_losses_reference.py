"""Float64 single-process references for megakd.losses, written from the definitions.

Everything here works on the full (gathered) vocabulary and differentiates with torch.autograd;
it shares no code with megakd.losses.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def _lw(w: float) -> float:
    return math.log(w) if w > 0 else float("-inf")


def log_probs(logits: torch.Tensor, temperature: float, valid: int) -> torch.Tensor:
    """log softmax(z / T) over the valid vocab, float64."""
    return torch.log_softmax(logits[..., :valid].to(F64) / temperature, dim=-1)


def divergence(lq: torch.Tensor, lp: torch.Tensor, kind: str, alpha=0.1, beta=0.5, mu=0.5,
               head: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row divergence of student log-probs ``lq`` and teacher ``lp`` (last dim = support).

    Empty buckets may be given as -inf log-probs; 0 * log 0 is taken as 0.
    """
    # zero-probability tokens as a huge negative log-prob, so that logaddexp and its gradient
    # stay defined (exp(-1e300) == 0 exactly in float64)
    lq, lp = lq.clamp_min(-1e300), lp.clamp_min(-1e300)
    p, q = lp.exp(), lq.exp()

    def kl(la, lb):  # KL(a || b) = Sum a (log a - log b), with 0 log 0 = 0
        a = la.exp()
        pos = a > 0
        zero = torch.zeros_like(a)
        d = torch.where(pos, la, zero) - torch.where(pos, lb, zero)
        return torch.where(pos, a * d, zero).sum(-1)

    if kind == "fkl":
        return kl(lp, lq)
    if kind == "rkl":
        return kl(lq, lp)
    if kind == "skl":
        return kl(lp, torch.logaddexp(lp + _lw(alpha), lq + _lw(1 - alpha)))
    if kind == "srkl":
        return kl(lq, torch.logaddexp(lp + _lw(1 - alpha), lq + _lw(alpha)))
    if kind == "jsd":
        lm = torch.logaddexp(lp + _lw(beta), lq + _lw(1 - beta))
        return beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "akl":
        if head is None:  # head: smallest set of top teacher tokens reaching mu (crossing incl.)
            p_sorted, order = torch.sort(p.detach(), dim=-1, descending=True)
            before = torch.cumsum(p_sorted, dim=-1) - p_sorted
            head = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, before < mu)
        gap = (p - q).abs().detach()
        gh = (gap * head).sum(-1)
        gt = (gap * ~head).sum(-1)
        den = (gh + gt).clamp_min(1e-30)
        return gh / den * kl(lp, lq) + gt / den * kl(lq, lp)
    raise ValueError(kind)


def dense(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float, valid: int,
          **params) -> torch.Tensor:
    lq = log_probs(student, temperature, valid)
    return divergence(lq, log_probs(teacher, temperature, valid), kind, **params)


def topk_buckets(student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float,
                 valid: int, renormalize: bool):
    """(student bucket log-probs, teacher bucket log-probs, teacher top-k ids) in float64.

    Buckets: the teacher's k most likely tokens (descending), then the tail (unless
    ``renormalize``, where both sides are renormalised over the k tokens).
    """
    lq_full = log_probs(student, temperature, valid)
    lp_full = log_probs(teacher, temperature, valid)
    top_lp, idx = torch.topk(lp_full, k, dim=-1)
    top_lq = lq_full.gather(-1, idx)
    if renormalize:
        return (torch.log_softmax(top_lq, -1), torch.log_softmax(top_lp, -1), idx)
    outside = torch.ones_like(lp_full, dtype=torch.bool).scatter(-1, idx, False)
    neg = torch.tensor(float("-inf"), dtype=F64)
    tail_q = torch.logsumexp(torch.where(outside, lq_full, neg), -1, keepdim=True)
    tail_p = torch.logsumexp(torch.where(outside, lp_full, neg), -1, keepdim=True)
    return torch.cat([top_lq, tail_q], -1), torch.cat([top_lp, tail_p], -1), idx


def topk(student, teacher, kind, k, temperature, valid, renormalize=False, **params):
    lq, lp, _ = topk_buckets(student, teacher, k, temperature, valid, renormalize)
    head = None
    if kind == "akl":
        p_top = lp[..., :k].exp()
        head = (torch.cumsum(p_top, -1) - p_top) < params.get("mu", 0.5)
        if not renormalize:
            head = torch.cat([head, torch.zeros_like(head[..., :1])], -1)
    return divergence(lq, lp, kind, head=head, **params)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, valid: int) -> torch.Tensor:
    x = logits[..., :valid].to(F64)
    return torch.nn.functional.cross_entropy(
        x.reshape(-1, valid), target.reshape(-1), reduction="none").reshape(target.shape)
