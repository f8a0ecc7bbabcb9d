"""Checks that read files or probe the environment, run before any process group starts.

Each returns a list of messages naming the flag and the file (empty: fine), so a tool reports
every problem at once, as one line each, with exit status 2.
"""

from __future__ import annotations

import importlib.util
import os
from typing import List, Mapping, Optional, Tuple

import torch

from megakd.configs import CheckpointConfig, ConfigError, DataConfig, KDConfig, LoggingConfig
from megakd.configs import RuntimeConfig, TeacherFP8Config, TrainingConfig, parse_blend
from megakd.data.chat_format import ChatFormatError, ChatKeys, iter_conversations
from megakd.data.chat_template import split_prompt, tokenize_prompt
from megakd.data.tokenizers import load_tokenizer
from megakd.formats.cache.manifest import INDEX_FILENAME, CacheManifest, manifest_mismatches
from megakd.formats.checkpoints import (
    DIST_METADATA_FILENAME,
    holds_checkpoint,
    is_checkpoint_dir,
    resolve_checkpoint_dir,
)
from megakd.formats.model_metadata import describe_tokenizer, same_tokenizer, tokenizer_identity
from megakd.formats.root_lock import live_foreign_owner, owned_elsewhere
from megakd.models import transformer_engine_available
from megakd.preflight.archs import stored_model_metadata


def data_file_checks(data: DataConfig) -> List[str]:
    """Indexed ``.bin/.idx`` pairs exist; chat JSONL files are read completely, so a malformed
    line fails here with its file and line number."""
    if data.mock_data or data.data_path is None:
        return []
    try:
        prefixes, _ = parse_blend(data.data_path)
    except ValueError:
        return []  # reported by the flag rules
    errors: List[str] = []
    if data.dataset_format == "indexed":
        for prefix in prefixes:
            missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
            if missing:
                errors.append(f"--data-path {prefix}: no {' or '.join(missing)} (write them "
                              "with tools/preprocess_data.py)")
        return errors
    keys = ChatKeys(data.messages_key, data.prompt_key, data.response_key)
    for path in prefixes:
        try:
            if sum(1 for _ in iter_conversations(path, keys)) == 0:  # reads every line
                errors.append(f"--data-path {path}: no conversations")
        except ChatFormatError as error:
            errors.append(f"--data-path {error}")
    return errors


def checkpoint_checks(ckpt: CheckpointConfig) -> List[str]:
    """Every checkpoint flag names a readable checkpoint, except ``--load`` equal to ``--save``
    before the first save (an absent, empty or staging-only root: the run starts fresh)."""
    errors: List[str] = []
    for flag, path in (("--teacher-load", ckpt.teacher_load), ("--load", ckpt.load),
                       ("--pretrained-checkpoint", ckpt.pretrained_checkpoint)):
        if path is None:
            continue
        own_root = (flag == "--load" and ckpt.save is not None
                    and os.path.abspath(path) == os.path.abspath(ckpt.save))
        if own_root and os.path.exists(path) and not os.path.isdir(path):
            errors.append(f"--load {path}: not a directory")
            continue
        if own_root and (not os.path.isdir(path) or not holds_checkpoint(path)):
            continue  # no checkpoint yet: the run starts fresh and saves here
        try:
            directory = resolve_checkpoint_dir(path, flag)
        except ConfigError as error:
            errors.append(str(error))
            continue
        if not is_checkpoint_dir(directory):
            errors.append(f"{flag} {path}: {directory} is not a complete checkpoint (no "
                          f"{DIST_METADATA_FILENAME})")
    if ckpt.save is not None and os.path.exists(ckpt.save) and not os.path.isdir(ckpt.save):
        errors.append(f"--save {ckpt.save}: exists and is not a directory")
    elif ckpt.save is not None and os.path.isdir(ckpt.save):
        owner = live_foreign_owner(ckpt.save)
        if owner is not None:
            errors.append(str(owned_elsewhere(ckpt.save, owner)))
    return errors


def load_run_tokenizer(data: DataConfig) -> Tuple[Optional[object], List[str]]:
    """The run's tokenizer, or the reason it cannot be loaded (naming --tokenizer-model)."""
    if data.tokenizer_type != "NullTokenizer" and data.tokenizer_model is not None \
            and not os.path.exists(data.tokenizer_model) \
            and data.tokenizer_type != "HuggingFaceTokenizer":
        return None, [f"--tokenizer-model {data.tokenizer_model}: no such file"]
    try:
        return load_tokenizer(data.tokenizer_type, data.tokenizer_model, data.vocab_size), []
    except Exception as error:  # sentencepiece / transformers raise many kinds
        return None, [f"--tokenizer-model {data.tokenizer_model}: cannot load a "
                      f"{data.tokenizer_type} ({type(error).__name__}: "
                      f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''})"]


def tokenizer_checks(tokenizer, kd: Optional[KDConfig],
                     checkpoints: Mapping[str, Optional[str]]) -> List[str]:
    """``--kd-topk`` fits the vocabulary, and the tokenizer is the one every loaded checkpoint
    was built with (and the checkpoints agree with each other)."""
    errors: List[str] = []
    if kd is not None and kd.topk is not None and kd.topk > tokenizer.vocab_size:
        errors.append(f"--kd-topk={kd.topk} exceeds the vocabulary ({tokenizer.vocab_size} "
                      "tokens)")
    run_identity = tokenizer_identity(tokenizer)
    stored = [(flag, path, (stored_model_metadata(path, flag) or {}).get("tokenizer"))
              for flag, path in checkpoints.items()]
    stored = [entry for entry in stored if entry[2] is not None]
    for index, (flag, path, identity) in enumerate(stored):
        for other_flag, _, other in stored[:index]:
            if not same_tokenizer(identity, other):
                errors.append(f"{other_flag} and {flag} were built with different tokenizers "
                              f"({describe_tokenizer(other)} vs {describe_tokenizer(identity)}); "
                              "distillation needs one tokenizer")
        if run_identity is not None and not same_tokenizer(run_identity, identity):
            errors.append(f"--tokenizer-model ({describe_tokenizer(run_identity)}) is not the "
                          f"tokenizer {flag} {path} was built with "
                          f"({describe_tokenizer(identity)})")
    return errors


def teacher_cache_checks(ckpt: CheckpointConfig, kd: KDConfig, data: DataConfig,
                         training: TrainingConfig) -> List[str]:
    """``--teacher-cache`` holds a complete cache whose manifest fits the run's flags (the
    tokenizer's tokens and the data identity are compared once the datasets are built)."""
    directory = ckpt.teacher_cache
    if directory is None or ckpt.teacher_load is not None or kd.topk is None:
        return []  # nothing to read, or the flag rules already refuse the combination
    if not os.path.isdir(directory):
        return [f"--teacher-cache {directory}: no such directory"]
    try:
        manifest = CacheManifest.read(directory)
    except ConfigError as error:
        return [str(error)]
    errors = manifest_mismatches(manifest, directory, kd, data, training)
    if not os.path.isfile(os.path.join(directory, INDEX_FILENAME)):
        errors.append(f"--teacher-cache {directory}: incomplete cache (no {INDEX_FILENAME}); "
                      "rerun tools/precompute_teacher_topk.py to finish it")
    return errors


def environment_checks(runtime: RuntimeConfig, logging_config: Optional[LoggingConfig]
                       ) -> List[str]:
    """The device asked for exists; the packages the logging flags need import."""
    errors: List[str] = []
    if runtime.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda: no CUDA device is available (use --device cpu)")
    if logging_config is not None:
        if logging_config.tensorboard_dir is not None \
                and importlib.util.find_spec("tensorboard") is None:
            errors.append("--tensorboard-dir needs the tensorboard package: pip install "
                          "tensorboard")
        if logging_config.wandb_project is not None and importlib.util.find_spec("wandb") is None:
            errors.append("--wandb-project needs the wandb package: pip install wandb "
                          "(or pip install megakd[wandb])")
    return errors


def teacher_fp8_checks(fp8: TeacherFP8Config, live_teacher: bool, runtime: RuntimeConfig
                       ) -> List[str]:
    """``--teacher-fp8-format`` needs a live teacher and Transformer Engine's layer spec on a
    GPU (the FP8 GEMMs are Transformer Engine's; megatron-core's local layers have none)."""
    if not fp8.enabled:
        return []
    flag = f"--teacher-fp8-format {fp8.format}"
    if not live_teacher:
        return [f"{flag}: this run has no live teacher (--kd-loss-weight 0 or --teacher-cache)"]
    if runtime.attention_backend != "auto":
        return [f"{flag}: FP8 runs on Transformer Engine's layer spec, which "
                f"--attention-backend {runtime.attention_backend} replaces (use auto)"]
    if not transformer_engine_available():
        return [f"{flag}: FP8 execution needs Transformer Engine on a CUDA device, which does "
                "not import here (NGC PyTorch container, or pip install "
                "transformer_engine[pytorch])"]
    return []


PROMPTS_CHECKED = 1000  # prompts per chat file whose room for new tokens the preflight checks


def prompt_room_checks(data: DataConfig, tokenizer) -> List[str]:
    """Every prompt among the first ``PROMPTS_CHECKED`` of each chat file leaves room for at
    least one new token in ``--seq-length`` (a sample's prompt that leaves none later keeps its
    reference answer). Reads and tokenizes those conversations."""
    if data.data_path is None or data.dataset_format != "chat":
        return []
    prefixes, _ = parse_blend(data.data_path)
    keys = ChatKeys(data.messages_key, data.prompt_key, data.response_key)
    for path in prefixes:
        for line, messages in enumerate(iter_conversations(path, keys), start=1):
            if line > PROMPTS_CHECKED:
                break
            prompt, _ = split_prompt(messages)
            length = len(tokenize_prompt(tokenizer, prompt))
            if length >= data.seq_length:
                return [f"--seq-length {data.seq_length} leaves no room for new tokens after "
                        f"the prompt of conversation {line} of {path} ({length} tokens): raise "
                        "--seq-length or shorten the prompts"]
    return []


def prompts_file_checks(path: str, data: DataConfig) -> List[str]:
    """``--prompts`` is a readable chat JSONL file of prompts (every line checked)."""
    keys = ChatKeys(data.messages_key, data.prompt_key, data.response_key)
    try:
        if sum(1 for _ in iter_conversations(path, keys, prompts_only=True)) == 0:
            return [f"--prompts {path}: no prompts"]
    except ChatFormatError as error:
        return [f"--prompts {error}"]
    return []


def output_dir_checks(path: str) -> List[str]:
    """``--output`` is a directory or can become one."""
    if os.path.exists(path) and not os.path.isdir(path):
        return [f"--output {path}: exists and is not a directory"]
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path) and not os.access(parent, os.W_OK):
        return [f"--output {path}: cannot create it (no write access to {parent})"]
    return []
