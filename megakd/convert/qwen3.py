"""Qwen3 dense (``Qwen3ForCausalLM``): Llama's layout plus RMSNorm on each query/key head,
and a head dim that need not be hidden_size / num_attention_heads."""

from megakd.convert.family import (ATTENTION_RULES, COMMON_CHECKS, COMMON_FIELDS,
                                   EMBEDDING_RULES, MLP_RULES, QK_NORM_RULES, FieldCheck,
                                   ModelFamily)

FAMILY = ModelFamily(
    name="qwen3",
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    rules=EMBEDDING_RULES + ATTENTION_RULES + QK_NORM_RULES + MLP_RULES,
    checks=COMMON_CHECKS + (
        FieldCheck("attention_bias", (None, False),
                   "bias on q/k/v/o together with no MLP bias has no megatron equivalent"),
        FieldCheck("use_sliding_window", (None, False),
                   "megatron's GPTModel attends to the whole causal context"),
    ),
    qk_norm=True,
    known_fields=COMMON_FIELDS | {"use_sliding_window", "sliding_window", "max_window_layers"},
    hf_defaults={"attention_bias": False, "use_sliding_window": False},
)
