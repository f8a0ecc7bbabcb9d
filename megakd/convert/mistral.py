"""Mistral (``MistralForCausalLM``): Llama's layout; sliding-window attention is refused."""

from megakd.convert.family import (ATTENTION_RULES, COMMON_CHECKS, COMMON_FIELDS,
                                   EMBEDDING_RULES, MLP_RULES, FieldCheck, ModelFamily)

FAMILY = ModelFamily(
    name="mistral",
    model_type="mistral",
    architecture="MistralForCausalLM",
    rules=EMBEDDING_RULES + ATTENTION_RULES + MLP_RULES,
    checks=COMMON_CHECKS + (
        FieldCheck("sliding_window", (None,),
                   "megatron's GPTModel attends to the whole causal context (Mistral v0.3 "
                   "and later have sliding_window null)"),
    ),
    known_fields=COMMON_FIELDS | {"sliding_window"},
    hf_defaults={"sliding_window": None},
)
