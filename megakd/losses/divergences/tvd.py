"""Total variation distance.

value  1/2 Sum |p - q|
grad   q_i (sign(d_i) / 2 - A),  A = 1/2 Sum q sign(d),  d = lq - lp

The sign is taken of d (exact where p == q) rather than of q - p (0 wherever both round to the
same float, e.g. 1 or 0). The gradient is written with the student's mass on each side,
B+ = Sum_{d>0} q, B- = Sum_{d<0} q, B0 = Sum_{d=0} q (B+ + B- + B0 = 1), as
q_i (B- + B0/2) where d_i > 0, -q_i (B+ + B0/2) where d_i < 0, and -q_i (B+ - B-)/2 where
d_i = 0: no 1/2 - A cancellation where the student saturates. |p - q| is not differentiable
at p == q; sign(0) = 0 is used there, as torch.abs does.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .base import Block, Divergence, row_sum


class TotalVariation(Divergence):
    name = "tvd"
    summary = "total variation 1/2 Sum abs(p - q): bounded in [0, 1], robust to outlier tokens"
    order = 5
    n_terms = 4
    f_divergence = True
    smooth = False  # |p - q| has no derivative at p == q

    def partial_sums(self, block: Block) -> torch.Tensor:  # [Sum |p - q|, B+, B-, B0]
        q, d = block.q, block.d
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        sides = [row_sum(torch.where(side, q, zero)) for side in (d > 0, d < 0, d == 0)]
        return torch.stack([row_sum(block.abs_gap()), *sides], dim=-1)

    def finalize(self, totals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return 0.5 * totals[:, 0], totals[:, 1:4].clone()

    def logit_grad(self, block: Block, aux: torch.Tensor) -> torch.Tensor:
        b_pos, b_neg, b_zero = aux[:, 0:1], aux[:, 1:2], aux[:, 2:3]
        d = block.d
        g = torch.where(d > 0, b_neg + 0.5 * b_zero, -0.5 * (b_pos - b_neg))
        g = torch.where(d < 0, -(b_pos + 0.5 * b_zero), g)
        return g.mul_(block.q)
