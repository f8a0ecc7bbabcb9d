"""Skew KL (DistiLLM): forward KL to a mixture that contains some of the student.

value  KL(p || m) = Sum p log(p / m),  m = a p + (1 - a) q,  a = skew_alpha
grad   -p_i w_i + q_i S,  w = (1 - a) q / m (the student's share of m),  S = Sum p w
"""

from __future__ import annotations

from typing import Tuple

import torch

from ._mixture import SKEW_ALPHA, Mixture
from .base import Block, Divergence, row_sum


class SkewKL(Divergence):
    name = "skl"
    summary = ("skew KL(p, a p + (1-a) q), a = skew alpha (DistiLLM): forward KL, finite where "
               "q underflows")
    parameters = (SKEW_ALPHA,)
    order = 2
    n_terms = 2
    f_divergence = True
    skew_alpha: float

    @property
    def mixture(self) -> Mixture:
        return Mixture(w_p=self.skew_alpha)

    def partial_sums(self, block: Block) -> torch.Tensor:  # [Sum p log(p/m), Sum p w]
        mix, p = self.mixture, block.p
        value = row_sum(mix.log_p_over_m(block.d).mul_(p))
        return torch.stack([value, row_sum(mix.q_share(block.d).mul_(p))], dim=-1)

    def finalize(self, totals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return totals[:, 0].clone(), totals[:, 1:2].clone()

    def logit_grad(self, block: Block, aux: torch.Tensor) -> torch.Tensor:
        g = self.mixture.q_share(block.d).mul_(block.p).neg_()
        return g.add_(block.q * aux[:, 0:1])
