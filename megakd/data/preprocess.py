"""JSONL -> megatron-core indexed datasets (``.bin``/``.idx``), one per JSON key.

Writes ``{output_prefix}_{key}_document.bin/.idx`` with megatron-core's
``IndexedDatasetBuilder`` (Megatron-LM's naming, one document per JSONL line, token dtype the
smallest that holds the vocabulary). Lines are tokenized by ``workers`` processes and written in
input order, so the output does not depend on ``workers``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy

from megakd.data.tokenizers import load_tokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker process needs to load the tokenizer itself (tokenizers don't pickle)."""

    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    vocab_size: Optional[int] = None

    def load(self):
        return load_tokenizer(self.tokenizer_type, self.tokenizer_model, self.vocab_size)


@dataclass
class PreprocessStats:
    documents: int  # non-empty documents written, summed over keys
    tokens: int  # tokens written, summed over keys
    input_bytes: int
    seconds: float
    output_prefixes: List[str]


class _LineEncoder:
    """Tokenizes one JSONL line's ``json_keys``; returns an error string for a bad line."""

    def __init__(self, spec: TokenizerSpec, json_keys: Sequence[str], append_eod: bool) -> None:
        self.tokenizer = spec.load()
        self.json_keys = list(json_keys)
        self.append_eod = append_eod

    def __call__(self, numbered_line: Tuple[int, str]
                 ) -> Tuple[int, Union[str, Dict[str, numpy.ndarray]]]:
        line_number, line = numbered_line
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            return line_number, f"invalid JSON ({error.msg} at column {error.colno})"
        if not isinstance(record, dict):
            return line_number, f"expected a JSON object, got {type(record).__name__}"
        encoded = {}
        for key in self.json_keys:
            if key not in record:
                return line_number, f"missing key {key!r} (--json-keys)"
            if not isinstance(record[key], str):
                return line_number, f"{key!r} must be a string, got {type(record[key]).__name__}"
            ids = list(self.tokenizer.tokenize(record[key])) if record[key] else []
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
            encoded[key] = numpy.asarray(ids, dtype=numpy.int64)  # pickles compactly
        return line_number, encoded


_worker_encoder: Optional[_LineEncoder] = None  # one per worker process, set by its initializer


def _init_worker(spec: TokenizerSpec, json_keys: Sequence[str], append_eod: bool) -> None:
    global _worker_encoder
    _worker_encoder = _LineEncoder(spec, json_keys, append_eod)


def _encode_in_worker(numbered_line: Tuple[int, str]):
    return _worker_encoder(numbered_line)


def _numbered_lines(path: str) -> Iterator[Tuple[int, str]]:
    with open(path, "r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                yield line_number, line


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron-LM's name of the dataset written for ``key``."""
    return f"{output_prefix}_{key}_document"


def preprocess_jsonl(input_path: str, output_prefix: str, spec: TokenizerSpec,
                     json_keys: Sequence[str] = ("text",), append_eod: bool = False,
                     workers: int = 1, chunk_size: int = 256) -> PreprocessStats:
    """Tokenize ``input_path`` into one indexed dataset per key (see module docstring).

    A malformed line raises ValueError ``"{input_path}:{line}: ..."`` and removes the partial
    outputs. Empty documents (empty text) are skipped, as in Megatron-LM.
    """
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    if not os.path.isfile(input_path):
        raise ValueError(f"--input {input_path}: no such file")
    vocab_size = spec.load().vocab_size
    start = time.perf_counter()  # throughput: after imports and tokenizer loading
    prefixes = {key: output_prefix_for(output_prefix, key) for key in json_keys}
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    builders = {key: IndexedDatasetBuilder(get_bin_path(prefix),
                                           dtype=DType.optimal_dtype(vocab_size))
                for key, prefix in prefixes.items()}
    documents = tokens = 0
    pool = None
    try:
        if workers > 1:
            # fork where available: workers start without re-importing megatron-core
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(
                workers, initializer=_init_worker, initargs=(spec, list(json_keys), append_eod))
            results = pool.imap(_encode_in_worker, _numbered_lines(input_path), chunk_size)
        else:
            results = map(_LineEncoder(spec, json_keys, append_eod), _numbered_lines(input_path))
        for line_number, encoded in results:
            if isinstance(encoded, str):
                raise ValueError(f"{input_path}:{line_number}: {encoded}")
            for key, ids in encoded.items():
                if len(ids):
                    builders[key].add_document(ids, [len(ids)])
                    documents += 1
                    tokens += len(ids)
    except BaseException:
        for key, builder in builders.items():
            builder.data_file.close()
            for path in (get_bin_path(prefixes[key]), get_idx_path(prefixes[key])):
                if os.path.exists(path):
                    os.remove(path)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    for key, builder in builders.items():
        builder.finalize(get_idx_path(prefixes[key]))
    return PreprocessStats(documents=documents, tokens=tokens,
                           input_bytes=os.path.getsize(input_path),
                           seconds=time.perf_counter() - start,
                           output_prefixes=list(prefixes.values()))
