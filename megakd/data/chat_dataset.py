"""Chat/SFT JSONL as a megatron-core dataset, so ``BlendedMegatronDatasetBuilder`` does the
train/valid/test split (``--split``, by conversation, in file order) and weighted blends of
several files (``--data-path 0.7 a.jsonl 0.3 b.jsonl``) exactly as for GPT data.

* :class:`ChatDocuments` (the "low-level" dataset): every conversation of one file, tokenized.
* :class:`ChatDataset` (the "mid-level" dataset): fixed-length samples over one split. Sample
  order is a permutation of the split's conversations per epoch, drawn from
  ``numpy.random.RandomState(seed)``, so it depends only on the data, ``--split``,
  ``--seq-length``, ``--pack-sequences`` and ``--seed`` (not on the parallel layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from megakd.data.chat_format import ChatKeys, read_conversations
from megakd.data.chat_template import tokenize_conversation
from megakd.data.packing import build_sample, pack_in_order


@dataclass
class ChatDatasetConfig(BlendedMegatronDatasetConfig):
    """megatron-core dataset config plus the JSONL keys and packing."""

    messages_key: str = "messages"
    prompt_key: Optional[str] = None
    response_key: Optional[str] = None
    pack_sequences: bool = False

    @property
    def keys(self) -> ChatKeys:
        return ChatKeys(self.messages_key, self.prompt_key, self.response_key)


class ChatDocuments:
    """All conversations of one JSONL file as token ids with response flags (flat arrays)."""

    def __init__(self, path: str, keys: ChatKeys, tokenizer) -> None:
        ids, flags, lengths = [], [], []
        for messages in read_conversations(path, keys):
            doc_ids, is_response = tokenize_conversation(tokenizer, messages)
            ids.append(doc_ids)
            flags.append(is_response)
            lengths.append(len(doc_ids))
        self.path = path
        self.ids = numpy.concatenate(ids)
        self.is_response = numpy.concatenate(flags)
        self.lengths = numpy.asarray(lengths, dtype=numpy.int64)
        self.offsets = numpy.concatenate([[0], numpy.cumsum(self.lengths)])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int):
        """``(ids [n] int32, is_response [n] bool)`` of conversation ``index``."""
        begin, end = self.offsets[index], self.offsets[index + 1]
        return self.ids[begin:end], self.is_response[begin:end]


class ChatDataset(MegatronDataset):
    """Samples of ``--seq-length`` tokens over one split's conversations (see packing.py)."""

    def __init__(self, dataset: ChatDocuments, dataset_path: Optional[str],
                 indices: numpy.ndarray, num_samples: Optional[int], index_split: Split,
                 config: ChatDatasetConfig) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        self.samples = self._build_sample_index()

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: ChatDocuments) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: ChatDatasetConfig) -> ChatDocuments:
        return ChatDocuments(dataset_path, config.keys, config.tokenizer)

    @staticmethod
    def _key_config_attributes() -> List[str]:
        return MegatronDataset._key_config_attributes() + [
            "messages_key", "prompt_key", "response_key", "pack_sequences"]

    def _build_sample_index(self) -> List[numpy.ndarray]:
        """Conversation indices of each sample, epoch after epoch until ``num_samples``."""
        wanted = self.num_samples or 0
        if len(self.indices) == 0:
            if wanted > 0:
                raise ValueError(f"{self.dataset_path}: --split {self.config.split} leaves the "
                                 f"{self.index_split.name} split no conversations")
            return []
        rng = numpy.random.RandomState(self.config.random_seed)
        seq = self.config.sequence_length
        samples: List[numpy.ndarray] = []
        while not samples or len(samples) < wanted:
            order = rng.permutation(self.indices)
            if self.config.pack_sequences:
                packs = pack_in_order(self.dataset.lengths[order], seq)
                samples += [order[pack] for pack in packs]
            else:
                samples += [order[i:i + 1] for i in range(len(order))]
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        documents = [self.dataset[int(d)] for d in self.samples[idx]]
        return build_sample(documents, self.config.sequence_length,
                            with_document_ids=self.config.pack_sequences)
