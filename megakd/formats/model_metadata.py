"""Architecture metadata stored with every checkpoint (``megakd_model.json``).

A checkpoint directory carries the :class:`~megakd.configs.ModelArchConfig` it was built
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
import json
import os
from typing import Dict, Mapping, Optional, Tuple

from megakd.configs import ModelArchConfig

MODEL_METADATA_FILENAME = "megakd_model.json"
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


def null_tokenizer_vocab_size(metadata: dict) -> Optional[int]:
    """The ``--vocab-size`` under which a NullTokenizer (ids ``0..N``, ``N`` the end of
    document) covers this model's vocabulary: a converted model's HF vocabulary (its last id
    becomes EOD), else its tokenizer's size minus one, else the ``--vocab-size`` it was trained
    with. None when the metadata records none of them."""
    converted = (metadata.get("hf") or {}).get("vocab_size")
    if converted:
        return int(converted) - 1
    tokenizer = metadata.get("tokenizer") or {}
    if tokenizer.get("vocab_size"):
        return int(tokenizer["vocab_size"]) - 1
    stored = (metadata.get("architecture") or {}).get("vocab_size")
    return int(stored) if stored else None


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


def describe_tokenizer(identity: dict) -> str:
    return f"{identity['vocab_size']} tokens, sha256 {identity['sha256'][:12]}"


def read_model_metadata(checkpoint_dir: str) -> Optional[dict]:
    """The ``megakd_model.json`` stored with a checkpoint, or None for older checkpoints."""
    path = os.path.join(checkpoint_dir, MODEL_METADATA_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)
