"""Architecture metadata stored with every checkpoint (``megakd_model.json``).

A checkpoint directory carries the :class:`~megakd.arguments.ModelArchConfig` it was built
from, the padded vocabulary width of its embedding/output rows, and (when known) the identity
of its tokenizer, so ``--teacher-load``/``--load`` need no model flags and a checkpoint that
does not fit the run is refused before any weights are read.

The tokenizer identity (:func:`tokenizer_identity`) is ``{"vocab_size": n, "sha256": hex,
"special_ids": [...] or None}``: ``sha256`` hashes the token list in id order, so two
tokenizers with the same tokens have the same identity whatever their files look like (a
Qwen2.5-7B and a Qwen2.5-1.5B checkpoint share one, although their embedding widths differ).
Checkpoints converted from HuggingFace may also carry an ``"hf"`` entry (family, original
``config.json``) that the reverse conversion uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Dict, Iterable, Mapping, Optional, Tuple

from megakd.arguments import ConfigError, ModelArchConfig

METADATA_FORMAT = "megakd-model"
METADATA_VERSION = 1


def model_metadata(arch: ModelArchConfig, padded_vocab_size: int,
                   tokenizer: Optional[dict] = None) -> dict:
    """The JSON-serialisable description of one model, as written next to its weights."""
    return {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "architecture": dataclasses.asdict(arch),
        "padded_vocab_size": int(padded_vocab_size),
        "tokenizer": tokenizer,
    }


def arch_from_metadata(metadata: dict, source: str = "checkpoint"
                       ) -> Tuple[ModelArchConfig, int, Optional[dict]]:
    """``(architecture, padded_vocab_size, tokenizer)`` from :func:`model_metadata`'s dict."""
    if metadata.get("format") != METADATA_FORMAT:
        raise ValueError(f"{source}: not a megakd model description (format "
                         f"{metadata.get('format')!r})")
    known = {f.name for f in dataclasses.fields(ModelArchConfig)}
    stored = metadata["architecture"]
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ValueError(f"{source}: architecture fields this megakd does not know: {unknown}")
    return ModelArchConfig(**stored), int(metadata["padded_vocab_size"]), metadata.get("tokenizer")


# ----------------------------------------------------------------------------------------------
# Tokenizer identity
# ----------------------------------------------------------------------------------------------


def _token_list(tokenizer) -> Optional[Dict[str, int]]:
    for name in ("get_vocab", "vocab"):
        vocab = getattr(tokenizer, name, None)
        if callable(vocab):
            try:
                vocab = vocab()
            except Exception:  # some wrappers raise for vocab-less tokenizers (Null)
                vocab = None
        if isinstance(vocab, Mapping) and vocab:
            return dict(vocab)
    return None


def _special_ids(tokenizer) -> Optional[list]:
    inner = tokenizer
    for _ in range(3):  # megatron.core.tokenizers wraps the HF tokenizer (``.tokenizer``)
        ids = getattr(inner, "all_special_ids", None)
        if ids is not None:
            return sorted(int(i) for i in ids)
        inner = getattr(inner, "tokenizer", None)
        if inner is None:
            break
    return None


def tokenizer_identity(tokenizer) -> Optional[dict]:
    """Identity of a ``megatron.core.tokenizers`` or HuggingFace tokenizer: its vocabulary size,
    a SHA-256 of its token list in id order and its special token ids. None when the tokenizer
    has no token list (megatron's NullTokenizer)."""
    if getattr(tokenizer, "library", None) == "null":
        return None
    vocab = _token_list(tokenizer)
    if vocab is None:
        return None
    digest = hashlib.sha256()
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        digest.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    return {"vocab_size": len(vocab), "sha256": digest.hexdigest(),
            "special_ids": _special_ids(tokenizer)}


def hf_tokenizer_identity(tokenizer_dir: str) -> Optional[dict]:
    """:func:`tokenizer_identity` of the HuggingFace tokenizer files in ``tokenizer_dir``."""
    from transformers import AutoTokenizer

    return tokenizer_identity(AutoTokenizer.from_pretrained(tokenizer_dir))


def same_tokenizer(first: Optional[dict], second: Optional[dict]) -> bool:
    """False only when both identities are known and the tokens (or special ids) differ."""
    if first is None or second is None:
        return True
    if first["sha256"] != second["sha256"]:
        return False
    a, b = first.get("special_ids"), second.get("special_ids")
    return a is None or b is None or a == b


def _describe(identity: dict) -> str:
    return f"{identity['vocab_size']} tokens, sha256 {identity['sha256'][:12]}"


def check_same_tokenizer(first: dict, first_flag: str, second: dict, second_flag: str) -> None:
    """Refuse two checkpoints whose stored tokenizers differ (ConfigError naming both flags)."""
    a, b = first.get("tokenizer"), second.get("tokenizer")
    if not same_tokenizer(a, b):
        raise ConfigError(f"{first_flag} and {second_flag} were built with different tokenizers "
                          f"({_describe(a)} vs {_describe(b)}); distillation needs one tokenizer")


def check_run_tokenizer(tokenizer, checkpoints: Mapping[str, Optional[str]], tokenizer_flag: str
                        ) -> None:
    """Refuse a run whose tokenizer differs from one stored with a checkpoint it loads.
    ``checkpoints`` maps a flag (``--teacher-load``) to its path (None: not given)."""
    run_identity = None
    for flag, path in checkpoints.items():
        stored = stored_model_metadata(path, flag)
        if stored is None or stored.get("tokenizer") is None:
            continue
        if run_identity is None:
            run_identity = tokenizer_identity(tokenizer)
            if run_identity is None:
                return
        if not same_tokenizer(run_identity, stored["tokenizer"]):
            raise ConfigError(f"{tokenizer_flag} ({_describe(run_identity)}) is not the tokenizer "
                              f"{flag} {path} was built with ({_describe(stored['tokenizer'])})")


# ----------------------------------------------------------------------------------------------
# Architecture from a checkpoint, checked against explicit flags
# ----------------------------------------------------------------------------------------------


def stored_model_metadata(path: Optional[str], flag: str) -> Optional[dict]:
    """The ``megakd_model.json`` of the checkpoint a ``--load``-style flag names, or None when
    the flag is unset, the directory does not exist (``validate`` reports it) or the checkpoint
    predates metadata."""
    from megakd.training.checkpointing import read_model_metadata, resolve_checkpoint_dir

    if path is None or not os.path.isdir(path):
        return None
    try:
        metadata = read_model_metadata(resolve_checkpoint_dir(path, flag))
        if metadata is not None:
            arch_from_metadata(metadata, f"{flag} {path}")
    except (FileNotFoundError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(str(error)) from error
    return metadata


# flag destination (without --teacher- prefix) -> ModelArchConfig field it sets
_STUDENT_FLAG_FIELDS = {
    "num_layers": "num_layers", "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size", "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups", "kv_channels": "kv_channels",
    "swiglu": "swiglu", "normalization": "normalization", "norm_epsilon": "norm_epsilon",
    "position_embedding_type": "position_embedding_type", "rotary_base": "rotary_base",
    "rotary_percent": "rotary_percent", "add_qkv_bias": "add_qkv_bias",
    "qk_layernorm": "qk_layernorm", "use_rope_scaling": "use_rope_scaling",
    "rope_scaling_factor": "rope_scaling_factor",
    "untie_embeddings_and_output_weights": "untie_embeddings_and_output_weights",
    "disable_bias_linear": "add_bias_linear",
}
_TEACHER_FLAG_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                        "num_query_groups", "kv_channels")


def _effective(arch: ModelArchConfig, field: str):
    """A field's value with its implicit default resolved (MHA groups, head dim)."""
    if field == "num_query_groups":
        return arch.num_query_groups or arch.num_attention_heads
    if field == "kv_channels":
        return arch.kv_channels or arch.hidden_size // arch.num_attention_heads
    return getattr(arch, field)


def _flag_value(ns, dest: str, field: str):
    value = getattr(ns, dest)
    return (not value) if field == "add_bias_linear" else value


def arch_with_flags(metadata: dict, ns, explicit: Iterable[str], prefix: str, flag: str,
                    vocab_size: Optional[int]) -> ModelArchConfig:
    """The architecture stored in ``metadata``; every explicitly given model flag (``prefix``
    ``""`` for the student's, ``"teacher_"`` for the teacher's) must agree with it, or a
    ConfigError names each disagreeing flag. ``vocab_size`` is the run's true vocabulary (the
    stored embedding width may differ: rows are matched at load time)."""
    stored, _, _ = arch_from_metadata(metadata, f"{flag}")
    fields = (_STUDENT_FLAG_FIELDS if not prefix
              else {name: name for name in _TEACHER_FLAG_FIELDS})
    explicit = set(explicit)
    given = ModelArchConfig(**dataclasses.asdict(stored))
    errors = []
    for name, field in fields.items():
        dest = prefix + name
        if dest not in explicit:
            continue
        setattr(given, field, _flag_value(ns, dest, field))
        if _effective(given, field) != _effective(stored, field):
            option = "--" + dest.replace("_", "-")
            errors.append(f"{option}={getattr(ns, dest)} disagrees with {flag}'s stored "
                          f"architecture ({field}={getattr(stored, field)})")
        setattr(given, field, getattr(stored, field))
    if errors:
        raise ConfigError("; ".join(errors))
    return dataclasses.replace(stored, vocab_size=vocab_size)
