"""HuggingFace ``config.json`` <-> :class:`~megakd.configs.ModelArchConfig`.

Reads both the classic keys (``rope_theta``, ``rope_scaling``) and transformers 5's
``rope_parameters``. Everything megatron's ``GPTModel`` cannot express is refused with a
:class:`~megakd.convert.ConversionError` naming the field, before anything is written.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megakd.configs import ModelArchConfig
from megakd.convert.errors import ConversionError
from megakd.convert.families import family_for_model_type
from megakd.convert.family import ModelFamily
from megakd.convert.moe_config import check_moe_arch, moe_arch_fields, moe_hf_fields

# megatron-core's RotaryEmbedding._apply_scaling fixes these (Llama 3.1/3.2/3.3 values).
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}
_FALSY = (None, False, 0, "", [], {})


def read_hf_config(hf_dir: str, flag: str = "--hf-dir") -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{flag} {hf_dir}: no config.json")
    with open(path) as handle:
        return json.load(handle)


def family_of(config: dict, source: str) -> ModelFamily:
    """The family ``config.json`` declares, checked against its ``architectures``."""
    family = family_for_model_type(config.get("model_type"), source)
    architectures = config.get("architectures") or [family.architecture]
    if architectures[0] != family.architecture:
        raise ConversionError(f"{source}: architectures {architectures} is not supported for "
                              f"model_type {family.model_type!r} (expected {family.architecture})")
    return family


def _rope(config: dict, source: str):
    """``(rotary_base, use_rope_scaling, rope_scaling_factor)`` from either key style."""
    params = dict(config.get("rope_parameters") or {})
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or (
        params if params.get("rope_type", "default") != "default" else None)
    if float(theta) != int(theta):
        raise ConversionError(f"{source}: rope_theta={theta} is not an integer (megatron's "
                              "rotary base is)")
    if not scaling:
        return int(theta), False, 8.0
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return int(theta), False, 8.0
    if kind != "llama3":
        raise ConversionError(f"{source}: rope_scaling rope_type={kind!r} is not supported "
                              "(megatron's GPTModel implements only Llama-3 scaling)")
    for key, fixed in LLAMA3_ROPE_FIXED.items():
        if float(scaling.get(key, fixed)) != fixed:
            raise ConversionError(f"{source}: rope_scaling {key}={scaling.get(key)} is not "
                                  f"supported (megatron's Llama-3 RoPE scaling fixes it to "
                                  f"{fixed:g})")
    return int(theta), True, float(scaling["factor"])


def arch_from_hf_config(config: dict, source: str) -> ModelArchConfig:
    """The megatron architecture of a HF causal LM; refuses what GPTModel cannot express."""
    family = family_of(config, source)
    for check in family.checks:
        value = config.get(check.name)
        if value not in check.accepted:
            raise ConversionError(f"{source}: {check.name}={value!r} is not supported "
                                  f"({check.reason})")
    unknown = sorted(k for k, v in config.items()
                     if k not in family.known_fields and v not in _FALSY)
    if unknown:
        raise ConversionError(f"{source}: config fields megakd does not know how to map for "
                              f"{family.name}: {unknown}")
    layer_types = config.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ConversionError(f"{source}: layer_types other than full_attention are not "
                              "supported (sliding-window layers)")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise ConversionError(f"{source}: {key} missing or not a positive integer")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    groups = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    rotary_base, use_scaling, factor = _rope(config, source)
    return ModelArchConfig(
        num_layers=config["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=config["intermediate_size"],
        num_query_groups=None if groups == heads else groups,
        kv_channels=None if head_dim * heads == hidden else head_dim,
        swiglu=True,
        normalization="RMSNorm",
        position_embedding_type="rope",
        rotary_base=rotary_base,
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        add_bias_linear=False,
        add_qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_norm,
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        init_method_std=float(config.get("initializer_range", 0.02)),
        vocab_size=config["vocab_size"],
        use_rope_scaling=use_scaling,
        rope_scaling_factor=factor,
        sliding_window=_sliding_window(config, family, source),
        **moe_arch_fields(config, family, source),
    )


def _sliding_window(config: dict, family: ModelFamily, source: str) -> Optional[int]:
    """The attention window megakd must respect, or None when there is none that can bind
    (families without ``ModelFamily.sliding_window`` refuse windows through their checks)."""
    window = config.get("sliding_window") if family.sliding_window else None
    if window is None:
        return None
    if not isinstance(window, int) or window <= 0:
        raise ConversionError(f"{source}: sliding_window={window!r} is not a positive integer")
    max_positions = config.get("max_position_embeddings")
    if isinstance(max_positions, int) and window >= max_positions:
        return None  # a window as long as the context never binds
    return window


def check_arch_is_family(arch: ModelArchConfig, family: ModelFamily, source: str) -> None:
    """Refuse a megakd architecture that ``family`` cannot represent in HF."""
    wanted = {"swiglu": True, "normalization": "RMSNorm", "position_embedding_type": "rope",
              "add_bias_linear": False, "add_qkv_bias": family.qkv_bias,
              "qk_layernorm": family.qk_norm, "rotary_percent": 1.0}
    for name, value in wanted.items():
        if getattr(arch, name) != value:
            raise ConversionError(f"{source}: architecture {name}={getattr(arch, name)!r} cannot "
                                  f"be written as {family.name} (needs {value!r})")
    check_moe_arch(arch, family, source)


def hf_config_from_arch(arch: ModelArchConfig, family: ModelFamily, vocab_size: int,
                        max_position_embeddings: int, dtype: str,
                        base: Optional[dict] = None) -> dict:
    """``config.json`` for ``arch``: ``base`` (a HF config this model came from) with every
    architecture field overwritten, or the family's defaults."""
    heads = arch.num_attention_heads
    config = dict(base or {})
    for key in ("rope_parameters", "rope_scaling", "torch_dtype"):
        config.pop(key, None)
    config.update(family.hf_defaults if base is None else {})
    config.update({
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": arch.num_query_groups or heads,
        "hidden_act": "silu",
        "rms_norm_eps": arch.norm_epsilon,
        "rope_theta": float(arch.rotary_base),
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": not arch.untie_embeddings_and_output_weights,
        "dtype": dtype,
    })
    # Qwen2 has no head_dim field, Mixtral a null one (hidden / heads): both stay as they are.
    if arch.kv_channels is not None or config.get("head_dim") is not None:
        config["head_dim"] = arch.kv_channels or arch.hidden_size // heads
    if arch.use_rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": arch.rope_scaling_factor,
                                  **LLAMA3_ROPE_FIXED}
    if family.sliding_window and (arch.sliding_window is not None or base is None):
        config["sliding_window"] = arch.sliding_window
    config.update(moe_hf_fields(arch, family, base))
    return config
