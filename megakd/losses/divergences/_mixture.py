"""Mixtures m = w_p p + w_q q (w_p + w_q = 1) for skl, srkl and jsd, as functions of
``d = lq - lp`` only, so they never take the log of a sum of underflowed probabilities and stay
exact where p == q:

* ``log(q / m) = -log(w_q + w_p e^-d)``, ``log(p / m) = -log(w_p + w_q e^d)``;
* the student's share of m, ``w_q q / m = sigmoid(d - rho)``, ``rho = log(w_p / w_q)``.

Each log-ratio is ``-log(w) - softplus(...)`` of its own side (never the other one +- d, which
would cancel where |d| is large); a zero weight (a bound of the skew parameter) is exact too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Parameter

SKEW_ALPHA = Parameter(
    name="skew_alpha",
    flag="--kd-skew-alpha",
    default=0.1,
    low=0.0,
    high=1.0,
    low_inclusive=True,
    high_inclusive=False,
    help="skl / srkl: weight of the skewing distribution in the mixture m (0: plain fkl / rkl)",
)


class Mixture:
    """m = w_p p + w_q q with ``w_p`` in [0, 1]."""

    def __init__(self, w_p: float) -> None:
        self.w_p, self.w_q = float(w_p), 1.0 - float(w_p)
        self.log_wp = math.log(self.w_p) if self.w_p > 0 else -math.inf
        self.log_wq = math.log(self.w_q) if self.w_q > 0 else -math.inf
        self.rho = self.log_wp - self.log_wq  # +-inf when one weight is 0

    def log_q_over_m(self, d: torch.Tensor) -> torch.Tensor:
        """``log(q / m) = -log w_q - softplus(rho - d)`` ``[n, c]`` from ``d = lq - lp``."""
        if self.w_q == 0.0:  # m = p
            return d.clone()
        return F.softplus(self.rho - d).add_(self.log_wq).neg_()

    def log_p_over_m(self, d: torch.Tensor) -> torch.Tensor:
        """``log(p / m) = -log w_p - softplus(d - rho)`` ``[n, c]`` from ``d = lq - lp``."""
        if self.w_p == 0.0:  # m = q
            return d.neg()
        return F.softplus(d - self.rho).add_(self.log_wp).neg_()

    def q_share(self, d: torch.Tensor) -> torch.Tensor:
        """The student's share of the mixture, ``w_q q / m = sigmoid(d - rho)``."""
        return torch.sigmoid(d - self.rho)
