"""Vocab-parallel distillation losses (see docs/losses.md).

Every function takes this rank's vocab shard of the logits (``[s, b, V/tp]``) and the
tensor-parallel group, communicates only per-token scalars (or ``k`` per-token candidates for
top-k), and returns per-token fp32 values ``[s, b]`` that the caller masks and reduces.
"""

from ._kernels import AKL_EPS, DIVERGENCE_KINDS, DivergenceSpec
from .cross_entropy import vocab_parallel_cross_entropy
from .divergences import vocab_parallel_divergence
from .topk import TOPK_DTYPES, TeacherTopK, teacher_topk, topk_bytes_per_token, topk_divergence

__all__ = [
    "AKL_EPS",
    "DIVERGENCE_KINDS",
    "DivergenceSpec",
    "TOPK_DTYPES",
    "TeacherTopK",
    "teacher_topk",
    "topk_bytes_per_token",
    "topk_divergence",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_divergence",
]
