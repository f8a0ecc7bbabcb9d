"""What a prune keeps: layers, hidden channels, and per kept layer its heads and MLP neurons.

A :class:`PruningPlan` holds global indices into the source model (0-based, ascending, so the
pruned model keeps the source's order of everything it keeps). It is the whole result of the
importance stage, identical on every rank, and all the slicing stage needs; it is written
next to the pruned weights as ``pruning.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List

from megakd.configs import ModelArchConfig, PruneConfig
from megakd.prune.importance import Importance, top_heads, top_indices, top_layers


@dataclass
class PruningPlan:
    layers: List[int]  # kept source layers; pruned layer j is source layer layers[j]
    hidden: List[int]  # kept hidden channels
    heads: Dict[int, List[int]]  # source layer -> kept heads (global head indices)
    ffn: Dict[int, List[int]]  # source layer -> kept MLP neurons
    query_groups: int
    head_dim: int
    source_heads: int  # heads of the source (per layer)
    source_ffn: int  # MLP width of the source

    def as_json(self) -> dict:
        """JSON-ready (integer keys become strings)."""
        out = asdict(self)
        out["heads"] = {str(k): v for k, v in self.heads.items()}
        out["ffn"] = {str(k): v for k, v in self.ffn.items()}
        return out

    @classmethod
    def from_json(cls, data: dict) -> "PruningPlan":
        fields = dict(data)
        fields["heads"] = {int(k): v for k, v in data["heads"].items()}
        fields["ffn"] = {int(k): v for k, v in data["ffn"].items()}
        return cls(**fields)


def plan_pruning(importance: Importance, source: ModelArchConfig, prune: PruneConfig
                 ) -> PruningPlan:
    """Keep the most important units of each kind, as many as the targets say (an unset
    target keeps every unit of its kind). Heads and neurons are chosen per layer; the same
    number is kept in every layer (a homogeneous pruned model)."""
    layers = top_layers(importance.layers, prune.target_num_layers or source.num_layers)
    heads = prune.target_num_attention_heads or source.num_attention_heads
    ffn = prune.target_ffn_hidden_size or source.ffn_hidden_size
    return PruningPlan(
        layers=layers,
        hidden=top_indices(importance.hidden, prune.target_hidden_size or source.hidden_size),
        heads={layer: top_heads(importance.heads[layer], source.query_groups, heads)
               for layer in layers},
        ffn={layer: top_indices(importance.ffn[layer], ffn) for layer in layers},
        query_groups=source.query_groups, head_dim=source.head_dim,
        source_heads=source.num_attention_heads, source_ffn=source.ffn_hidden_size)
