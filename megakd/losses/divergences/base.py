"""What a divergence kind is: its parameters (with bounds) and its math on log-prob blocks.

A kind is evaluated in three steps on ``Block``s, ``[n, c]`` column blocks of student and
teacher log-probs that may hold only *part* of each row's distribution (one row chunk of one
vocab shard), so that the callers (``megakd.losses.dense``, ``megakd.losses.topk``) can
stream the vocabulary and all-reduce per-row scalars in between:

1. ``partial_sums(block)`` -> ``[n, n_terms]`` per-row sums over the block's columns; summed
   over chunks and ranks (one all-reduce) they give the row's totals.
2. ``finalize(totals)`` -> (value ``[N]``, aux ``[N, n_aux]``): the per-row value and the
   per-row scalars the gradient needs.
3. ``logit_grad(block, aux)`` -> ``[n, c]``: dValue/dx for the block's columns, x = logits / T.

The same methods serve the dense loss (columns = a vocab shard) and the top-k loss (columns =
the k (+1 tail) buckets, complete on every rank). Nothing here communicates.

Accuracy rules every kind follows (docs/losses.md, "Precision"): write terms as functions of
``d = lq - lp`` (exact where p == q, cancellation-free through ``expm1``, ``softplus``,
``sigmoid``); use that the probabilities of a row sum to exactly 1 instead of summing a
constant times them; and do not worry about the gradient entry at the student's dominant
token (q > 1/2): the callers replace it by minus the sum of the others (the gradient of a
function of softmax(x) sums to zero), which removes the cancellation of
``a_i - q_i Sum_j a_j`` where q saturates.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Dict, Optional, Tuple

import torch

from .._vocab_parallel import ShardLogProbs


@dataclass(frozen=True)
class Parameter:
    """A numeric parameter of one or more divergence kinds; the CLI flag and docs come from it."""

    name: str  # python identifier, e.g. "skew_alpha"
    flag: str  # e.g. "--kd-skew-alpha"
    default: float
    low: float
    high: float
    low_inclusive: bool
    high_inclusive: bool
    help: str

    @property
    def interval(self) -> str:
        """The bounds in interval notation, e.g. ``[0, 1)``."""
        return (f"{'[' if self.low_inclusive else '('}{self.low:g}, "
                f"{self.high:g}{']' if self.high_inclusive else ')'}")

    def contains(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below

    def check(self, value: float) -> Optional[str]:
        """None if ``value`` is inside the bounds, else a one-line message naming the flag."""
        if self.contains(float(value)):
            return None
        return f"{self.flag} must be in {self.interval}, got {value:g}"


class Block:
    """Student and teacher log-probs of the same columns ``[n, c]`` (fp32 for vocab chunks,
    float64 for top-k buckets), plus what a kind derives from them (computed once per block,
    each a new ``[n, c]`` tensor).

    ``extra`` is per-column side information a kind asked for through its hooks (``akl``: the
    teacher's head mask); None otherwise. ``lq`` and ``lp`` must not be modified.
    """

    def __init__(self, lq: torch.Tensor, lp: torch.Tensor,
                 extra: Optional[torch.Tensor] = None) -> None:
        self.lq, self.lp, self.extra = lq, lp, extra

    @cached_property
    def q(self) -> torch.Tensor:
        return self.lq.exp()

    @cached_property
    def p(self) -> torch.Tensor:
        return self.lp.exp()

    @cached_property
    def d(self) -> torch.Tensor:
        """``lq - lp``: exact (0) where the two distributions agree, unlike ``q - p``."""
        return self.lq - self.lp

    def abs_gap(self) -> torch.Tensor:
        """``|q - p|`` as ``max(q, p) * (1 - exp(-|d|))``: relative accuracy where q ~ p."""
        return torch.maximum(self.lq, self.lp).exp_().mul_(torch.expm1(-self.d.abs()).neg_())


def row_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=-1)


class Divergence:
    """A divergence between the teacher's (p) and the student's (q) token distributions.

    Subclasses set the class attributes and implement the three math methods (module
    docstring); instances hold the parameter values as attributes named after the
    ``Parameter``s, validated on construction. One subclass per module of this package.
    """

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, for --help and the docs' table
    parameters: ClassVar[Tuple[Parameter, ...]] = ()
    order: ClassVar[int] = 1000  # registry position (built-ins 0..6, new kinds after)
    n_terms: ClassVar[int]  # per-row partial sums produced by ``partial_sums``
    # An f-divergence: merging outcomes (top-k buckets) never increases it, so the top-k value
    # is a lower bound of the dense one (checked by the tests when True).
    f_divergence: ClassVar[bool] = False
    # Differentiable where p == q (the gradient is 0 there; tvd's |p - q| is not).
    smooth: ClassVar[bool] = True

    def __init__(self, **values: float) -> None:
        known = {p.name: p for p in self.parameters}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{self.name} has no parameter(s) {', '.join(unknown)}; "
                             f"expected {', '.join(known) or 'none'}")
        for param in self.parameters:
            value = float(values.get(param.name, param.default))
            message = param.check(value)
            if message is not None:
                raise ValueError(message)
            setattr(self, param.name, value)

    @property
    def values(self) -> Dict[str, float]:
        return {p.name: getattr(self, p.name) for p in self.parameters}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.values.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.values == self.values  # type: ignore

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.values.items())))

    # ------------------------------------------------------------------------------- math
    def partial_sums(self, block: Block) -> torch.Tensor:
        """Per-row sums ``[n, n_terms]`` over the block's columns."""
        raise NotImplementedError

    def finalize(self, totals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Totals ``[N, n_terms]`` -> (value ``[N]``, aux ``[N, n_aux]``)."""
        raise NotImplementedError

    def logit_grad(self, block: Block, aux: torch.Tensor) -> torch.Tensor:
        """dValue/dx ``[n, c]`` for the block's columns (a new tensor); ``aux`` ``[n, n_aux]``."""
        raise NotImplementedError

    # ----------------------------------------------------- hooks for per-column side information
    def dense_state(self, teacher: ShardLogProbs) -> Optional[torch.Tensor]:
        """Per-row state ``[N, ...]`` computed from the teacher's full distribution before the
        partial sums of the dense loss (may communicate through ``teacher``). None: not needed."""
        return None

    def dense_extra(self, state: torch.Tensor, lp: torch.Tensor) -> Optional[torch.Tensor]:
        """``Block.extra`` of a dense block from its rows' ``state`` and teacher log-probs."""
        return None

    def bucket_extra(self, lp: torch.Tensor, n_top: int) -> Optional[torch.Tensor]:
        """``Block.extra`` of the top-k buckets (``lp`` ``[N, k(+1)]``, the first ``n_top``
        are the teacher's sorted top-k tokens, then the tail bucket if present)."""
        return None
