"""Llama 2 / 3.x (``LlamaForCausalLM``): RMSNorm, SwiGLU, RoPE (Llama-3 scaling), GQA."""

from megakd.convert.family import (ATTENTION_RULES, COMMON_CHECKS, COMMON_FIELDS,
                                   EMBEDDING_RULES, MLP_RULES, FieldCheck, ModelFamily)

FAMILY = ModelFamily(
    name="llama",
    model_type="llama",
    architecture="LlamaForCausalLM",
    rules=EMBEDDING_RULES + ATTENTION_RULES + MLP_RULES,
    checks=COMMON_CHECKS + (
        FieldCheck("attention_bias", (None, False),
                   "bias on q/k/v/o together with no MLP bias has no megatron equivalent"),
    ),
    known_fields=COMMON_FIELDS,
    hf_defaults={"attention_bias": False, "mlp_bias": False},
)
