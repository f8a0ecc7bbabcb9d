"""megakd checkpoint -> HuggingFace safetensors + config.json (AutoModelForCausalLM loads it).

The checkpoint (any TP/PP it was saved at) is loaded into one megatron model at TP=1/PP=1;
HF tensors are produced rule by rule and written in shards of at most ``--max-shard-size``, so
memory is the model plus one shard. Vocab padding rows are dropped. The architecture comes from
the checkpoint's ``megakd_model.json``; the HF config from ``--hf-config-from DIR`` (fields
checked against the checkpoint), or is generated for ``--model-family``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from megakd.configs import ModelArchConfig
from megakd.convert.errors import ConversionError, VerificationError
from megakd.convert.families import family_by_name
from megakd.convert.common import (DTYPES, HF_DTYPES, TOKENIZER_DIRNAME, build_tp1_model,
                                   check_output_free, copy_tokenizer_files, single_rank_runtime,
                                   staged_output)
from megakd.convert.family import ModelFamily
from megakd.convert.hf_config import (arch_from_hf_config, check_arch_is_family, family_of,
                                      hf_config_from_arch, read_hf_config)
from megakd.convert.hf_to_megakd import expand_rules
from megakd.convert.safetensors_io import ShardedSafetensorsWriter
from megakd.convert.tensors import megatron_to_hf
from megakd.convert.verify import DEFAULT_TOLERANCE, max_logit_difference
from megakd.formats.checkpoints import load_model_weights, resolve_checkpoint_dir
from megakd.formats.model_metadata import arch_from_metadata, read_model_metadata

# Architecture fields that must agree with --hf-config-from (vocab rows and init std need not).
_COMPARED_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                    "num_query_groups", "kv_channels", "rotary_base", "use_rope_scaling",
                    "rope_scaling_factor", "untie_embeddings_and_output_weights", "add_qkv_bias",
                    "qk_layernorm", "norm_epsilon", "num_experts", "moe_router_topk",
                    "expert_ffn_hidden_size", "moe_router_pre_softmax")


@dataclass
class MegakdToHFOptions:
    load: str
    output: str
    hf_config_from: Optional[str] = None
    model_family: Optional[str] = None
    dtype: Optional[str] = None  # None: the dtype recorded at conversion, else bf16
    max_shard_size: str = "5GB"
    max_position_embeddings: Optional[int] = None
    verify: bool = False
    verify_tolerance: Optional[float] = None


@dataclass
class MegakdToHFPlan:
    checkpoint_dir: str
    arch: ModelArchConfig
    padded_vocab_size: int
    family: ModelFamily
    hf_config: dict
    vocab_size: int  # HF rows written
    dtype: str
    max_shard_bytes: int
    tokenizer_source: Optional[str]


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2KB"`` or a byte count."""
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            number = upper[: -len(unit)]
            break
    else:
        number, factor = upper, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConversionError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB or bytes")
    return value


def _check_against_config(arch: ModelArchConfig, config: dict, source: str) -> None:
    expected = arch_from_hf_config(config, source)
    for name in _COMPARED_FIELDS:
        if getattr(expected, name) != getattr(arch, name):
            raise ConversionError(f"{source} does not describe the checkpoint: {name} is "
                                  f"{getattr(expected, name)!r} there, {getattr(arch, name)!r} "
                                  "in the checkpoint")


def plan_megakd_to_hf(options: MegakdToHFOptions) -> MegakdToHFPlan:
    checkpoint_dir = resolve_checkpoint_dir(options.load, "--load")
    metadata = read_model_metadata(checkpoint_dir)
    if metadata is None:
        raise ConversionError(f"--load {options.load}: no megakd_model.json in {checkpoint_dir}, "
                              "so the architecture is unknown")
    arch, padded, tokenizer = arch_from_metadata(metadata, f"--load {options.load}")
    check_output_free(options.output)
    stored_hf = metadata.get("hf") or {}
    if options.hf_config_from and options.model_family:
        raise ConversionError("give one of --hf-config-from and --model-family")
    if options.hf_config_from:
        source = os.path.join(options.hf_config_from, "config.json")
        base = read_hf_config(options.hf_config_from, "--hf-config-from")
        family = family_of(base, source)
        _check_against_config(arch, base, source)
        vocab_size = base["vocab_size"]
    else:
        name = options.model_family or stored_hf.get("family")
        if name is None:
            raise ConversionError(f"--load {options.load} was not converted from HF: give "
                                  "--hf-config-from DIR or --model-family NAME")
        family = family_by_name(name)
        base = stored_hf.get("config") if stored_hf.get("family") == family.name else None
        vocab_size = (stored_hf.get("vocab_size") or arch.vocab_size
                      or (tokenizer or {}).get("vocab_size"))
        if not vocab_size:
            raise ConversionError(f"--load {options.load}: the checkpoint does not record its "
                                  "vocabulary size; give --hf-config-from DIR")
    check_arch_is_family(arch, family, f"--load {options.load}")
    dtype = options.dtype or metadata.get("dtype") or "bf16"
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    max_positions = (options.max_position_embeddings or (base or {}).get("max_position_embeddings")
                     or 4096)
    hf_config = hf_config_from_arch(arch, family, vocab_size, max_positions, HF_DTYPES[dtype],
                                    base)
    root = options.load if os.path.isdir(os.path.join(options.load, TOKENIZER_DIRNAME)) else \
        os.path.dirname(checkpoint_dir.rstrip("/"))
    tokenizer_source = next((d for d in (os.path.join(root, TOKENIZER_DIRNAME),
                                         options.hf_config_from) if d and os.path.isdir(d)), None)
    if options.verify_tolerance is not None and options.verify_tolerance <= 0:
        raise ConversionError("--verify-tolerance must be positive")
    return MegakdToHFPlan(checkpoint_dir=checkpoint_dir, arch=arch, padded_vocab_size=padded,
                          family=family, hf_config=hf_config, vocab_size=vocab_size, dtype=dtype,
                          max_shard_bytes=parse_size(options.max_shard_size),
                          tokenizer_source=tokenizer_source)


def write_hf_tensors(model: torch.nn.Module, plan: MegakdToHFPlan,
                     writer: ShardedSafetensorsWriter) -> None:
    """Every HF tensor of ``plan.family``, in rule order, handed to ``writer``."""
    arch = plan.arch
    heads = arch.num_attention_heads
    params: Dict[str, torch.Tensor] = model.state_dict()
    for megatron_name, kind, hf_names in expand_rules(plan.family, arch):
        tensors = megatron_to_hf(
            kind, params[megatron_name].detach(), num_attention_heads=heads,
            num_query_groups=arch.num_query_groups or heads,
            head_dim=arch.kv_channels or arch.hidden_size // heads, vocab_size=plan.vocab_size)
        for name, tensor in zip(hf_names, tensors):
            writer.add(name, tensor)


def convert_megakd_to_hf(options: MegakdToHFOptions, log: Callable[[str], None] = print
                         ) -> Dict[str, object]:
    """Convert; returns ``{"max_logit_diff": float or None, "files": [...]}``. Raises
    ConversionError (nothing written) on bad input or a failed ``--verify``."""
    plan = plan_megakd_to_hf(options)
    single_rank_runtime()
    dtype = DTYPES[plan.dtype]
    model = build_tp1_model(plan.arch, plan.padded_vocab_size, dtype)
    load_model_weights([model], plan.checkpoint_dir)
    max_diff = None
    with staged_output(options.output) as staging:
        writer = ShardedSafetensorsWriter(staging, plan.max_shard_bytes)
        write_hf_tensors(model, plan, writer)
        files = writer.close()
        with open(os.path.join(staging, "config.json"), "w") as handle:
            json.dump(plan.hf_config, handle, indent=2, sort_keys=True)
        if plan.tokenizer_source:
            files += copy_tokenizer_files(plan.tokenizer_source, staging)
        if options.verify:
            tolerance = options.verify_tolerance or DEFAULT_TOLERANCE[plan.dtype]
            max_diff = max_logit_difference(model, staging, dtype,
                                            min(plan.vocab_size, plan.padded_vocab_size))
            log(f"convert_megakd_to_hf: --verify max |logits(megakd) - logits(HF)| = "
                f"{max_diff:.3e} (tolerance {tolerance:g})")
            if not max_diff <= tolerance:
                raise VerificationError(f"--verify: max logit difference {max_diff:.3e} exceeds "
                                      f"--verify-tolerance {tolerance:g}; nothing was written")
    log(f"convert_megakd_to_hf: wrote {options.output} ({plan.family.name}, {plan.dtype}, "
        f"vocab {plan.vocab_size}, {len(files)} files)")
    return {"max_logit_diff": max_diff, "files": files, "family": plan.family.name,
            "arch": dataclasses.asdict(plan.arch)}
