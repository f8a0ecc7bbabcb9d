"""The rearrangements between HuggingFace tensors and megatron-core's fused ones (TP=1).

``linear_qkv`` rows are grouped per query group: ``[q heads of group 0, k0, v0, q heads of
group 1, k1, v1, ...]`` (each block ``head_dim`` rows), which is what megatron's TP split of
dim 0 hands out group by group. ``linear_fc1`` of SwiGLU is ``[gate; up]``; megatron's
checkpoint factory shards each half separately, so a TP=1 tensor loads at any TP.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from megakd.convert.family import COPY, GATE_UP, QKV, VOCAB


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int,
             head_dim: int) -> torch.Tensor:
    """HF ``q [heads*d, ...]``, ``k, v [groups*d, ...]`` -> megatron ``[groups*(heads/groups+2)*d, ...]``
    (weights ``[out, hidden]`` or biases ``[out]``)."""
    rest = q.shape[1:]
    q = q.reshape(num_query_groups, -1, *rest)
    k = k.reshape(num_query_groups, head_dim, *rest)
    v = v.reshape(num_query_groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int,
              head_dim: int) -> List[torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: ``[q, k, v]`` as HF stores them (fresh contiguous tensors)."""
    rest = qkv.shape[1:]
    heads_per_group = num_attention_heads // num_query_groups
    grouped = qkv.reshape(num_query_groups, (heads_per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return [part.reshape(-1, *rest).clone() for part in (q, k, v)]


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended (or rows dropped) to ``rows`` rows."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    padding = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding], dim=0)


def hf_to_megatron(kind: str, tensors: Sequence[torch.Tensor], *, num_query_groups: int,
                   head_dim: int, padded_vocab_size: int) -> torch.Tensor:
    """One megatron tensor from the HF tensors of a :class:`~megakd.convert.family.WeightRule`."""
    if kind == COPY:
        return tensors[0]
    if kind == QKV:
        return fuse_qkv(*tensors, num_query_groups=num_query_groups, head_dim=head_dim)
    if kind == GATE_UP:
        return torch.cat(list(tensors), dim=0)
    if kind == VOCAB:
        return pad_rows(tensors[0], padded_vocab_size)
    raise ValueError(f"unknown rule kind {kind!r}")


def megatron_to_hf(kind: str, tensor: torch.Tensor, *, num_attention_heads: int,
                   num_query_groups: int, head_dim: int, vocab_size: int) -> List[torch.Tensor]:
    """The HF tensors of a rule from its megatron tensor (fresh, contiguous, own storage)."""
    if kind == COPY:
        return [tensor.clone()]
    if kind == QKV:
        return split_qkv(tensor, num_attention_heads, num_query_groups, head_dim)
    if kind == GATE_UP:
        return [half.clone() for half in torch.chunk(tensor, 2, dim=0)]
    if kind == VOCAB:
        return [pad_rows(tensor, vocab_size).clone()]
    raise ValueError(f"unknown rule kind {kind!r}")
