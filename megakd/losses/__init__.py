"""Vocab-parallel distillation losses (see docs/losses.md).

Every function takes this rank's vocab shard of the logits (``[b, s, V/tp]``; any leading
dims) and the tensor-parallel group, communicates only per-token scalars (or ``k`` per-token
candidates for top-k), and returns per-token fp32 values ``[b, s]`` that the caller masks and
reduces. The divergence kinds are a registry (``DIVERGENCES``), one module per kind in
``megakd/losses/divergences/``.
"""

from megakd.formats.topk import TeacherTopK, topk_bytes_per_token

from .cross_entropy import vocab_parallel_cross_entropy
from .dense import vocab_parallel_divergence
from .divergences import (
    DIVERGENCES,
    Divergence,
    Parameter,
    divergence_parameters,
    make_divergence,
)
from .topk import teacher_topk, topk_divergence

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "Parameter",
    "TeacherTopK",
    "divergence_parameters",
    "make_divergence",
    "teacher_topk",
    "topk_bytes_per_token",
    "topk_divergence",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_divergence",
]
