"""Skew reverse KL (DistiLLM): reverse KL to a mixture that contains some of the teacher.

value  Rs = KL(q || m) = Sum q log(q / m),  m = (1 - a) p + a q,  a = skew_alpha
grad   q_i (phi_i - Sum q phi),  phi = log(q / m) - v,  v = a q / m (the student's share)

With u = rho - d (rho = log((1 - a) / a)): log(q / m) = -log a - softplus(u) and
v = 1 - sigmoid(u), so phi = -log a - 1 + psi with psi = sigmoid(u) - softplus(u). The constant
cancels in the gradient and the value is -log a - Sum q softplus(u) (Sum q = 1 exactly), so
neither carries the rounding of terms near log(1/a) where q >> p. At a = 0 (m = p): rkl.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from ._mixture import SKEW_ALPHA, Mixture
from .base import Block, Divergence, row_sum


class SkewReverseKL(Divergence):
    name = "srkl"
    summary = ("skew reverse KL(q, (1-a) p + a q), a = skew alpha (DistiLLM): reverse KL, "
               "stable where p underflows")
    parameters = (SKEW_ALPHA,)
    order = 3
    n_terms = 2
    f_divergence = True
    skew_alpha: float

    def _softplus_u(self, block: Block) -> torch.Tensor:
        """softplus(rho - d) = -log(q / m) - log a, ``[n, c]`` (a > 0)."""
        return F.softplus(Mixture(w_p=1.0 - self.skew_alpha).rho - block.d)

    def _psi(self, block: Block) -> torch.Tensor:
        if self.skew_alpha == 0.0:
            return block.d.clone()
        u = Mixture(w_p=1.0 - self.skew_alpha).rho - block.d
        return torch.sigmoid(u).sub_(F.softplus(u))

    def partial_sums(self, block: Block) -> torch.Tensor:  # [Sum q softplus(u), Sum q psi]
        q = block.q
        first = block.d if self.skew_alpha == 0.0 else self._softplus_u(block)
        return torch.stack([row_sum(first * q), row_sum(self._psi(block).mul_(q))], dim=-1)

    def finalize(self, totals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.skew_alpha == 0.0:
            value = totals[:, 0].clone()
        else:
            value = totals[:, 0].neg() - math.log(self.skew_alpha)
        return value, totals[:, 1:2].clone()

    def logit_grad(self, block: Block, aux: torch.Tensor) -> torch.Tensor:
        return self._psi(block).sub_(aux[:, 0:1]).mul_(block.q)
