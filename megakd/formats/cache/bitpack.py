"""Vocabulary ids bit-packed to ``ceil(log2 V)`` bits each.

The ids of a record are one little-endian bit stream: id ``j`` occupies bits
``[j * bits, (j + 1) * bits)``, least significant bit first, and bit ``i`` of the stream is bit
``i % 8`` of byte ``i // 8``. The stream is zero-padded to a whole byte. (This is what
``numpy.packbits(..., bitorder="little")`` produces from the ids' bits, LSB first.)
"""

from __future__ import annotations

import numpy as np


def index_bits(vocab_size: int) -> int:
    """Bits per id for ids in ``[0, vocab_size)``: ``ceil(log2 V)``, at least 1."""
    if vocab_size < 1:
        raise ValueError(f"vocab size must be positive, got {vocab_size}")
    return max(1, (vocab_size - 1).bit_length())


def packed_bytes(num_ids: int, bits: int) -> int:
    """Bytes that ``num_ids`` ids of ``bits`` bits occupy (the stream padded to a byte)."""
    return (num_ids * bits + 7) // 8


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """``[n]`` non-negative ids ``< 2**bits`` -> ``uint8 [packed_bytes(n, bits)]``."""
    flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise ValueError(f"ids must lie in [0, 2**{bits}), got [{flat.min()}, {flat.max()}]")
    shifts = np.arange(bits, dtype=np.int64)
    id_bits = ((flat[:, None] >> shifts) & 1).astype(np.uint8)  # [n, bits], LSB first
    return np.packbits(id_bits.reshape(-1), bitorder="little")


def unpack_ids(packed: np.ndarray, num_ids: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_ids`: ``uint8`` stream -> ``int64 [num_ids]``."""
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=num_ids * bits,
                           bitorder="little")
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    return stream.reshape(num_ids, bits).astype(np.int64) @ weights
