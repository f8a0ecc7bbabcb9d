"""Which tokens a run reads: tokenizer, vocabulary padding, datasets, sequence length."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from megakd.configs.fields import flag

# --tokenizer-type -> megatron.core.tokenizers library name
TOKENIZER_LIBRARIES = {
    "NullTokenizer": "null",
    "SentencePieceTokenizer": "sentencepiece",
    "HuggingFaceTokenizer": "huggingface",
}
DATASET_FORMATS = ("indexed", "chat")


@dataclass
class DataConfig:
    """Data sources (docs/data.md) and the vocabulary both models are built for."""

    seq_length: Optional[int] = flag(None, name="--seq-length", low=1, required=True,
                                     help="tokens per sample")
    max_position_embeddings: Optional[int] = flag(None, name="--max-position-embeddings",
                                                  low=1, default_text="seq length",
                                                  help="position table size")
    mock_data: bool = flag(False, name="--mock-data",
                           help="megatron-core's synthetic GPT dataset (exclusive with "
                                "--data-path)")
    data_path: Optional[List[str]] = flag(
        None, name="--data-path", nargs="*", metavar="PATH",
        help="indexed-dataset prefixes or chat JSONL files, optionally weighted as Megatron: "
             "'0.3 A 0.7 B'")
    split: str = flag("969, 30, 1", name="--split",
                      help="train/valid/test weights over documents (conversations for chat)")
    data_cache_path: Optional[str] = flag(None, name="--data-cache-path",
                                          default_text="next to the data",
                                          help="where megatron-core caches sample/blend indices")
    dataset_format: str = flag("indexed", name="--dataset-format", choices=DATASET_FORMATS,
                               help="indexed (.bin/.idx from tools/preprocess_data.py) or chat "
                                    "(JSONL conversations, loss on responses only)")
    messages_key: str = flag("messages", name="--messages-key",
                             help="chat: key of the OpenAI-style message list")
    prompt_key: Optional[str] = flag(None, name="--prompt-key",
                                     help="chat: prompt key instead of messages (with "
                                          "--response-key)")
    response_key: Optional[str] = flag(None, name="--response-key",
                                       help="chat: response key (with --prompt-key)")
    pack_sequences: bool = flag(False, name="--pack-sequences",
                                help="chat: pack conversations per sample with per-conversation "
                                     "positions and a block-diagonal causal mask (CUDA: needs "
                                     "--attention-backend sdpa)")
    tokenizer_type: str = flag("NullTokenizer", name="--tokenizer-type",
                               choices=tuple(TOKENIZER_LIBRARIES),
                               help="tokenizer from megatron.core.tokenizers")
    tokenizer_model: Optional[str] = flag(None, name="--tokenizer-model",
                                          help="tokenizer file or directory (SentencePiece, "
                                               "HuggingFace)")
    vocab_size: Optional[int] = flag(None, name="--vocab-size", low=1,
                                     default_text="from a loaded checkpoint",
                                     help="NullTokenizer vocabulary (Megatron appends EOD, so "
                                          "the true vocab is this + 1); with --mock-data and a "
                                          "checkpoint, its megakd_model.json's vocabulary")
    teacher_vocab_size: Optional[int] = flag(None, name="--teacher-vocab-size", low=1,
                                             default_text="--vocab-size",
                                             help="must equal --vocab-size (one tokenizer)")
    make_vocab_size_divisible_by: int = flag(128, name="--make-vocab-size-divisible-by", low=1,
                                             help="vocab padded to a multiple of this x TP; "
                                                  "padded entries are excluded from every "
                                                  "softmax and never sampled")
    padded_vocab_size: Optional[int] = flag(
        None, name="--padded-vocab-size", low=1, default_text="from the above",
        help="embedding/output rows of teacher and student; checkpoints of another width load "
             "into it, rows beyond the tokenizer are masked")


def pad_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's padding: the next multiple of make-vocab-size-divisible-by x TP."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


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
