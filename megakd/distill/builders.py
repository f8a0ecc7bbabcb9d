"""What both a training run and the teacher-cache precompute build: the tokenizer and the
vocabulary widths, the train/validation datasets, and the frozen teacher loaded from disk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from megakd.configs import (
    ConfigError,
    DataConfig,
    ModelArchConfig,
    ParallelConfig,
    RuntimeConfig,
    pad_vocab_size,
)
from megakd.data import build_gpt_datasets, build_tokenizer
from megakd.formats.checkpoints import load_model_weights
from megakd.models import build_teacher


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer's tokens and the embedding/output rows both models are built with."""

    valid: int  # real tokens; ids >= valid are padding, masked in every softmax
    padded: int  # rows of the embedding and output layer (a multiple of TP)


def build_tokenizer_and_vocabulary(data: DataConfig, tensor_parallel_size: int
                                   ) -> Tuple[object, Vocabulary]:
    """The run's tokenizer, and its vocabulary padded as ``--padded-vocab-size`` or Megatron's
    rule (a multiple of ``--make-vocab-size-divisible-by`` x TP)."""
    tokenizer = build_tokenizer(data)
    valid = tokenizer.vocab_size
    padded = data.padded_vocab_size or pad_vocab_size(
        valid, data.make_vocab_size_divisible_by, tensor_parallel_size)
    if padded < valid:
        raise ConfigError(f"--padded-vocab-size={padded} is smaller than the tokenizer's "
                          f"vocabulary ({valid})")
    return tokenizer, Vocabulary(valid=valid, padded=padded)


def build_datasets(data: DataConfig, tokenizer, seed: int, train_samples: int,
                   valid_samples: int = 0) -> Tuple[object, Optional[object]]:
    """Train and validation splits holding at least the requested samples (validation None
    when not requested). The train split's sample order depends on ``train_samples``: a run
    reading an offline teacher cache requests what the precompute requested."""
    train, valid, _ = build_gpt_datasets(data, tokenizer, [train_samples, valid_samples, 0], seed)
    return train, (valid if valid_samples else None)


def build_loaded_teacher(arch: ModelArchConfig, parallel: ParallelConfig, data: DataConfig,
                         runtime: RuntimeConfig, vocab: Vocabulary, bf16: bool,
                         device: torch.device, teacher_load: Optional[str]
                         ) -> List[torch.nn.Module]:
    """The frozen teacher's chunks for this rank, with ``--teacher-load``'s weights (any
    layout) when given (collective: every rank reads its shards)."""
    chunks = build_teacher(arch, parallel, vocab.padded, data.max_position_embeddings,
                           bf16=bf16, device=device, attention_backend=runtime.attention_backend)
    if teacher_load:
        load_model_weights(chunks, teacher_load, flag="--teacher-load")
    return chunks
