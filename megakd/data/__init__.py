"""Tokenizers, datasets, and the microbatches of each iteration (and their sources)."""

from megakd.data.batches import (
    DatasetMicrobatches,
    Microbatch,
    MicrobatchSource,
    iteration_microbatches,
    kd_loss_mask,
)
from megakd.data.gpt import (
    Vocabulary,
    build_gpt_datasets,
    build_tokenizer,
    build_tokenizer_and_vocabulary,
)

__all__ = [
    "DatasetMicrobatches",
    "Microbatch",
    "MicrobatchSource",
    "Vocabulary",
    "build_gpt_datasets",
    "build_tokenizer",
    "build_tokenizer_and_vocabulary",
    "iteration_microbatches",
    "kd_loss_mask",
]
