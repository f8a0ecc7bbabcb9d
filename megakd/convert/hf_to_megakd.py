"""HuggingFace safetensors -> megakd checkpoint root (a megatron distributed checkpoint).

Output layout (as Megatron-LM's): ``OUTPUT/latest_checkpointed_iteration.txt`` = ``release``,
``OUTPUT/release/`` (dist_checkpointing, with ``megakd_model.json``) and ``OUTPUT/tokenizer/``.
Every check runs before anything is written (:func:`plan_hf_to_megakd`); the output appears
under its final name only when complete.

Memory: the megatron model in the target dtype (one copy) plus the HF tensors of one
rule (at most q, k and v of one layer, or the embedding) read lazily with ``safe_open``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from megakd.configs import ModelArchConfig, pad_vocab_size
from megakd.convert.errors import ConversionError, VerificationError
from megakd.convert.common import (DTYPES, HF_DTYPE_NAMES, TOKENIZER_DIRNAME, build_tp1_model,
                                   check_output_free, copy_tokenizer_files, single_rank_runtime,
                                   staged_output)
from megakd.convert.family import ModelFamily
from megakd.convert.hf_config import arch_from_hf_config, family_of, read_hf_config
from megakd.convert.safetensors_io import SafetensorsReader
from megakd.convert.tensors import hf_to_megatron
from megakd.convert.verify import DEFAULT_TOLERANCE, max_logit_difference
from megakd.formats.checkpoints import checkpoint_name, save_model_weights, write_tracker
from megakd.formats.model_metadata import hf_tokenizer_identity, model_metadata

# HF tensors that hold no weights megatron needs (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class HFToMegakdOptions:
    hf_dir: str
    output: str
    dtype: Optional[str] = None  # bf16 | fp16 | fp32; None: config.json's dtype (else bf16)
    make_vocab_size_divisible_by: int = 128
    padded_vocab_size: Optional[int] = None
    verify: bool = False
    verify_tolerance: Optional[float] = None


@dataclass
class HFToMegakdPlan:
    """Everything checked and resolved before any weight is read."""

    family: ModelFamily
    arch: ModelArchConfig
    hf_config: dict
    padded_vocab_size: int
    dtype: str
    reader: SafetensorsReader
    rules: List[tuple]  # (megatron name, kind, [HF names])


def expand_rules(family: ModelFamily, arch: ModelArchConfig) -> List[tuple]:
    """``(megatron name, kind, [HF names])`` for every tensor of ``arch`` (``{layer}`` over its
    layers, ``{expert}`` over the experts of a MoE layer)."""
    rows = []
    for rule in family.rules:
        if rule.megatron == "output_layer.weight" and not arch.untie_embeddings_and_output_weights:
            continue
        layers = range(arch.num_layers) if "{layer}" in rule.megatron else [None]
        experts = range(arch.num_experts or 0) if "{expert}" in rule.megatron else [None]
        for layer in layers:
            for expert in experts:
                rows.append((rule.megatron.format(layer=layer, expert=expert), rule.kind,
                             [name.format(layer=layer, expert=expert) for name in rule.hf]))
    return rows


def _resolve_dtype(options: HFToMegakdOptions, config: dict) -> str:
    if options.dtype is not None:
        if options.dtype not in DTYPES:
            raise ConversionError(f"--dtype {options.dtype!r}: choose one of {', '.join(DTYPES)}")
        return options.dtype
    stored = config.get("dtype") or config.get("torch_dtype")
    return HF_DTYPE_NAMES.get(stored, "bf16")


def plan_hf_to_megakd(options: HFToMegakdOptions) -> HFToMegakdPlan:
    """Check the HF directory, config and flags; raises ConversionError naming the problem."""
    if not os.path.isdir(options.hf_dir):
        raise ConversionError(f"--hf-dir {options.hf_dir}: no such directory")
    check_output_free(options.output)
    source = os.path.join(options.hf_dir, "config.json")
    config = read_hf_config(options.hf_dir)
    family = family_of(config, source)
    arch = arch_from_hf_config(config, source)
    if options.make_vocab_size_divisible_by <= 0:
        raise ConversionError("--make-vocab-size-divisible-by must be positive")
    padded = options.padded_vocab_size or pad_vocab_size(
        arch.vocab_size, options.make_vocab_size_divisible_by, 1)
    if padded < arch.vocab_size:
        raise ConversionError(f"--padded-vocab-size={padded} is smaller than the model's "
                              f"vocab_size={arch.vocab_size} ({source})")
    reader = SafetensorsReader(options.hf_dir)
    rules = expand_rules(family, arch)
    available = set(reader.names())
    needed = {name for _, _, names in rules for name in names}
    missing = sorted(needed - available)
    if missing:
        raise ConversionError(f"--hf-dir {options.hf_dir}: tensors missing for {family.name} "
                              f"(first {min(5, len(missing))} of {len(missing)}): {missing[:5]}")
    extra = sorted(name for name in available - needed
                   if not name.endswith(_IGNORED_SUFFIXES)
                   and not (name == "lm_head.weight" and not arch.untie_embeddings_and_output_weights))
    if extra:
        raise ConversionError(f"--hf-dir {options.hf_dir}: tensors the {family.name} mapping does "
                              f"not know (first {min(5, len(extra))} of {len(extra)}): {extra[:5]}")
    if options.verify_tolerance is not None and options.verify_tolerance <= 0:
        raise ConversionError("--verify-tolerance must be positive")
    return HFToMegakdPlan(family=family, arch=arch, hf_config=config, padded_vocab_size=padded,
                          dtype=_resolve_dtype(options, config), reader=reader, rules=rules)


def fill_megatron_model(model: torch.nn.Module, plan: HFToMegakdPlan) -> None:
    """Copy every HF tensor into the TP=1 megatron model, one rule at a time."""
    arch = plan.arch
    heads = arch.num_attention_heads
    params: Dict[str, torch.Tensor] = {name: tensor for name, tensor in model.state_dict().items()
                                       if not name.endswith("_extra_state")}
    filled = set()
    for megatron_name, kind, hf_names in plan.rules:
        if megatron_name not in params:
            raise ConversionError(f"megatron model has no {megatron_name} (mapping of "
                                  f"{plan.family.name} out of date)")
        tensor = hf_to_megatron(
            kind, [plan.reader.get(name) for name in hf_names],
            num_query_groups=arch.num_query_groups or heads,
            head_dim=arch.kv_channels or arch.hidden_size // heads,
            padded_vocab_size=plan.padded_vocab_size)
        target = params[megatron_name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ConversionError(f"{hf_names}: shape {tuple(tensor.shape)} does not fit "
                                  f"{megatron_name} {tuple(target.shape)} (config.json "
                                  "disagrees with the weights)")
        with torch.no_grad():
            target.copy_(tensor)
        filled.add(megatron_name)
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise ConversionError(f"no HF tensor maps to {unfilled[:5]} ({plan.family.name})")


def tokenizer_identity_of_dir(hf_dir: str, log: Callable[[str], None]) -> Optional[dict]:
    try:
        return hf_tokenizer_identity(hf_dir)
    except Exception as error:  # no or unreadable tokenizer files: identity unknown
        log(f"convert_hf_to_megakd: no tokenizer identity recorded ({type(error).__name__})")
        return None


def convert_hf_to_megakd(options: HFToMegakdOptions, log: Callable[[str], None] = print
                         ) -> Dict[str, object]:
    """Convert; returns ``{"max_logit_diff": float or None, "padded_vocab_size": int, ...}``.
    Raises ConversionError (nothing written) on bad input or a failed ``--verify``."""
    plan = plan_hf_to_megakd(options)
    arch = plan.arch
    has_tokenizer = any(os.path.isfile(os.path.join(options.hf_dir, name))
                        for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    identity = tokenizer_identity_of_dir(options.hf_dir, log) if has_tokenizer else None
    single_rank_runtime()
    dtype = DTYPES[plan.dtype]
    model = build_tp1_model(arch, plan.padded_vocab_size, dtype)
    fill_megatron_model(model, plan)
    log(f"convert_hf_to_megakd: {plan.family.name}, {arch.num_layers} layers, hidden "
        f"{arch.hidden_size}, vocab {arch.vocab_size} padded to {plan.padded_vocab_size}, "
        f"{plan.dtype}")

    max_diff = None
    if options.verify:
        tolerance = options.verify_tolerance or DEFAULT_TOLERANCE[plan.dtype]
        max_diff = max_logit_difference(model, options.hf_dir, dtype, arch.vocab_size)
        log(f"convert_hf_to_megakd: --verify max |logits(megakd) - logits(HF)| = {max_diff:.3e} "
            f"(tolerance {tolerance:g})")
        if not max_diff <= tolerance:
            raise VerificationError(f"--verify: max logit difference {max_diff:.3e} exceeds "
                                  f"--verify-tolerance {tolerance:g}; nothing was written")

    metadata = model_metadata(arch, plan.padded_vocab_size, identity)
    metadata["dtype"] = plan.dtype
    metadata["hf"] = {"family": plan.family.name, "vocab_size": arch.vocab_size,
                      "config": plan.hf_config}
    with staged_output(options.output) as staging:
        save_model_weights([model], os.path.join(staging, checkpoint_name(None)),
                           model_metadata=metadata)
        write_tracker(staging, None)
        copied = copy_tokenizer_files(options.hf_dir, os.path.join(staging, TOKENIZER_DIRNAME))
    log(f"convert_hf_to_megakd: wrote {options.output} (release checkpoint"
        f"{', tokenizer files ' + ', '.join(copied) if copied else ''})")
    return {"max_logit_diff": max_diff, "padded_vocab_size": plan.padded_vocab_size,
            "family": plan.family.name, "dtype": plan.dtype}
