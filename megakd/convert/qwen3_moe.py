"""Qwen3-MoE (``Qwen3MoeForCausalLM``, e.g. Qwen3-30B-A3B): Qwen3's attention (QK-norm, its
own head dim) with a mixture-of-experts MLP in every layer: a router ``mlp.gate`` and
``num_experts`` SwiGLU experts of width ``moe_intermediate_size``, no shared expert. The router
softmax runs over all experts; ``norm_topk_prob`` renormalises the top-k weights (megatron's
softmax over the top-k logits), otherwise they are used as they are (megatron's
``--moe-router-pre-softmax``)."""

from megakd.convert.family import (ATTENTION_RULES, COMMON_CHECKS, COMMON_FIELDS,
                                   EMBEDDING_RULES, MOE_FIELDS, QK_NORM_RULES, FieldCheck,
                                   ModelFamily, MoEFields, moe_mlp_rules)

FAMILY = ModelFamily(
    name="qwen3_moe",
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    rules=(EMBEDDING_RULES + ATTENTION_RULES + QK_NORM_RULES
           + moe_mlp_rules("mlp", "gate_proj", "up_proj", "down_proj")),
    checks=COMMON_CHECKS + (
        FieldCheck("attention_bias", (None, False),
                   "bias on q/k/v/o together with no MLP bias has no megatron equivalent"),
        FieldCheck("use_sliding_window", (None, False),
                   "megatron's GPTModel attends to the whole causal context"),
        FieldCheck("decoder_sparse_step", (None, 1),
                   "megakd builds a mixture of experts in every layer"),
        FieldCheck("mlp_only_layers", (None, []),
                   "megakd builds a mixture of experts in every layer"),
    ),
    qk_norm=True,
    known_fields=COMMON_FIELDS | MOE_FIELDS | {
        "use_sliding_window", "sliding_window", "max_window_layers", "num_experts",
        "num_local_experts", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
        "mlp_only_layers"},
    hf_defaults={"attention_bias": False, "use_sliding_window": False, "decoder_sparse_step": 1,
                 "mlp_only_layers": []},
    moe=MoEFields(num_experts=("num_experts", "num_local_experts"),
                  expert_width="moe_intermediate_size", normalize_topk="norm_topk_prob"),
)
