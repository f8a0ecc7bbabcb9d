"""Architecture metadata stored with every checkpoint (``megakd_model.json``).

A checkpoint directory carries the :class:`~megakd.arguments.ModelArchConfig` it was built
from, the padded vocabulary width of its embedding/output rows, and (when known) the identity
of its tokenizer, so ``--teacher-load``/``--load`` need no model flags and a checkpoint that
does not fit the run is refused before any weights are read.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from megakd.arguments import ModelArchConfig

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
