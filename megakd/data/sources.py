"""``--data-path``/``--split`` parsing and the data checks run before any process starts.

:func:`check_data_flags` is called by ``megakd.arguments.validate``; every message names its
flag (and, for a malformed chat line, the file and line number).
"""

from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

Blend = Tuple[List[str], Optional[List[float]]]  # megatron-core's (prefixes, weights)


def parse_blend(data_path: List[str]) -> Blend:
    """Megatron's ``--data-path``: ``[w1, p1, w2, p2, ...]`` or ``[p1, p2, ...]``.

    Raises ValueError (naming ``--data-path``) for a malformed list.
    """
    if not data_path:
        raise ValueError("--data-path needs at least one path")
    weights: List[float] = []
    for item in data_path[0::2]:
        try:
            weights.append(float(item))
        except ValueError:
            break
    if len(data_path) % 2 == 0 and len(weights) == len(data_path) // 2:
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"--data-path weights must be non-negative with a positive sum, "
                             f"got {weights}")
        return [p.strip() for p in data_path[1::2]], weights
    if weights:  # some leading items are numbers, but not as weight/path pairs
        raise ValueError(f"--data-path {' '.join(data_path)}: expected 'PATH ...' or "
                         f"'WEIGHT PATH WEIGHT PATH ...'")
    return [p.strip() for p in data_path], None


def parse_split(split: str) -> List[float]:
    """``--split`` as three non-negative weights (train, valid, test); missing ones are 0."""
    values = [v for v in re.split(r"[,\s/]+", split.strip()) if v]
    try:
        weights = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected up to three numbers, e.g. '98,2,0'") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {split!r}: expected up to three non-negative numbers with a "
                         f"positive sum, e.g. '98,2,0'")
    return weights + [0.0] * (3 - len(weights))


def check_data_flags(data) -> List[str]:
    """Every problem with the data flags of a ``DataConfig`` (empty list: all good).

    Chat JSONL files are read completely here, so a malformed line fails before training.
    """
    from megakd.data.chat_format import ChatFormatError, ChatKeys, iter_conversations

    errors: List[str] = []
    sources = int(bool(data.mock_data)) + int(data.data_path is not None)
    if sources != 1:
        errors.append("no data source: pass --data-path (or --mock-data)" if sources == 0 else
                      "--mock-data and --data-path are mutually exclusive")
        return errors
    if data.pack_sequences and data.dataset_format != "chat":
        errors.append("--pack-sequences needs --dataset-format chat")
    if (data.prompt_key is None) != (data.response_key is None):
        errors.append("--prompt-key and --response-key must be given together")
    if data.mock_data:
        return errors
    try:
        parse_split(data.split)
    except ValueError as error:
        errors.append(str(error))
    try:
        prefixes, _ = parse_blend(data.data_path)
    except ValueError as error:
        return errors + [str(error)]

    if data.dataset_format == "indexed":
        for prefix in prefixes:
            missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
            if missing:
                errors.append(f"--data-path {prefix}: no {' or '.join(prefix + m for m in missing)}"
                              f" (write them with tools/preprocess_data.py)")
        return errors

    if data.tokenizer_type == "NullTokenizer":
        errors.append("--dataset-format chat needs a text tokenizer: --tokenizer-type "
                      "SentencePieceTokenizer or HuggingFaceTokenizer")
    keys = ChatKeys(data.messages_key, data.prompt_key, data.response_key)
    for path in prefixes:
        try:
            if sum(1 for _ in iter_conversations(path, keys)) == 0:  # reads every line
                errors.append(f"--data-path {path}: no conversations")
        except ChatFormatError as error:
            errors.append(f"--data-path {error}")
    return errors
