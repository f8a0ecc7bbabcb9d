"""Mixtral (``MixtralForCausalLM``, e.g. Mixtral-8x7B): Mistral's attention with a
mixture-of-experts MLP in every layer: a router ``block_sparse_moe.gate`` and
``num_local_experts`` SwiGLU experts (``w1`` gate, ``w3`` up, ``w2`` down) of width
``intermediate_size``. The top-k router weights are always renormalised (megatron's softmax
over the top-k logits); a sliding window is handled as Mistral's (``ModelFamily.sliding_window``)
and router jitter is refused."""

from megakd.convert.family import (ATTENTION_RULES, COMMON_CHECKS, COMMON_FIELDS,
                                   EMBEDDING_RULES, MOE_FIELDS, FieldCheck, ModelFamily,
                                   MoEFields, moe_mlp_rules)

FAMILY = ModelFamily(
    name="mixtral",
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    rules=EMBEDDING_RULES + ATTENTION_RULES + moe_mlp_rules("block_sparse_moe", "w1", "w3", "w2"),
    checks=COMMON_CHECKS + (
        FieldCheck("router_jitter_noise", (None, 0),
                   "megakd's router does not multiply its input by training noise"),
    ),
    known_fields=COMMON_FIELDS | MOE_FIELDS | {"sliding_window", "num_local_experts",
                                               "router_jitter_noise"},
    hf_defaults={"sliding_window": None},
    sliding_window=True,
    moe=MoEFields(num_experts=("num_local_experts",), expert_width="intermediate_size"),
)
