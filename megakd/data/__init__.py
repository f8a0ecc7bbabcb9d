"""Tokenizers, datasets, and the microbatches of each iteration (and their sources)."""

from megakd.data.batches import (
    DatasetMicrobatches,
    Microbatch,
    MicrobatchSource,
    iteration_microbatches,
    kd_loss_mask,
)
from megakd.data.gpt import build_gpt_datasets, build_tokenizer

__all__ = [
    "DatasetMicrobatches",
    "Microbatch",
    "MicrobatchSource",
    "build_gpt_datasets",
    "build_tokenizer",
    "iteration_microbatches",
    "kd_loss_mask",
]
