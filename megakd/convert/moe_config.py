"""The mixture-of-experts part of HF ``config.json`` <-> :class:`~megakd.configs.ModelArchConfig`.

HF router (Qwen3-MoE, Mixtral): ``softmax(gate(x))`` over all experts, the ``num_experts_per_tok``
largest kept, renormalised to sum 1 when the family always does (Mixtral) or
``norm_topk_prob`` says so (Qwen3-MoE). Renormalised top-k softmax weights equal a softmax over
the top-k logits, megatron-core's default router; unnormalised ones are megatron's
``--moe-router-pre-softmax``. ``router_aux_loss_coef`` becomes the student's
``--moe-aux-loss-coeff`` (HF applies it only when training with ``output_router_logits``).
"""

from __future__ import annotations

from typing import Dict, Optional

from megakd.configs import ModelArchConfig
from megakd.convert.errors import ConversionError
from megakd.convert.family import ModelFamily


def _positive_int(config: dict, key: str, source: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConversionError(f"{source}: {key} missing or not a positive integer")
    return value


def moe_arch_fields(config: dict, family: ModelFamily, source: str) -> Dict[str, object]:
    """``ModelArchConfig`` MoE fields of a HF config ({} for a dense family)."""
    moe = family.moe
    if moe is None:
        return {}
    count_key = next((key for key in moe.num_experts if config.get(key) is not None),
                     moe.num_experts[0])
    experts = _positive_int(config, count_key, source)
    topk = _positive_int(config, "num_experts_per_tok", source)
    width = _positive_int(config, moe.expert_width, source)
    if topk > experts:
        raise ConversionError(f"{source}: num_experts_per_tok={topk} exceeds {count_key}="
                              f"{experts}")
    normalized = True if moe.normalize_topk is None else bool(config.get(moe.normalize_topk))
    if topk == 1 and normalized:
        raise ConversionError(f"{source}: num_experts_per_tok=1 with renormalised router weights "
                              "(always 1) is not supported: megatron's router needs "
                              "--moe-router-pre-softmax at top-1")
    return {
        "num_experts": experts,
        "moe_router_topk": topk,
        "moe_ffn_hidden_size": None if width == config.get("intermediate_size") else width,
        "moe_router_pre_softmax": not normalized,
        "moe_aux_loss_coeff": float(config.get("router_aux_loss_coef") or 0.0),
    }


def check_moe_arch(arch: ModelArchConfig, family: ModelFamily, source: str) -> None:
    """Refuse an architecture whose MLPs ``family`` cannot hold (dense vs MoE, shared
    experts, a router normalisation the family cannot switch)."""
    if (family.moe is None) == arch.is_moe:
        kind = "a mixture of experts" if arch.is_moe else "a dense MLP"
        raise ConversionError(f"{source}: architecture with {kind} cannot be written as "
                              f"{family.name}")
    if family.moe is None:
        return
    if arch.moe_shared_expert_intermediate_size is not None:
        raise ConversionError(f"{source}: architecture moe_shared_expert_intermediate_size="
                              f"{arch.moe_shared_expert_intermediate_size} cannot be written as "
                              f"{family.name} (no shared expert)")
    if family.moe.normalize_topk is None and arch.moe_router_pre_softmax:
        raise ConversionError(f"{source}: architecture moe_router_pre_softmax=True cannot be "
                              f"written as {family.name} (its top-k weights are renormalised)")


def moe_hf_fields(arch: ModelArchConfig, family: ModelFamily,
                  base: Optional[dict]) -> Dict[str, object]:
    """The MoE keys of ``config.json`` for ``arch`` ({} for a dense family); the expert count
    goes under the key ``base`` used, else the family's first."""
    moe = family.moe
    if moe is None:
        return {}
    count_key = next((key for key in moe.num_experts if key in (base or {})),
                     moe.num_experts[0])
    fields = {count_key: arch.num_experts, "num_experts_per_tok": arch.moe_router_topk,
              moe.expert_width: arch.expert_ffn_hidden_size,
              "router_aux_loss_coef": arch.moe_aux_loss_coeff}
    if moe.normalize_topk is not None:
        fields[moe.normalize_topk] = not arch.moe_router_pre_softmax
    return fields
