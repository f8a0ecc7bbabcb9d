"""Dense vocab-parallel divergences between student and teacher token distributions.

``vocab_parallel_divergence`` evaluates one of ``DIVERGENCE_KINDS`` (definitions and gradients
in ``_kernels``) on the local vocab shards of both models. Communication per call: two ``[N]``
all-reduces per side for the log-normalizers, one ``[N, n_terms]`` all-reduce of partial sums
(``n_terms <= 4``), and for ``akl`` 31 ``[N]`` all-reduces of the head-threshold bisection.

Memory: the autograd Function makes no full-size copy of either shard. It keeps references to
the two input tensors (no copy) plus per-token scalars (log-normalizers, the per-kind ``aux``),
recomputes log-probs row chunk by row chunk in forward and in backward, and allocates one fp32
``[N, V/tp]`` tensor: the gradient it returns. Every other temporary is a row chunk
(``_vocab_parallel.row_chunks``). Modifying either input in place between forward and backward
is caught by autograd's saved-tensor version check.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import _vocab_parallel as vp
from ._kernels import DivergenceSpec, finalize, logit_grad, partial_sums

_FLOAT_BITS_INF = 0x7F800000  # bit pattern of +inf in float32; keys are non-negative floats


def _akl_head_threshold(
    teacher: torch.Tensor,
    temperature: float,
    lse_p: torch.Tensor,
    mu: float,
    group: Optional[dist.ProcessGroup],
) -> torch.Tensor:
    """Per-row threshold ``thr`` ``[N]`` such that the teacher's head is ``lp >= thr``.

    The head is the smallest set of highest-probability tokens whose mass reaches ``mu`` (the
    token that crosses ``mu`` included): ``thr`` is the log-prob of that crossing token. Found
    exactly, without gathering the vocab, by bisection over the float32 bit patterns of
    ``key = -lp >= 0`` (monotone as integers): 31 steps, each one ``[N]`` all-reduce of the
    mass ``Sum p [lp >= thr]``.
    """
    n_rows, n_cols = teacher.shape
    lo = torch.zeros(n_rows, dtype=torch.int64, device=teacher.device)
    hi = torch.full((n_rows,), _FLOAT_BITS_INF, dtype=torch.int64, device=teacher.device)

    def threshold(bits: torch.Tensor) -> torch.Tensor:
        return -(bits.to(torch.int32).view(torch.float32))

    for _ in range(31):
        mid = (lo + hi) // 2
        thr = threshold(mid)
        mass = torch.zeros(n_rows, dtype=torch.float32, device=teacher.device)
        if n_cols > 0:
            for sl in vp.row_chunks(n_rows, n_cols):
                lp = vp.log_probs_chunk(teacher, sl, temperature, lse_p)
                outside = lp < thr[sl].unsqueeze(-1)
                mass[sl] = lp.exp_().masked_fill_(outside, 0.0).sum(-1)
        vp.all_reduce_(mass, group, op="sum")
        ok = mass >= mu
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid + 1)
    return threshold(hi)


class _VocabParallelDivergence(torch.autograd.Function):
    """Per-token divergence of vocab-parallel logits; gradient to the student only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        spec: DivergenceSpec,
        temperature: float,
        n_valid: int,
        group: Optional[dist.ProcessGroup],
    ) -> torch.Tensor:
        lead, local_vocab = student_logits.shape[:-1], student_logits.shape[-1]
        student = student_logits.reshape(-1, local_vocab)[:, :n_valid]
        teacher = teacher_logits.reshape(-1, local_vocab)[:, :n_valid]
        n_rows = student.shape[0]
        lse_q = vp.vocab_parallel_logsumexp(student, temperature, group)
        lse_p = vp.vocab_parallel_logsumexp(teacher, temperature, group)

        thr = None
        if spec.kind == "akl":
            thr = _akl_head_threshold(teacher, temperature, lse_p, spec.akl_mu, group)
        totals = torch.zeros((n_rows, spec.n_terms), dtype=torch.float32, device=student.device)
        if n_valid > 0:
            for sl in vp.row_chunks(n_rows, n_valid):
                lq = vp.log_probs_chunk(student, sl, temperature, lse_q)
                lp = vp.log_probs_chunk(teacher, sl, temperature, lse_p)
                head = None if thr is None else lp >= thr[sl].unsqueeze(-1)
                totals[sl] = partial_sums(spec, lq, lp, head)
        vp.all_reduce_(totals, group, op="sum")
        value, aux = finalize(spec, totals)

        ctx.save_for_backward(student_logits, teacher_logits, lse_q, lse_p, aux)
        ctx.spec, ctx.temperature, ctx.n_valid = spec, temperature, n_valid
        return value.reshape(lead)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        student_logits, teacher_logits, lse_q, lse_p, aux = ctx.saved_tensors
        temperature, n_valid = ctx.temperature, ctx.n_valid
        local_vocab = student_logits.shape[-1]
        student = student_logits.reshape(-1, local_vocab)[:, :n_valid]
        teacher = teacher_logits.reshape(-1, local_vocab)[:, :n_valid]
        n_rows = student.shape[0]
        scale = grad_output.reshape(-1).to(torch.float32) / temperature
        grad = torch.empty((n_rows, local_vocab), dtype=torch.float32, device=student.device)
        grad[:, n_valid:].zero_()  # padded vocab entries get no gradient
        if n_valid > 0:
            for sl in vp.row_chunks(n_rows, n_valid):
                lq = vp.log_probs_chunk(student, sl, temperature, lse_q)
                lp = vp.log_probs_chunk(teacher, sl, temperature, lse_p)
                g = logit_grad(ctx.spec, lq, lp, aux[sl])
                grad[sl, :n_valid] = g.mul_(scale[sl].unsqueeze(-1))
        return grad.view(student_logits.shape), None, None, None, None, None


def vocab_parallel_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    skew_alpha: float = 0.1,
    jsd_beta: float = 0.5,
    akl_mu: float = 0.5,
    valid_vocab_size: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token divergence ``[...]`` (fp32) between softmax(student / T) and softmax(teacher / T).

    Args:
        student_logits: this rank's vocab shard ``[..., V/tp]`` (fp32 or bf16), usually
            ``[s, b, V/tp]``; rank r holds global ids ``[r V/tp, (r+1) V/tp)``.
        teacher_logits: same shape; never receives a gradient.
        kind: one of ``DIVERGENCE_KINDS``.
        temperature: applied to both sides. The result is NOT multiplied by ``T**2``.
        valid_vocab_size: global number of real tokens; ids ``>=`` it are padding and are left
            out of both softmaxes (None: no padding).
        tp_group: tensor-parallel group (None: the whole vocab is local).

    Differentiable w.r.t. ``student_logits`` only. Inputs are not modified. Masking is the
    caller's job (multiply by a loss mask); masked rows may hold any finite values.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits must have the same shape"
        )
    spec = DivergenceSpec(kind, skew_alpha=skew_alpha, jsd_beta=jsd_beta, akl_mu=akl_mu)
    _, n_valid = vp.shard_bounds(student_logits.shape[-1], valid_vocab_size, tp_group)
    return _VocabParallelDivergence.apply(
        student_logits, teacher_logits.detach(), spec, float(temperature), n_valid, tp_group
    )
