"""What a HuggingFace model family is to the converters: a declarative table, no code paths.

A :class:`ModelFamily` lists

- :class:`WeightRule` rows: one megatron-core ``GPTModel`` state-dict entry (local layer spec,
  TP=1/PP=1/EP=1; ``{layer}`` stands for the layer index, ``{expert}`` for the expert index of
  a MoE layer), the HuggingFace tensors it is made of, and the kind of rearrangement between
  them (:mod:`megakd.convert.tensors`);
- :class:`FieldCheck` rows: ``config.json`` fields whose values megatron's ``GPTModel`` cannot
  express, each with the values that are accepted and why;
- the config fields that are read or harmless, and the extra fields the reverse conversion
  writes;
- for mixture-of-experts families, :class:`MoEFields`: where ``config.json`` keeps the expert
  count, the expert width and the router's top-k normalisation.

The Llama-style building blocks below are shared; each family module (``llama.py``,
``qwen2.py``, ...) composes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

# Rearrangement kinds (implemented in megakd.convert.tensors).
COPY = "copy"  # same tensor
QKV = "qkv"  # HF q, k, v  <->  megatron linear_qkv, interleaved per query group [q.., k, v]
GATE_UP = "gate_up"  # HF gate_proj, up_proj  <->  megatron linear_fc1 = [gate; up]
VOCAB = "vocab"  # HF rows  <->  megatron rows padded to the padded vocab width


@dataclass(frozen=True)
class WeightRule:
    megatron: str
    hf: Tuple[str, ...]
    kind: str = COPY


@dataclass(frozen=True)
class FieldCheck:
    """``config.json[name]`` must be one of ``accepted`` (a missing field reads as ``None``)."""

    name: str
    accepted: Tuple[object, ...]
    reason: str


@dataclass(frozen=True)
class MoEFields:
    """The ``config.json`` keys of a mixture-of-experts family (``num_experts_per_tok`` and
    ``router_aux_loss_coef`` are common to all)."""

    num_experts: Tuple[str, ...]  # keys that may hold the expert count; the first is written
    expert_width: str  # key of each expert's MLP width
    # Key of the switch that renormalises the top-k router weights; None: always renormalised.
    normalize_topk: Optional[str] = None


@dataclass(frozen=True)
class ModelFamily:
    name: str  # --model-family
    model_type: str  # config.json "model_type"
    architecture: str  # config.json "architectures"[0]
    rules: Tuple[WeightRule, ...]
    checks: Tuple[FieldCheck, ...] = ()
    qkv_bias: bool = False  # bias on q/k/v only (Qwen2)
    # config.json's sliding_window: a window of at least max_position_embeddings can never
    # bind and is dropped; a smaller one is recorded (ModelArchConfig.sliding_window) and runs
    # are limited to --seq-length <= window, where full causal attention is the same function.
    sliding_window: bool = False
    qk_norm: bool = False  # RMSNorm on each query/key head (Qwen3)
    known_fields: frozenset = frozenset()  # read by the converter, or harmless
    hf_defaults: Dict[str, object] = field(default_factory=dict)  # written by megakd -> HF
    moe: Optional[MoEFields] = None  # mixture-of-experts families only


# ---- shared Llama-style rows -----------------------------------------------------------------

_HF_LAYER = "model.layers.{layer}."
_MG_LAYER = "decoder.layers.{layer}."

EMBEDDING_RULES = (
    WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    WeightRule("output_layer.weight", ("lm_head.weight",), VOCAB),  # untied models only
)

ATTENTION_RULES = (
    WeightRule(_MG_LAYER + "input_layernorm.weight", (_HF_LAYER + "input_layernorm.weight",)),
    WeightRule(_MG_LAYER + "self_attention.linear_qkv.weight",
               tuple(_HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"), QKV),
    WeightRule(_MG_LAYER + "self_attention.linear_proj.weight",
               (_HF_LAYER + "self_attn.o_proj.weight",)),
)

QKV_BIAS_RULES = (
    WeightRule(_MG_LAYER + "self_attention.linear_qkv.bias",
               tuple(_HF_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"), QKV),
)

QK_NORM_RULES = (
    WeightRule(_MG_LAYER + "self_attention.q_layernorm.weight",
               (_HF_LAYER + "self_attn.q_norm.weight",)),
    WeightRule(_MG_LAYER + "self_attention.k_layernorm.weight",
               (_HF_LAYER + "self_attn.k_norm.weight",)),
)

MLP_RULES = (
    WeightRule(_MG_LAYER + "pre_mlp_layernorm.weight",
               (_HF_LAYER + "post_attention_layernorm.weight",)),
    WeightRule(_MG_LAYER + "mlp.linear_fc1.weight",
               (_HF_LAYER + "mlp.gate_proj.weight", _HF_LAYER + "mlp.up_proj.weight"), GATE_UP),
    WeightRule(_MG_LAYER + "mlp.linear_fc2.weight", (_HF_LAYER + "mlp.down_proj.weight",)),
)

def moe_mlp_rules(hf_block: str, gate: str, up: str, down: str) -> Tuple[WeightRule, ...]:
    """The rows of a MoE layer: HF ``{hf_block}.gate`` (router) and per-expert ``gate``,
    ``up`` and ``down`` projections under ``{hf_block}.experts.{expert}.``."""
    expert = _HF_LAYER + hf_block + ".experts.{expert}."
    megatron_expert = _MG_LAYER + "mlp.experts.local_experts.{expert}."
    return (
        WeightRule(_MG_LAYER + "pre_mlp_layernorm.weight",
                   (_HF_LAYER + "post_attention_layernorm.weight",)),
        WeightRule(_MG_LAYER + "mlp.router.weight", (_HF_LAYER + hf_block + ".gate.weight",)),
        WeightRule(megatron_expert + "linear_fc1.weight",
                   (expert + gate + ".weight", expert + up + ".weight"), GATE_UP),
        WeightRule(megatron_expert + "linear_fc2.weight", (expert + down + ".weight",)),
    )


# config.json fields every MoE family reads (besides its MoEFields keys).
MOE_FIELDS = frozenset({"num_experts_per_tok", "router_aux_loss_coef", "output_router_logits"})

COMMON_CHECKS = (
    FieldCheck("hidden_act", ("silu",), "megakd maps the MLP onto SwiGLU (silu gate)"),
    FieldCheck("mlp_bias", (None, False), "megatron's GPTModel has no MLP-only bias"),
    FieldCheck("quantization_config", (None,), "quantized checkpoints are not supported"),
)

# config.json fields that are read by megakd.convert.hf_config or do not change the model.
COMMON_FIELDS = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "tie_word_embeddings", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "attention_dropout", "attention_bias", "mlp_bias", "pretraining_tp", "layer_types",
    "output_attentions", "output_hidden_states", "return_dict", "quantization_config",
})
