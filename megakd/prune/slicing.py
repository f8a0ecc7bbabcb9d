"""Slicing one global checkpoint tensor to the pruned architecture.

The tensors are the layout-free ones a megakd checkpoint stores (megatron-core's
``dist_checkpointing`` keys, as at TP=1; decoder-layer tensors are stacked over layers and
sliced here one layer at a time):

=====================================================  =============================================
key (suffix)                                           axes ``[rows, cols]`` -> kept indices
=====================================================  =============================================
``embedding.word_embeddings.weight`` ``[V, h]``        cols: hidden
``embedding.position_embeddings.weight`` ``[P, h]``    cols: hidden
``output_layer.weight`` ``[V, h]`` (untied)            cols: hidden
``decoder.final_layernorm.{weight,bias}`` ``[h]``      hidden
``*.layer_norm_{weight,bias}`` ``[h]``                 hidden (a layer's input / pre-MLP norm)
``linear_qkv.weight`` ``[(H + 2G) d, h]``              rows: kept query heads + every k, v; cols:
                                                       hidden. Rows are grouped per query group:
                                                       ``[q_0 .. q_{H/G-1}, k, v]`` x ``d`` each
``linear_qkv.bias`` ``[(H + 2G) d]``                   rows as above
``linear_proj.weight`` ``[h, H d]``                    rows: hidden; cols: kept heads x ``d``
``linear_proj.bias``, ``linear_fc2.bias`` ``[h]``      hidden
``{q,k}_layernorm.*`` ``[d]``                          unchanged (the head dim is kept)
``linear_fc1.weight`` ``[F or 2F, h]``                 rows: kept neurons (gated: in both the
                                                       gate half and the up half); cols: hidden
``linear_fc1.bias`` ``[F or 2F]``                      rows as above
``linear_fc2.weight`` ``[h, F]``                       rows: hidden; cols: kept neurons
=====================================================  =============================================
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from megakd.prune.plan import PruningPlan

LAYER_PREFIX = "decoder.layers."
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


class UnknownTensorError(KeyError):
    """A checkpoint tensor that the pruning rules do not know (MoE, another model type)."""


def _index(kept: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(kept), dtype=torch.long)


def qkv_rows(plan: PruningPlan, layer: int) -> List[int]:
    """Rows of ``linear_qkv`` kept for ``layer``: per query group, its kept query heads then
    its key and value heads, each ``d`` rows."""
    per_group = plan.source_heads // plan.query_groups
    stride = per_group + 2  # q heads, k, v of one group
    kept = set(plan.heads[layer])
    heads = []
    for group in range(plan.query_groups):
        heads += [group * stride + local for local in range(per_group)
                  if group * per_group + local in kept]
        heads += [group * stride + per_group, group * stride + per_group + 1]
    return [head * plan.head_dim + c for head in heads for c in range(plan.head_dim)]


def proj_columns(plan: PruningPlan, layer: int) -> List[int]:
    return [head * plan.head_dim + c for head in plan.heads[layer] for c in range(plan.head_dim)]


def fc1_rows(plan: PruningPlan, layer: int, rows: int) -> List[int]:
    """Kept rows of ``linear_fc1`` (``rows``: F, or 2F = [gate; up] for a gated MLP)."""
    kept = plan.ffn[layer]
    if rows == 2 * plan.source_ffn:
        return kept + [plan.source_ffn + j for j in kept]
    return kept


def _select(tensor: torch.Tensor, rows: Optional[Sequence[int]] = None,
            cols: Optional[Sequence[int]] = None) -> torch.Tensor:
    if rows is not None:
        tensor = tensor.index_select(0, _index(rows))
    if cols is not None:
        tensor = tensor.index_select(1, _index(cols))
    return tensor.contiguous()


Rule = Callable[[torch.Tensor, PruningPlan, Optional[int]], torch.Tensor]

_RULES: Dict[str, Rule] = {
    "embedding.word_embeddings.weight": lambda t, p, l: _select(t, cols=p.hidden),
    "embedding.position_embeddings.weight": lambda t, p, l: _select(t, cols=p.hidden),
    "output_layer.weight": lambda t, p, l: _select(t, cols=p.hidden),
    "decoder.final_layernorm.weight": lambda t, p, l: _select(t, rows=p.hidden),
    "decoder.final_layernorm.bias": lambda t, p, l: _select(t, rows=p.hidden),
    "self_attention.linear_qkv.layer_norm_weight": lambda t, p, l: _select(t, rows=p.hidden),
    "self_attention.linear_qkv.layer_norm_bias": lambda t, p, l: _select(t, rows=p.hidden),
    "mlp.linear_fc1.layer_norm_weight": lambda t, p, l: _select(t, rows=p.hidden),
    "mlp.linear_fc1.layer_norm_bias": lambda t, p, l: _select(t, rows=p.hidden),
    "input_layernorm.weight": lambda t, p, l: _select(t, rows=p.hidden),
    "input_layernorm.bias": lambda t, p, l: _select(t, rows=p.hidden),
    "pre_mlp_layernorm.weight": lambda t, p, l: _select(t, rows=p.hidden),
    "pre_mlp_layernorm.bias": lambda t, p, l: _select(t, rows=p.hidden),
    "self_attention.linear_qkv.weight": lambda t, p, l: _select(t, qkv_rows(p, l), p.hidden),
    "self_attention.linear_qkv.bias": lambda t, p, l: _select(t, rows=qkv_rows(p, l)),
    "self_attention.linear_proj.weight": lambda t, p, l: _select(t, p.hidden,
                                                                 proj_columns(p, l)),
    "self_attention.linear_proj.bias": lambda t, p, l: _select(t, rows=p.hidden),
    "self_attention.q_layernorm.weight": lambda t, p, l: t,
    "self_attention.q_layernorm.bias": lambda t, p, l: t,
    "self_attention.k_layernorm.weight": lambda t, p, l: t,
    "self_attention.k_layernorm.bias": lambda t, p, l: t,
    "mlp.linear_fc1.weight": lambda t, p, l: _select(t, fc1_rows(p, l, t.shape[0]), p.hidden),
    "mlp.linear_fc1.bias": lambda t, p, l: _select(t, rows=fc1_rows(p, l, t.shape[0])),
    "mlp.linear_fc2.weight": lambda t, p, l: _select(t, p.hidden, p.ffn[l]),
    "mlp.linear_fc2.bias": lambda t, p, l: _select(t, rows=p.hidden),
}


def rule_for(key: str) -> Rule:
    """The slicing rule of a checkpoint tensor key (UnknownTensorError if there is none)."""
    name = key[len(LAYER_PREFIX):] if key.startswith(LAYER_PREFIX) else key
    if name not in _RULES:
        raise UnknownTensorError(key)
    return _RULES[name]


def prune_tensor(key: str, tensor: torch.Tensor, plan: PruningPlan,
                 layer: Optional[int] = None) -> torch.Tensor:
    """``tensor`` (the global tensor of ``key``; for a decoder-layer key, source layer
    ``layer``'s slice) sliced to what ``plan`` keeps."""
    return rule_for(key)(tensor, plan, layer)
