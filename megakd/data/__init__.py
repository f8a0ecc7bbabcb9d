"""Tokenizers, datasets and the microbatches of each iteration."""

from megakd.data.batches import Microbatch, iteration_microbatches, kd_loss_mask
from megakd.data.gpt import build_gpt_datasets, build_tokenizer

__all__ = [
    "Microbatch",
    "build_gpt_datasets",
    "build_tokenizer",
    "iteration_microbatches",
    "kd_loss_mask",
]
