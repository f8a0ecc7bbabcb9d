"""What is distilled: the divergence, its weight against CE, temperature, tokens, top-k."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megakd.configs.fields import flag

TOPK_DTYPE_NAMES = ("bf16", "fp8")  # values of megakd.formats.topk.TOPK_VALUE_DTYPES
INTERMEDIATE_LOSSES = ("cosine", "mse")  # per-token hidden-state losses (docs/intermediate_kd.md)
# What --kd-teacher-window 0 (auto) keeps one rank's held teacher outputs under.
AUTO_TEACHER_WINDOW_GIB = 4


@dataclass
class KDConfig:
    """Which divergence, on which tokens, how it is weighted against the student's CE.

    The divergence kinds and their parameters come from the registry in
    :mod:`megakd.losses.divergences`: ``--kd-loss`` takes its names, and each kind's parameters
    (``--kd-skew-alpha``, ...) are flags whose values land in :attr:`divergence_params`.
    """

    loss: str = flag("fkl", name="--kd-loss", default_text="fkl",
                     help="divergence between teacher p and student q (docs/losses.md)")
    temperature: float = flag(1.0, name="--kd-temperature", low=0.0, low_inclusive=False,
                              help="T, applied to teacher and student")
    loss_weight: float = flag(1.0, name="--kd-loss-weight", low=0.0, high=1.0,
                              help="w in (1 - w) * CE + w * KD; 0 is plain LM training (no "
                                   "teacher is built), 1 is pure KD")
    temperature_scaling: bool = flag(False, name="--kd-temperature-scaling",
                                     help="multiply the KD term by T^2 (Hinton et al.)")
    on_prompt: bool = flag(False, name="--kd-on-prompt",
                           help="distill on prompt tokens too (default: the CE loss mask)")
    topk: Optional[int] = flag(None, name="--kd-topk", low=1,
                               help="distill on the teacher's top-k tokens plus the exact tail "
                                    "mass")
    topk_dtype: str = flag("bf16", name="--kd-topk-dtype", choices=TOPK_DTYPE_NAMES,
                           help="bf16 or fp8 (e4m3: values are log-probs relative to the "
                                "top-1, no scale needed) for transferred top-k values")
    topk_renormalize: bool = flag(False, name="--kd-topk-renormalize",
                                  help="renormalise over the top-k and drop the tail (the "
                                       "ROLL/ModelOpt variant, for comparison)")
    teacher_window: int = flag(
        0, name="--kd-teacher-window", low=0, default_text="0 (auto)",
        help="microbatches per teacher window: the teacher's forward over W microbatches, then "
             "the student's schedule over the same W, gradients accumulating (held teacher "
             "outputs: W x b x s x V/tp); 0 picks every microbatch if their outputs fit in "
             f"{AUTO_TEACHER_WINDOW_GIB} GiB, else the most that fit (docs/performance.md)")
    intermediate_pairs: Optional[str] = flag(
        None, name="--kd-intermediate-pairs", metavar="S:T[,S:T...]",
        help="intermediate-layer KD: pairs of student layer : teacher layer, 1-based global "
             "layer numbers as megatron's layer_number (e.g. 3:7,5:15: the output of the "
             "student's 3rd transformer layer is distilled toward the teacher's 7th); needs a "
             "live teacher (docs/intermediate_kd.md)")
    intermediate_loss: str = flag("cosine", name="--kd-intermediate-loss",
                                  choices=INTERMEDIATE_LOSSES,
                                  help="per-token hidden-state loss: cosine (1 - cos) or mse "
                                       "(mean over the teacher's hidden size), after the "
                                       "student's learned projection when hidden sizes differ")
    intermediate_weight: float = flag(
        1.0, name="--kd-intermediate-weight", low=0.0,
        help="weight of the hidden-state term (summed over the pairs, a token mean over the KD "
             "mask) added to the logit objective; 0 reports it without training on it")
    # The registry's parameter flags, by parameter name (e.g. {"skew_alpha": 0.1}); a kind's
    # parameters missing here take their registry defaults.
    divergence_params: Dict[str, float] = field(default_factory=dict)

    @property
    def uses_teacher(self) -> bool:
        """A KD term is trained (w > 0), so a teacher (live or cached) is needed."""
        return self.loss_weight > 0

    @property
    def kd_scale(self) -> float:
        """Factor of the KD term: T^2 with ``--kd-temperature-scaling``, else 1."""
        return self.temperature ** 2 if self.temperature_scaling else 1.0

    @property
    def layer_pairs(self) -> List[Tuple[int, int]]:
        """``--kd-intermediate-pairs`` as ``[(student layer, teacher layer), ...]`` (1-based);
        ``[]`` when unset. Raises ValueError on a malformed value (the rules report it)."""
        return parse_layer_pairs(self.intermediate_pairs)

    def objective(self, ce_mean: Optional[float], kd_mean: Optional[float],
                  hidden_mean: Optional[float] = None) -> Optional[float]:
        """The optimised objective ``(1 - w) * CE + w * scale * KD + w_h * hidden`` from token
        means (None when CE is unknown, e.g. off the last pipeline stage)."""
        if ce_mean is None:
            return None
        total = (1.0 - self.loss_weight) * ce_mean
        if kd_mean is not None:
            total += self.loss_weight * self.kd_scale * kd_mean
        if hidden_mean is not None:
            total += self.intermediate_weight * hidden_mean
        return total


def parse_layer_pairs(text: Optional[str]) -> List[Tuple[int, int]]:
    """``"3:7,5:15"`` -> ``[(3, 7), (5, 15)]``; ValueError naming the bad item."""
    if text is None or not text.strip():
        return []
    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"--kd-intermediate-pairs: {item.strip()!r} is not "
                             "STUDENT_LAYER:TEACHER_LAYER (1-based integers, e.g. 3:7)")
        pairs.append((int(parts[0]), int(parts[1])))
    return pairs
