"""``tools/prune.py``: the targets of a Minitron-style prune, its calibration, and the rules
between the targets and the architecture being pruned (docs/pruning.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from megakd.configs.checkpoint import CheckpointConfig
from megakd.configs.data import DataConfig
from megakd.configs.fields import flag
from megakd.configs.model import ModelArchConfig
from megakd.configs.parallel import ParallelConfig
from megakd.configs.run import RuntimeConfig
from megakd.configs.training import TrainingConfig

# How layers are ranked for depth pruning: "cosine" = Minitron's Block Importance (1 - cosine
# similarity between a layer's input and output), "lm-loss" = the LM loss with the layer left
# out (one extra calibration pass per layer).
LAYER_IMPORTANCE = ("cosine", "lm-loss")


@dataclass
class PruneConfig:
    """What to keep (an unset target keeps that size) and how importance is measured."""

    target_num_layers: Optional[int] = flag(
        None, name="--target-num-layers", low=1, default_text="keep all",
        help="layers to keep: the least important ones (--layer-importance) are dropped")
    target_hidden_size: Optional[int] = flag(
        None, name="--target-hidden-size", low=1, default_text="keep all",
        help="hidden (embedding) channels to keep, in every norm, layer, the embeddings and "
             "the output layer")
    target_ffn_hidden_size: Optional[int] = flag(
        None, name="--target-ffn-hidden-size", low=1, default_text="keep all",
        help="MLP neurons to keep in every layer")
    target_num_attention_heads: Optional[int] = flag(
        None, name="--target-num-attention-heads", low=1, default_text="keep all",
        help="attention heads to keep in every layer: a multiple of the query groups, which "
             "are never pruned (the same number of heads is kept in each group); the head dim "
             "stays the source's")
    calib_batches: int = flag(
        32, name="--calib-batches", low=1,
        help="calibration microbatches (of --micro-batch-size samples, the first ones of the "
             "train split) whose activations rank heads, neurons, channels and layers")
    layer_importance: str = flag(
        "cosine", name="--layer-importance", choices=LAYER_IMPORTANCE,
        help="how layers are ranked: cosine = 1 - cosine similarity of a layer's input and "
             "output (Minitron's Block Importance); lm-loss = LM loss on the calibration data "
             "with the layer left out (one more calibration pass per layer)")


def pruned_architecture(source: ModelArchConfig, prune: PruneConfig) -> ModelArchConfig:
    """The architecture after pruning: each target or the source's size. The head dim and the
    query groups are written out explicitly (``kv_channels`` keeps the source's head dim when
    heads or hidden channels are pruned)."""
    return dataclasses.replace(
        source,
        num_layers=prune.target_num_layers or source.num_layers,
        hidden_size=prune.target_hidden_size or source.hidden_size,
        ffn_hidden_size=prune.target_ffn_hidden_size or source.ffn_hidden_size,
        num_attention_heads=prune.target_num_attention_heads or source.num_attention_heads,
        num_query_groups=source.query_groups,
        kv_channels=source.head_dim,
    )


def prune_rules(prune: PruneConfig, source: ModelArchConfig, par: ParallelConfig) -> List[str]:
    """Targets against the architecture being pruned (``source``, from ``--load``'s
    megakd_model.json) and the layout the pruned model must also load at."""
    errors: List[str] = []
    tp = par.tensor_model_parallel_size
    experts = getattr(source, "num_experts", None)
    if experts:
        errors.append(f"--load: a mixture-of-experts model ({experts} experts); tools/prune.py "
                      "prunes dense models")
    for name, target, size in (
            ("--target-num-layers", prune.target_num_layers, source.num_layers),
            ("--target-hidden-size", prune.target_hidden_size, source.hidden_size),
            ("--target-ffn-hidden-size", prune.target_ffn_hidden_size, source.ffn_hidden_size),
            ("--target-num-attention-heads", prune.target_num_attention_heads,
             source.num_attention_heads)):
        if target is not None and target > size:
            errors.append(f"{name}={target} is larger than the source's {size} (--load)")
    heads = prune.target_num_attention_heads
    if heads is not None and heads <= source.num_attention_heads:
        groups = source.query_groups
        if heads % groups:
            errors.append(f"--target-num-attention-heads={heads} is not a multiple of the "
                          f"source's {groups} query groups (query groups are never pruned; "
                          "keep heads per group x groups)")
        if heads % tp:
            errors.append(f"--target-num-attention-heads={heads} is not divisible by "
                          f"--tensor-model-parallel-size={tp}")
    ffn = prune.target_ffn_hidden_size
    if ffn is not None and ffn <= source.ffn_hidden_size and ffn % tp:
        errors.append(f"--target-ffn-hidden-size={ffn} is not divisible by "
                      f"--tensor-model-parallel-size={tp}")
    return errors


@dataclass
class PruneRunConfig:
    """Everything ``tools/prune.py`` needs: the model to prune (from ``--load``), its layout,
    the calibration data and batch, the targets, and where to write the pruned model."""

    model: ModelArchConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)  # --micro-batch-size ...
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # --load, --save
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)

    @property
    def pruned(self) -> ModelArchConfig:
        return pruned_architecture(self.model, self.prune)
