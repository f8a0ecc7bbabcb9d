"""The teacher's per-token top-k: the wire format between teacher and student, and the content
of one token in the offline teacher cache.

Per token, identical on every tensor-parallel rank (``[...]`` = the logits' leading dims,
normally ``[b, s]``):

* ``logprobs`` ``[..., k]`` (bf16, float8_e4m3fn, or fp32 for tests and references): the
  teacher's tempered log-probs of its k most likely tokens *relative to the top-1 token*,
  ``log(p_i / p_1) <= 0``, sorted, so ``logprobs[..., 0] == 0``. For fp8 they are clamped at
  ``-FP8_MAX`` (e^-448 underflows fp32 anyway). e4m3 is a floating format, so its relative
  rounding (2^-4) is the same at every magnitude and no per-token scale is needed.
* ``indices`` ``[..., k]`` int32: global vocab ids.
* ``tail_logprob`` ``[...]`` fp32: ``log(1 - Sum_topk p)``, the log of the teacher's exact mass
  outside the top-k (``-inf`` when the top-k covers the whole valid vocab). It is not the
  log-normalizer: together with the relative values it fixes the same distribution, and it
  keeps the tail exact whatever the value dtype.

Bytes per token: ``k * (value bytes + 4) + 4`` (``topk_bytes_per_token``). This module imports
only torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Union

import torch

FP8_MAX = 448.0  # largest finite magnitude of torch.float8_e4m3fn
# Value dtypes by their flag name (``--kd-topk-dtype``); the only such map in megakd.
TOPK_VALUE_DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
# fp32 values are allowed too (exact transfer, for tests and references).
_ALLOWED_VALUE_DTYPES = (*TOPK_VALUE_DTYPES.values(), torch.float32)


def check_value_dtype(dtype: torch.dtype) -> None:
    """Raise ValueError unless ``dtype`` may hold top-k values (bf16, fp8 e4m3, fp32)."""
    if dtype not in _ALLOWED_VALUE_DTYPES:
        raise ValueError(f"top-k value dtype must be one of {_ALLOWED_VALUE_DTYPES}, got {dtype}")


def topk_bytes_per_token(k: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one token's ``TeacherTopK``: k values, k int32 ids, one fp32 tail."""
    return k * (torch.empty((), dtype=dtype).element_size() + 4) + 4


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate everywhere (``-inf -> 0``, ``0 -> -inf``)."""
    return torch.where(
        x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))
    )


@dataclass
class TeacherTopK:
    """A teacher's per-token top-k distribution (format in the module docstring)."""

    logprobs: torch.Tensor  # [..., k] relative log-probs, sorted, logprobs[..., 0] == 0
    indices: torch.Tensor  # [..., k] int32 global vocab ids
    tail_logprob: torch.Tensor  # [...] fp32 log of the mass outside the top-k
    temperature: float

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.logprobs.dtype

    def bytes_per_token(self) -> int:
        return topk_bytes_per_token(self.k, self.logprobs.dtype)

    def to(self, device: Union[torch.device, str]) -> "TeacherTopK":
        """A copy on ``device`` (dtypes unchanged)."""
        return replace(
            self,
            logprobs=self.logprobs.to(device),
            indices=self.indices.to(device),
            tail_logprob=self.tail_logprob.to(device),
        )

    def values_fp32(self) -> torch.Tensor:
        """Normalised teacher log-probs ``[..., k]`` fp32: the relative values shifted so that
        the k buckets carry exactly ``1 - exp(tail_logprob)``. Compression thus changes only
        how the top-k mass is shared among the k tokens, never the tail or the total."""
        rel = self.logprobs.to(torch.float64)  # [..., k]-sized: float64 costs nothing
        top1 = rel[..., :1]  # the largest value by the format (0 as produced)
        # log Sum exp(rel) as top1 + log1p(Sum of the others): exact where the top-1 saturates
        log_z = torch.log1p((rel[..., 1:] - top1).exp().sum(-1, keepdim=True)).add_(top1)
        log_topk_mass = log1mexp(self.tail_logprob.to(torch.float64))
        return (rel - log_z).add_(log_topk_mass.unsqueeze(-1)).to(torch.float32)
