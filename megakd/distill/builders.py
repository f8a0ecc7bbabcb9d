"""What both a training run and the teacher-cache precompute build: the train/validation
datasets and the frozen teacher loaded from disk (the tokenizer and vocabulary widths:
:func:`megakd.data.build_tokenizer_and_vocabulary`)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from megakd.configs import (DataConfig, ModelArchConfig, ParallelConfig, RuntimeConfig,
                            TeacherFP8Config)
from megakd.data import Vocabulary, build_gpt_datasets
from megakd.formats.checkpoints import load_model_weights
from megakd.models import build_teacher


def build_datasets(data: DataConfig, tokenizer, seed: int, train_samples: int,
                   valid_samples: int = 0) -> Tuple[object, Optional[object]]:
    """Train and validation splits holding at least the requested samples (validation None
    when not requested). The train split's sample order depends on ``train_samples``: a run
    reading an offline teacher cache requests what the precompute requested."""
    train, valid, _ = build_gpt_datasets(data, tokenizer, [train_samples, valid_samples, 0], seed)
    return train, (valid if valid_samples else None)


def build_loaded_teacher(arch: ModelArchConfig, parallel: ParallelConfig, data: DataConfig,
                         runtime: RuntimeConfig, vocab: Vocabulary, bf16: bool,
                         device: torch.device, teacher_load: Optional[str],
                         fp8: Optional[TeacherFP8Config] = None) -> List[torch.nn.Module]:
    """The frozen teacher's chunks for this rank, with ``--teacher-load``'s weights (any
    layout) when given (collective: every rank reads its shards); ``fp8``: ``--teacher-fp8-*``."""
    chunks = build_teacher(arch, parallel, vocab.padded, data.max_position_embeddings,
                           bf16=bf16, device=device, attention_backend=runtime.attention_backend,
                           fp8=fp8)
    if teacher_load:
        load_model_weights(chunks, teacher_load, flag="--teacher-load")
    return chunks
