"""Minitron importance scores from calibration statistics, and the top-k choices they make.

Aggregation (as Minitron, arXiv:2407.14679, found best among the combinations it compared,
and as ModelOpt's ``mcore_minitron`` computes it): an activation's magnitude is averaged over the sequence, then combined over samples with an
L2 norm, ``sqrt(sum over samples of (mean_s |x|)^2)``. The mean over the sequence keeps every
token's contribution without letting long samples dominate; the L2 over samples rewards
channels that are large on some samples (a channel that matters a lot for a few inputs is
kept over one that is always slightly active), which the paper found ranks better than a
mean over the batch.

- MLP neuron ``j`` of a layer: that norm of its activation (the input of ``linear_fc2``).
- Attention head: the L2 norm, over the head's ``d`` channels, of the per-channel norms of
  its attention output (the input of ``linear_proj``).
- Hidden channel: the sum, over every layer's input norm and pre-MLP norm, of the per-channel
  norms of the normalised activations (the embedding channel as every layer reads it).
- Layer (depth): Block Importance, the mean over calibration tokens of
  ``1 - cos(layer input, layer output)``; or, with ``--layer-importance lm-loss``, the LM
  loss of the model with that layer left out (higher: more important either way).

Ties are broken towards the lower index everywhere (a stable descending sort).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from megakd.prune.statistics import LayerStatistics


@dataclass
class Importance:
    """Scores of every prunable unit (higher: more important). Layers 0-based, global."""

    hidden: torch.Tensor  # [h]
    heads: Dict[int, torch.Tensor]  # layer -> [H]
    ffn: Dict[int, torch.Tensor]  # layer -> [F]
    layers: Dict[int, float]  # layer -> score


def importance_from(statistics: Dict[int, LayerStatistics], head_dim: int) -> Importance:
    """Scores from every layer's statistics (:func:`megakd.prune.statistics.gather_statistics`)."""
    ordered = [statistics[i] for i in sorted(statistics)]
    hidden = torch.stack([s.hidden_sq.sqrt().sum(dim=0) for s in ordered]).sum(dim=0)
    heads = {i: s.head_sq.view(-1, head_dim).sum(dim=1).sqrt() for i, s in statistics.items()}
    ffn = {i: s.ffn_sq.sqrt() for i, s in statistics.items()}
    layers = {i: float(s.cosine_distance) / max(s.tokens, 1) for i, s in statistics.items()}
    return Importance(hidden=hidden, heads=heads, ffn=ffn, layers=layers)


def top_indices(scores: torch.Tensor, k: int) -> List[int]:
    """The indices of the ``k`` highest ``scores`` (ties: lower index first), ascending."""
    order = torch.sort(-scores.double(), stable=True).indices
    return sorted(int(i) for i in order[:k])


def top_heads(scores: torch.Tensor, query_groups: int, keep: int) -> List[int]:
    """Global indices of the ``keep`` heads to keep out of ``scores`` ``[H]``: the top
    ``keep / query_groups`` within every query group (groups are never pruned, so grouped-query
    attention keeps its structure), ascending."""
    per_group = scores.numel() // query_groups
    kept = []
    for group in range(query_groups):
        local = top_indices(scores[group * per_group:(group + 1) * per_group],
                            keep // query_groups)
        kept += [group * per_group + i for i in local]
    return kept


def top_layers(scores: Dict[int, float], keep: int) -> List[int]:
    """The ``keep`` most important layers (ties: lower index first), ascending."""
    ranked = sorted(scores, key=lambda layer: (-scores[layer], layer))
    return sorted(ranked[:keep])
