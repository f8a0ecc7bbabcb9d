"""Train/valid/test datasets through megatron-core's ``BlendedMegatronDatasetBuilder``.

Three sources (docs/data.md): ``--mock-data`` (megatron-core's ``MockGPTDataset``),
``--data-path`` with indexed ``.bin/.idx`` prefixes (``GPTDataset``, written by
tools/preprocess_data.py), and ``--data-path`` with chat JSONL files (``--dataset-format chat``,
:class:`~megakd.data.chat_dataset.ChatDataset`). Weighted blends and ``--split`` work the same
for all real data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence, Tuple

from megakd.configs import ConfigError, DataConfig, pad_vocab_size, parse_blend
from megakd.data.chat_dataset import ChatDataset, ChatDatasetConfig
from megakd.data.tokenizers import load_tokenizer


def build_tokenizer(data: DataConfig):
    """A ``megatron.core.tokenizers`` tokenizer for ``--tokenizer-type``/``--tokenizer-model``.

    NullTokenizer (ids are the text) has ``--vocab-size`` + 1 tokens: Megatron appends EOD.
    """
    return load_tokenizer(data.tokenizer_type, data.tokenizer_model, data.vocab_size)


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


def _common_config(data: DataConfig, tokenizer, seed: int) -> dict:
    """Fields every megatron-core dataset config here shares."""
    return dict(
        random_seed=seed,
        sequence_length=data.seq_length,
        tokenizer=tokenizer,
        path_to_cache=data.data_cache_path,
    )


# The mock datasets' sample and shuffle indices span megatron-core's 100k mock documents
# (0.5 s per build); a process that sets up many runs (tests, benchmarks) builds them once.
# Datasets are read-only, so sharing them changes no sample.
_MOCK_DATASETS: dict = {}


def build_gpt_datasets(
    data: DataConfig, tokenizer, num_samples: Sequence[int], seed: int
) -> Tuple[object, object, object]:
    """Train/valid/test datasets holding at least ``num_samples`` samples each (None for a
    split that ``--split`` gives no weight).

    Each sample is a dict of ``tokens``, ``labels``, ``loss_mask``, ``position_ids``, all
    ``[s]``; chat samples add ``prompt_mask`` ``[s]``, and with ``--pack-sequences``
    ``document_ids`` ``[s]`` (see :mod:`megakd.data.packing`).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    gpt_flags = dict(reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                     create_attention_mask=False)
    mock_key = (data.seq_length, seed, tuple(num_samples), type(tokenizer).__name__,
                tokenizer.vocab_size, tokenizer.eod)
    if data.mock_data and mock_key in _MOCK_DATASETS:
        return _MOCK_DATASETS[mock_key]
    if data.mock_data:
        # The mock dataset has nowhere to cache its indices and says so on every rank.
        logging.getLogger("megatron.core.datasets").setLevel(logging.ERROR)
        dataset_class = MockGPTDataset
        config = GPTDatasetConfig(blend=None, blend_per_split=None, split="99,1,0",
                                  **_common_config(data, tokenizer, seed), **gpt_flags)
    elif data.dataset_format == "chat":
        dataset_class = ChatDataset
        config = ChatDatasetConfig(
            blend=parse_blend(data.data_path), split=data.split,
            messages_key=data.messages_key, prompt_key=data.prompt_key,
            response_key=data.response_key, pack_sequences=data.pack_sequences,
            **_common_config(data, tokenizer, seed))
    else:
        dataset_class = GPTDataset
        config = GPTDatasetConfig(blend=parse_blend(data.data_path), split=data.split,
                                  **_common_config(data, tokenizer, seed), **gpt_flags)
    train, valid, test = BlendedMegatronDatasetBuilder(
        dataset_class, list(num_samples), lambda: True, config
    ).build()
    if data.mock_data:
        _MOCK_DATASETS.clear()  # one entry: its indices are a few hundred MB at most
        _MOCK_DATASETS[mock_key] = (train, valid, test)
    return train, valid, test
