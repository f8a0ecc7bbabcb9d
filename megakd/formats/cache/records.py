"""One sample's teacher top-k as a fixed-size byte record (the unit of a cache shard).

A record holds, for one sample of ``s`` tokens (all little-endian, no padding between fields):

====================  =====================================  ===================================
field                 bytes                                  content
====================  =====================================  ===================================
``fingerprint``       8                                      BLAKE2b-64 of the sample's tokens
                                                             (int64 LE): checks the student reads
                                                             the sample the teacher saw
``tail``              ``4 * s``                              fp32 ``log(1 - Sum_topk p)`` per
                                                             token (``-inf``: no tail)
``values``            ``s * (k - 1) * value_bytes``          top-k log-probs relative to the
                                                             top-1, ranks 2..k (rank 1 is 0 by
                                                             definition and not stored); bf16
                                                             or float8_e4m3fn bit patterns
``indices``           ``ceil(s * k * bits / 8)``             the ``s * k`` global ids, token-major,
                                                             bit-packed (:mod:`.bitpack`)
====================  =====================================  ===================================

These are exactly the fields of :class:`megakd.formats.topk.TeacherTopK`, so a decoded record is
bit-identical to what the live teacher would have handed the loss.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch

from megakd.formats.cache.bitpack import index_bits, pack_ids, packed_bytes, unpack_ids
from megakd.formats.topk import TOPK_VALUE_DTYPES, TeacherTopK

_BITS_VIEW = {torch.bfloat16: (torch.int16, "<i2"), torch.float8_e4m3fn: (torch.uint8, "u1")}
FINGERPRINT_BYTES = 8


def token_fingerprint(tokens: torch.Tensor) -> bytes:
    """8-byte BLAKE2b digest of one sample's token ids ``[s]`` (as little-endian int64)."""
    data = np.ascontiguousarray(tokens.detach().cpu().numpy(), dtype="<i8").tobytes()
    return hashlib.blake2b(data, digest_size=FINGERPRINT_BYTES).digest()


@dataclass(frozen=True)
class RecordLayout:
    """Byte layout of one sample's record for ``seq_length`` tokens, top-``k`` over ``vocab_size``
    ids with values of ``dtype`` ("bf16" or "fp8")."""

    seq_length: int
    k: int
    vocab_size: int
    dtype: str

    @property
    def value_dtype(self) -> torch.dtype:
        return TOPK_VALUE_DTYPES[self.dtype]

    @property
    def value_bytes(self) -> int:
        return torch.empty((), dtype=self.value_dtype).element_size()

    @property
    def bits(self) -> int:
        return index_bits(self.vocab_size)

    @property
    def tail_offset(self) -> int:
        return FINGERPRINT_BYTES

    @property
    def values_offset(self) -> int:
        return self.tail_offset + 4 * self.seq_length

    @property
    def indices_offset(self) -> int:
        return self.values_offset + self.seq_length * (self.k - 1) * self.value_bytes

    @property
    def record_bytes(self) -> int:
        return self.indices_offset + packed_bytes(self.seq_length * self.k, self.bits)

    @property
    def bytes_per_token(self) -> float:
        """Disk bytes per token, the per-sample fingerprint and padding included."""
        return self.record_bytes / self.seq_length

    def describe(self) -> dict:
        """The layout as written to the manifest (offsets within a record, in bytes)."""
        return {"record_bytes": self.record_bytes, "index_bits": self.bits,
                "value_bytes": self.value_bytes, "fingerprint_offset": 0,
                "tail_offset": self.tail_offset, "values_offset": self.values_offset,
                "indices_offset": self.indices_offset}

    def encode(self, topk: TeacherTopK, tokens: torch.Tensor) -> bytes:
        """Records of a microbatch: ``topk`` fields ``[b, s, k]`` / ``[b, s]``, ``tokens``
        ``[b, s]`` -> ``b * record_bytes`` bytes."""
        if topk.k != self.k or topk.dtype != self.value_dtype:
            raise ValueError(f"top-k has k={topk.k}, {topk.dtype}; the cache holds k={self.k}, "
                             f"{self.value_dtype}")
        values = topk.logprobs.detach().cpu()
        if bool((values[..., 0].float() != 0).any()):
            raise ValueError("top-k values must be relative to the top-1 (first value 0)")
        view_dtype, np_dtype = _BITS_VIEW[self.value_dtype]
        value_bits = values[..., 1:].contiguous().view(view_dtype).numpy().astype(np_dtype)
        tails = topk.tail_logprob.detach().cpu().float().numpy().astype("<f4")
        ids = topk.indices.detach().cpu().numpy()
        out: List[bytes] = []
        for row in range(tokens.shape[0]):
            out += [token_fingerprint(tokens[row]), tails[row].tobytes(),
                    value_bits[row].tobytes(), pack_ids(ids[row].reshape(-1), self.bits).tobytes()]
        return b"".join(out)

    def decode(self, records: Sequence[bytes], temperature: float) -> "DecodedRecords":
        """Records -> ``TeacherTopK`` with fields ``[n, s, k]`` / ``[n, s]`` and fingerprints."""
        s, k = self.seq_length, self.k
        _, np_dtype = _BITS_VIEW[self.value_dtype]
        tails, values, ids, prints = [], [], [], []
        for record in records:
            if len(record) != self.record_bytes:
                raise ValueError(f"record of {len(record)} bytes, expected {self.record_bytes}")
            raw = np.frombuffer(record, dtype=np.uint8)
            prints.append(bytes(record[:FINGERPRINT_BYTES]))
            tails.append(raw[self.tail_offset:self.values_offset].view("<f4").astype(np.float32))
            values.append(raw[self.values_offset:self.indices_offset].view(np_dtype))
            ids.append(unpack_ids(raw[self.indices_offset:], s * k, self.bits))
        n = len(records)
        native = np.stack(values).astype(np.dtype(np_dtype).newbyteorder("="))
        stored = torch.from_numpy(native.reshape(n, s, k - 1)).view(self.value_dtype)
        top1 = torch.zeros((n, s, 1), dtype=self.value_dtype)
        topk = TeacherTopK(
            logprobs=torch.cat([top1, stored], dim=-1),
            indices=torch.from_numpy(np.stack(ids).reshape(n, s, k)).to(torch.int32),
            tail_logprob=torch.from_numpy(np.stack(tails).reshape(n, s)),
            temperature=float(temperature),
        )
        return DecodedRecords(topk=topk, fingerprints=prints)


@dataclass
class DecodedRecords:
    topk: TeacherTopK  # fields [n, s, k] / [n, s]
    fingerprints: List[bytes]  # one 8-byte token fingerprint per record
