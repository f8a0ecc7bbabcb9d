"""Forward KL, the classic distillation objective.

value  F = KL(p || q) = Sum p (lp - lq) = -Sum p d
grad   dF/dx_i = q_i - p_i
"""

from __future__ import annotations

from typing import Tuple

import torch

from .base import Block, Divergence, row_sum


class ForwardKL(Divergence):
    name = "fkl"
    summary = "forward KL(p, q): mean-seeking, the classic KD objective"
    order = 0
    n_terms = 1
    f_divergence = True

    def partial_sums(self, block: Block) -> torch.Tensor:
        return row_sum(block.d.mul(block.p)).neg_().unsqueeze(-1)

    def finalize(self, totals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return totals[:, 0].clone(), totals[:, :0]

    def logit_grad(self, block: Block, aux: torch.Tensor) -> torch.Tensor:
        return block.lq.exp().sub_(block.p)
