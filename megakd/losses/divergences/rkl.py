"""Reverse KL.

value  R = KL(q || p) = Sum q d,  d = lq - lp
grad   dR/dx_i = q_i (d_i - R)
"""

from __future__ import annotations

from typing import Tuple

import torch

from .base import Block, Divergence, row_sum


class ReverseKL(Divergence):
    name = "rkl"
    summary = "reverse KL(q, p): mode-seeking, the student commits to the teacher's modes"
    order = 1
    n_terms = 1
    f_divergence = True

    def partial_sums(self, block: Block) -> torch.Tensor:
        return row_sum(block.d.mul(block.q)).unsqueeze(-1)

    def finalize(self, totals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return totals[:, 0].clone(), totals[:, :1].clone()

    def logit_grad(self, block: Block, aux: torch.Tensor) -> torch.Tensor:
        return (block.d - aux[:, 0:1]).mul_(block.q)
