"""Fixed-length samples from tokenized conversations: truncation, padding, packing.

A conversation of ``n`` token ids contributes ``min(n, s + 1) - 1`` positions to a sample of
length ``s``: inputs ``ids[:-1]``, labels ``ids[1:]`` (longer conversations are truncated at
the end). Position ``i``'s masks describe its *label*: ``loss_mask`` is 1 where the label is a
response token, ``prompt_mask`` where it is a prompt token, both 0 on padding. Packed samples
hold several conversations one after another; ``position_ids`` restart at 0 for each, and
``document_ids`` (one id per conversation, the padding tail its own) give the block-diagonal
causal attention mask, so packed conversations see exactly what they would see alone.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy
import torch

PAD_TOKEN_ID = 0  # padded inputs/labels (masked out of every loss), as megatron's GPTDataset


def num_positions(num_ids: int, seq_length: int) -> int:
    """Positions a conversation of ``num_ids`` ids fills in a sample of ``seq_length``."""
    return max(min(num_ids, seq_length + 1) - 1, 0)


def pack_in_order(lengths: Sequence[int], seq_length: int) -> List[List[int]]:
    """Next-fit packing: consecutive documents (by index into ``lengths``, already in sample
    order) share a sample while their positions fit in ``seq_length``."""
    packs: List[List[int]] = []
    used = seq_length + 1  # forces a new pack for the first document
    for index, num_ids in enumerate(lengths):
        size = num_positions(num_ids, seq_length)
        if used + size > seq_length:
            packs.append([])
            used = 0
        packs[-1].append(index)
        used += size
    return packs


def build_sample(documents: Sequence[Tuple[numpy.ndarray, numpy.ndarray]], seq_length: int,
                 with_document_ids: bool) -> Dict[str, torch.Tensor]:
    """One sample, all ``[s]``, from ``(ids, is_response)`` conversations that fit.

    Keys: ``tokens``, ``labels`` (int64), ``loss_mask``, ``prompt_mask`` (float32),
    ``position_ids`` (int64) and, with ``with_document_ids``, ``document_ids`` (int64).
    """
    tokens = numpy.full(seq_length, PAD_TOKEN_ID, dtype=numpy.int64)
    labels = numpy.full(seq_length, PAD_TOKEN_ID, dtype=numpy.int64)
    loss_mask = numpy.zeros(seq_length, dtype=numpy.float32)
    prompt_mask = numpy.zeros(seq_length, dtype=numpy.float32)
    position_ids = numpy.zeros(seq_length, dtype=numpy.int64)
    document_ids = numpy.zeros(seq_length, dtype=numpy.int64)
    start = 0
    for doc, (ids, is_response) in enumerate(documents):
        size = num_positions(len(ids), seq_length)
        if start + size > seq_length:
            raise ValueError(f"documents of {start + size} positions exceed {seq_length}")
        end = start + size
        tokens[start:end] = ids[:size]
        labels[start:end] = ids[1:size + 1]
        loss_mask[start:end] = is_response[1:size + 1]
        prompt_mask[start:end] = ~is_response[1:size + 1]
        position_ids[start:end] = numpy.arange(size)
        document_ids[start:end] = doc
        start = end
    position_ids[start:] = numpy.arange(seq_length - start)
    document_ids[start:] = len(documents)  # the padding tail attends only to itself
    sample = {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "prompt_mask": torch.from_numpy(prompt_mask),
        "position_ids": torch.from_numpy(position_ids),
    }
    if with_document_ids:
        sample["document_ids"] = torch.from_numpy(document_ids)
    return sample


def block_causal_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """``[b, 1, s, s]`` bool mask, True where attention is *masked* (megatron's convention):
    query ``i`` sees key ``j`` iff ``j <= i`` and both belong to the same document."""
    same_document = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)  # [b, s, s]
    seq = document_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return ~(same_document & causal).unsqueeze(1)


def last_response(tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
                  ) -> Optional[Tuple[List[int], List[int]]]:
    """``(prompt ids, reference response ids)`` of a sample's last answer (``[s]`` rows of a
    chat sample): the prompt is every token up to the answer's first one. None when the
    sample holds no response token."""
    positions = torch.nonzero(loss_mask > 0).flatten().tolist()
    if not positions:
        return None
    end = positions[-1] + 1
    start = end - 1
    while start > 0 and loss_mask[start - 1] > 0:
        start -= 1
    # label `start` is the answer's first token, so the prompt ends with input token `start`
    return tokens[:start + 1].tolist(), labels[start:end].tolist()


def generated_sample(prompt: Sequence[int], response: Sequence[int],
                     seq_length: int) -> Dict[str, torch.Tensor]:
    """A sample of ``seq_length`` positions holding ``prompt`` + a generated ``response``:
    ``kd_mask`` marks the response's labels (the KD term's tokens), ``loss_mask`` is all zero
    (the student's own samples carry no CE), ``prompt_mask`` marks the prompt's labels."""
    ids = numpy.asarray(list(prompt) + list(response), dtype=numpy.int64)
    size = num_positions(len(ids), seq_length)
    tokens = numpy.full(seq_length, PAD_TOKEN_ID, dtype=numpy.int64)
    labels = numpy.full(seq_length, PAD_TOKEN_ID, dtype=numpy.int64)
    tokens[:size], labels[:size] = ids[:size], ids[1:size + 1]
    label_index = numpy.arange(seq_length)
    is_response = (label_index >= len(prompt) - 1) & (label_index < size)
    is_prompt = label_index < min(len(prompt) - 1, size)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.zeros(seq_length, dtype=torch.float32),
        "kd_mask": torch.from_numpy(is_response.astype(numpy.float32)),
        "prompt_mask": torch.from_numpy(is_prompt.astype(numpy.float32)),
        "position_ids": torch.arange(seq_length, dtype=torch.int64),
    }
