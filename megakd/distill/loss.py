"""The student's loss for one microbatch: (1 - w) * CE + w * KD, exact token means.

Both terms are token means over the whole global batch (all microbatches, all DP ranks), each
over its own mask: CE over the loss mask, KD over the KD mask (the loss mask, or all tokens
with ``--kd-on-prompt``). megatron-core's schedules run with ``calculate_per_token_loss`` and
divide the gradient by the sum of the ``num_tokens`` each microbatch returns; the loss below is
pre-scaled with the iteration's global token counts so that this division yields exactly
``(1 - w) * CE_mean + w * KD_mean`` whatever the masks, microbatching or DP size (TRL GKD's
exact normalisation under gradient accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from megakd.configs import KDConfig
from megakd.data import Microbatch, kd_loss_mask
from megakd.distill.teachers import TeacherOutput
from megakd.losses import (
    make_divergence,
    topk_divergence,
    vocab_parallel_cross_entropy,
    vocab_parallel_divergence,
)


@dataclass(frozen=True)
class GlobalTokenCounts:
    """Tokens under each mask in the whole global batch (summed over microbatches and DP)."""

    ce_tokens: float
    kd_tokens: float


def count_global_tokens(microbatches: Sequence[Microbatch], kd: KDConfig,
                        dp_group) -> GlobalTokenCounts:
    """All-reduce this rank's mask sums over the data-parallel group (two scalars)."""
    counts = torch.zeros(2, dtype=torch.float64)
    for batch in microbatches:
        counts[0] += batch.loss_mask.sum().item()
        counts[1] += kd_loss_mask(batch, kd.on_prompt).sum().item()
    if dp_group is not None and torch.distributed.get_world_size(dp_group) > 1:
        torch.distributed.all_reduce(counts, group=dp_group)
    return GlobalTokenCounts(ce_tokens=counts[0].item(), kd_tokens=counts[1].item())


def anchor_token_total(kd: KDConfig, counts: GlobalTokenCounts) -> float:
    """The global token count megatron's ``finalize_model_grads`` divides gradients by: the
    CE mask's, unless the iteration has no CE tokens or CE is not trained (pure KD, or only
    the student's own samples), then the KD mask's. Every loss term is pre-multiplied by it."""
    use_ce = kd.loss_weight < 1.0 and counts.ce_tokens > 0
    return counts.ce_tokens if use_ce else counts.kd_tokens


class DistillationLoss:
    """Per-microbatch loss on the last pipeline stage (student logits ``[b, s, V/tp]``)."""

    def __init__(self, kd: KDConfig, valid_vocab_size: int, tp_group) -> None:
        self.kd = kd
        self.divergence_unit = make_divergence(kd.loss, kd.divergence_params)
        self.valid_vocab_size = valid_vocab_size
        self.tp_group = tp_group

    def divergence(self, student_logits: torch.Tensor, teacher: TeacherOutput) -> torch.Tensor:
        """Per-token KD divergence ``[b, s]`` (vocab-parallel; never gathers the vocab)."""
        common = dict(temperature=self.kd.temperature, valid_vocab_size=self.valid_vocab_size,
                      tp_group=self.tp_group)
        if teacher.topk is not None:
            return topk_divergence(student_logits, teacher.topk, self.divergence_unit,
                                   renormalize=self.kd.topk_renormalize, **common)
        return vocab_parallel_divergence(student_logits, teacher.logits, self.divergence_unit,
                                         **common)

    def __call__(
        self,
        batch: Microbatch,
        teacher_output: Optional[TeacherOutput],
        counts: GlobalTokenCounts,
        student_logits: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """Returns megatron's 3-tuple: (pre-scaled loss sum, tokens, {name: [sum, count]})."""
        weight = self.kd.loss_weight
        ce_mask = batch.loss_mask.float()
        reported: Dict[str, torch.Tensor] = {}
        total = student_logits.new_zeros((), dtype=torch.float32)
        kd_mask = ce_mask  # the KD term's tokens, when there is a teacher

        # KD first: megatron's own CE works in place on fp32 logits (DESIGN.md); ours does not,
        # but keeping this order makes the loss safe with either.
        if teacher_output is not None:
            kd_mask = kd_loss_mask(batch, self.kd.on_prompt).float()
            kd_sum = (self.divergence(student_logits, teacher_output) * kd_mask).sum()
            total = total + weight * self.kd.kd_scale * kd_sum / max(counts.kd_tokens, 1.0)
            reported["kd loss"] = torch.stack([kd_sum.detach(), kd_mask.sum()])

        with torch.set_grad_enabled(torch.is_grad_enabled() and weight < 1.0):
            ce = vocab_parallel_cross_entropy(
                student_logits, batch.labels,
                valid_vocab_size=self.valid_vocab_size, tp_group=self.tp_group,
            )
            ce_sum = (ce * ce_mask).sum()
        if weight < 1.0:
            total = total + (1.0 - weight) * ce_sum / max(counts.ce_tokens, 1.0)
        reported["lm loss"] = torch.stack([ce_sum.detach(), ce_mask.sum()])

        # The schedule divides gradients by sum(num_tokens) over microbatches and DP ranks;
        # report counts of the anchor mask and pre-multiply by its global total. The anchor is
        # the CE mask unless the iteration has no CE tokens (pure KD, or only the student's
        # own samples): it must be a mask with tokens, the same for the whole iteration.
        anchor_total = anchor_token_total(self.kd, counts)
        use_ce = weight < 1.0 and counts.ce_tokens > 0
        num_tokens = (ce_mask if use_ce else kd_mask).sum().to(torch.int)
        return total * anchor_total, num_tokens, reported
