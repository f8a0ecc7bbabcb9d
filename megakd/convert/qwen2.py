"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): Llama's layout plus bias on q, k and v."""

from megakd.convert.family import (ATTENTION_RULES, COMMON_CHECKS, COMMON_FIELDS,
                                   EMBEDDING_RULES, MLP_RULES, QKV_BIAS_RULES, FieldCheck,
                                   ModelFamily)

FAMILY = ModelFamily(
    name="qwen2",
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    rules=EMBEDDING_RULES + ATTENTION_RULES + QKV_BIAS_RULES + MLP_RULES,
    checks=COMMON_CHECKS + (
        FieldCheck("use_sliding_window", (None, False),
                   "megatron's GPTModel attends to the whole causal context"),
        FieldCheck("use_mrope", (None, False), "multimodal RoPE is not supported"),
    ),
    qkv_bias=True,
    # sliding_window / max_window_layers only matter with use_sliding_window.
    known_fields=COMMON_FIELDS | {"use_sliding_window", "sliding_window", "max_window_layers",
                                  "use_mrope"},
    hf_defaults={"use_sliding_window": False},
)
