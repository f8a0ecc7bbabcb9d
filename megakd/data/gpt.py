"""Tokenizer and GPT datasets from megatron-core (``megatron.core.tokenizers``/``datasets``)."""

from __future__ import annotations

import logging
from typing import Sequence, Tuple

from megakd.arguments import DataConfig


def build_tokenizer(data: DataConfig):
    """A ``megatron.core.tokenizers`` tokenizer for ``--tokenizer-type``.

    NullTokenizer (ids are the text) has ``--vocab-size`` + 1 tokens: Megatron appends EOD.
    """
    from megatron.core.tokenizers import MegatronTokenizer

    if data.tokenizer_type == "NullTokenizer":
        return MegatronTokenizer.from_pretrained(
            metadata_path={"library": "null"}, vocab_size=data.vocab_size
        )
    library = {"SentencePieceTokenizer": "sentencepiece", "HuggingFaceTokenizer": "huggingface"}[
        data.tokenizer_type
    ]
    if not data.tokenizer_model:
        raise ValueError(f"--tokenizer-type {data.tokenizer_type} needs --tokenizer-model")
    return MegatronTokenizer.from_pretrained(
        tokenizer_path=data.tokenizer_model, metadata_path={"library": library}
    )


def build_gpt_datasets(
    data: DataConfig, tokenizer, num_samples: Sequence[int], seed: int
) -> Tuple[object, object, object]:
    """Train/valid/test datasets of ``num_samples`` samples each (megatron-core GPTDataset).

    Each sample is a dict of ``tokens``, ``labels``, ``loss_mask``, ``position_ids``, all ``[s]``.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

    if not data.mock_data:
        raise NotImplementedError("only --mock-data is wired up so far")
    # The mock dataset has nowhere to cache its indices and says so on every rank.
    logging.getLogger("megatron.core.datasets").setLevel(logging.ERROR)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data.seq_length,
        blend=None,
        blend_per_split=None,
        split="99,1,0",
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=None,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(
        MockGPTDataset, list(num_samples), lambda: True, config
    ).build()
    return train, valid, test
