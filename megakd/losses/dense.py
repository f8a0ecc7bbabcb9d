"""Dense vocab-parallel divergences between the student's and the teacher's token distributions.

``vocab_parallel_divergence`` evaluates any registered ``Divergence`` on the local vocab shards
``[b, s, V/tp]`` of both models. Communication per call: forward, per side one ``[N]`` fp32
MAX and one ``[N, 2]`` float64 SUM all-reduce for the log-normaliser, one ``[N, n_terms]``
float64 all-reduce of partial sums (``n_terms <= 4``), plus what the kind's ``dense_state``
needs (``akl``: 31 ``[N]`` all-reduces); backward, one ``[N]`` float64 all-reduce (the
zero-sum completion below).

Memory: the autograd Function makes no full-size copy of either shard. It keeps references to
the two input tensors (no copy) plus per-token scalars (the normalisers, the kind's ``aux``),
recomputes log-probs row chunk by row chunk in forward and in backward, and allocates one fp32
``[N, V/tp]`` tensor: the gradient it returns. Every other temporary is a row chunk
(``_vocab_parallel.row_chunks``). Modifying either input in place between forward and backward
is caught by autograd's saved-tensor version check.

Precision: backward replaces the gradient at each row's dominant student token (q > 1/2) by
minus the sum of the row's other entries (all ranks: one ``[N]`` all-reduce), the
cancellation-free value of an entry that the analytic formulas get by cancellation when the
student saturates (docs/losses.md, "Precision").
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import _vocab_parallel as vp
from .divergences import Block, Divergence


def _totals(divergence: Divergence, student: vp.ShardLogProbs, teacher: vp.ShardLogProbs,
            state: Optional[torch.Tensor]) -> torch.Tensor:
    """All-reduced per-row partial sums ``[N, n_terms]`` of the whole vocabulary."""
    totals = torch.zeros((student.n_rows, divergence.n_terms), dtype=torch.float64,
                         device=student.device)
    for sl in student.chunks():
        totals[sl] = divergence.partial_sums(_block(divergence, student, teacher, state, sl))
    return student.all_reduce_(totals)


def _block(divergence: Divergence, student: vp.ShardLogProbs, teacher: vp.ShardLogProbs,
           state: Optional[torch.Tensor], rows: slice) -> Block:
    lq, lp = student.log_probs(rows), teacher.log_probs(rows)
    extra = None if state is None else divergence.dense_extra(state[rows], lp)
    return Block(lq, lp, extra)


class _VocabParallelDivergence(torch.autograd.Function):
    """Per-token divergence of vocab-parallel logits; gradient to the student only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        divergence: Divergence,
        temperature: float,
        n_valid: int,
        group: Optional[dist.ProcessGroup],
    ) -> torch.Tensor:
        lead, local_vocab = student_logits.shape[:-1], student_logits.shape[-1]
        student = vp.ShardLogProbs(
            student_logits.reshape(-1, local_vocab)[:, :n_valid], temperature, group)
        teacher = vp.ShardLogProbs(
            teacher_logits.reshape(-1, local_vocab)[:, :n_valid], temperature, group)
        state = divergence.dense_state(teacher)
        value, aux = divergence.finalize(_totals(divergence, student, teacher, state))
        aux = aux.float()  # enters vocab-sized fp32 math in backward

        sq, tp_ = student.norm, teacher.norm
        no_state = torch.empty(0, device=student.device)
        ctx.save_for_backward(student_logits, teacher_logits, sq.max, sq.log_sum, sq.dominant,
                              tp_.max, tp_.log_sum, aux, no_state if state is None else state)
        ctx.has_state = state is not None
        ctx.divergence, ctx.temperature, ctx.n_valid, ctx.group = (
            divergence, temperature, n_valid, group)
        return value.float().reshape(lead)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (student_logits, teacher_logits, q_max, q_log_sum, dominant, p_max, p_log_sum, aux,
         state) = ctx.saved_tensors
        temperature, n_valid, group = ctx.temperature, ctx.n_valid, ctx.group
        local_vocab = student_logits.shape[-1]
        student = vp.ShardLogProbs(
            student_logits.reshape(-1, local_vocab)[:, :n_valid], temperature, group,
            vp.Normalizer(q_max, q_log_sum))
        teacher = vp.ShardLogProbs(
            teacher_logits.reshape(-1, local_vocab)[:, :n_valid], temperature, group,
            vp.Normalizer(p_max, p_log_sum))
        state = state if ctx.has_state else None
        n_rows = student.n_rows
        scale = grad_output.reshape(-1).to(torch.float32) / temperature

        grad = torch.empty((n_rows, local_vocab), dtype=torch.float32, device=student.device)
        grad[:, n_valid:].zero_()  # padded vocab entries get no gradient
        others = torch.zeros(n_rows, dtype=torch.float64, device=student.device)
        top_col = torch.full((n_rows,), -1, dtype=torch.int64, device=student.device)
        for sl in student.chunks():
            block = _block(ctx.divergence, student, teacher, state, sl)
            g = ctx.divergence.logit_grad(block, aux[sl])
            rows = torch.nonzero(dominant[sl], as_tuple=True)[0]
            if rows.numel():  # the dominant token's entry is replaced below
                cols = block.lq.argmax(dim=-1)[rows]
                top_col[sl][rows] = cols
                g[rows, cols] = 0.0
            others[sl] = g.sum(-1)
            grad[sl, :n_valid] = g.mul_(scale[sl].unsqueeze(-1))
            del block, g  # free this chunk's temporaries before the next chunk's
        student.all_reduce_(others)  # Sum of every entry but the dominant one, over all ranks
        owned = torch.nonzero(top_col >= 0, as_tuple=True)[0]
        grad[owned, top_col[owned]] = (-others[owned] * scale[owned]).float()
        return grad.view(student_logits.shape), None, None, None, None, None


def vocab_parallel_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: Divergence,
    *,
    temperature: float = 1.0,
    valid_vocab_size: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token divergence ``[b, s]`` (fp32) between softmax(teacher / T) and softmax(student / T).

    Args:
        student_logits: this rank's vocab shard ``[b, s, V/tp]`` (any leading dims; fp32 or
            bf16); rank r holds global ids ``[r V/tp, (r+1) V/tp)``.
        teacher_logits: same shape; never receives a gradient.
        divergence: the kind and its parameters (``make_divergence("fkl")``).
        temperature: applied to both sides. The result is NOT multiplied by ``T**2``.
        valid_vocab_size: global number of real tokens; ids ``>=`` it are padding and are left
            out of both softmaxes (None: no padding).
        tp_group: tensor-parallel group (None: the whole vocab is local).

    Differentiable w.r.t. ``student_logits`` only. Inputs are not modified. Masking is the
    caller's job (multiply by a loss mask); masked rows may hold any finite values or -inf.
    """
    if not isinstance(divergence, Divergence):
        raise TypeError(f"divergence must be a Divergence (make_divergence), got {divergence!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits must have the same shape"
        )
    _, n_valid = vp.shard_bounds(student_logits.shape[-1], valid_vocab_size, tp_group)
    return _VocabParallelDivergence.apply(
        student_logits, teacher_logits.detach(), divergence, float(temperature), n_valid, tp_group
    )
