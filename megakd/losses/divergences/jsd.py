"""Generalised Jensen-Shannon divergence (as in TRL's GKD).

value  b Kp + (1 - b) Kq,  m = b p + (1 - b) q,  Kp = KL(p || m),  Kq = KL(q || m),  b = jsd_beta
grad   (1 - b) q_i (psi_i - Sum q psi),  psi = log(q / m) + log(1 - b) = -softplus(rho - d)

(rho = log(b / (1 - b)).) Kp = -log b - Sum p softplus(d - rho) and Kq = -log(1 - b) + Sum q psi
use Sum p = Sum q = 1 exactly, so the constants carry no rounding.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from ._mixture import Mixture
from .base import Block, Divergence, Parameter, row_sum

JSD_BETA = Parameter(
    name="jsd_beta",
    flag="--kd-jsd-beta",
    default=0.5,
    low=0.0,
    high=1.0,
    low_inclusive=False,
    high_inclusive=False,
    help="jsd: teacher weight b in m = b p + (1-b) q and in b KL(p||m) + (1-b) KL(q||m)",
)


class JensenShannon(Divergence):
    name = "jsd"
    summary = ("generalised Jensen-Shannon b KL(p, m) + (1-b) KL(q, m), m = b p + (1-b) q, "
               "b = jsd beta (as TRL GKD)")
    parameters = (JSD_BETA,)
    order = 4
    n_terms = 2
    f_divergence = True
    jsd_beta: float

    def _rho(self) -> float:
        return Mixture(w_p=self.jsd_beta).rho

    def partial_sums(self, block: Block) -> torch.Tensor:
        # [Sum p softplus(d - rho), Sum q softplus(rho - d)]
        rho = self._rho()
        kp = row_sum(F.softplus(block.d - rho).mul_(block.p))
        kq = row_sum(F.softplus(rho - block.d).mul_(block.q))
        return torch.stack([kp, kq], dim=-1)

    def finalize(self, totals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b = self.jsd_beta
        kp = totals[:, 0].neg() - math.log(b)
        kq = totals[:, 1].neg() - math.log(1.0 - b)
        return b * kp + (1.0 - b) * kq, totals[:, 1:2].neg()  # aux: Sum q psi

    def logit_grad(self, block: Block, aux: torch.Tensor) -> torch.Tensor:
        psi = F.softplus(self._rho() - block.d).neg_()
        return psi.sub_(aux[:, 0:1]).mul_(block.q).mul_(1.0 - self.jsd_beta)
