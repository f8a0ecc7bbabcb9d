"""Mistral (``MistralForCausalLM``): Llama's layout. A ``sliding_window`` of at least
``max_position_embeddings`` never binds and is dropped; a smaller one is recorded in
``megakd_model.json`` and limits ``--seq-length`` to it (``ModelFamily.sliding_window``)."""

from megakd.convert.family import (ATTENTION_RULES, COMMON_CHECKS, COMMON_FIELDS,
                                   EMBEDDING_RULES, MLP_RULES, ModelFamily)

FAMILY = ModelFamily(
    name="mistral",
    model_type="mistral",
    architecture="MistralForCausalLM",
    rules=EMBEDDING_RULES + ATTENTION_RULES + MLP_RULES,
    checks=COMMON_CHECKS,
    sliding_window=True,
    known_fields=COMMON_FIELDS | {"sliding_window"},
    hf_defaults={"sliding_window": None},
)
