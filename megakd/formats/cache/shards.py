"""Shard files: atomic writes, the finished-shard scan a resumed precompute starts from, the
index, and checksum verification.

Shard ``i`` holds the records of samples ``[i * samples_per_shard, ...)`` back to back, in
sample order, as ``shards/shard_{i:06d}.bin`` with a sidecar ``shards/shard_{i:06d}.json``
(``shard``, ``first_sample``, ``num_samples``, ``bytes``, ``crc32``, ``writer``: the
TP/PP/micro-batch size it was written at). A shard is written to
``.bin.tmp``, fsynced, its sidecar written (atomically), and only then renamed to ``.bin``: a
``.bin`` under its final name is always complete, so a rerun keeps it and redoes the rest.
``index.json`` (all sidecars, in shard order) is written last and marks the cache complete.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import BinaryIO, Dict, List, Optional, Sequence

from megakd.configs import ConfigError
from megakd.formats.cache.manifest import INDEX_FILENAME, SHARD_DIRNAME, CacheManifest, write_json_atomic
from megakd.formats.fsutil import fsync_dir

_READ_CHUNK = 1 << 22


class CacheCorruptionError(ConfigError):
    """A shard whose bytes do not match its recorded size or checksum (message: the path)."""


def shard_path(directory: str, shard: int) -> str:
    return os.path.join(directory, SHARD_DIRNAME, f"shard_{shard:06d}.bin")


def sidecar_path(directory: str, shard: int) -> str:
    return os.path.join(directory, SHARD_DIRNAME, f"shard_{shard:06d}.json")


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


class ShardWriter:
    """Writes one shard: append records, then :meth:`commit` (fsync, sidecar, atomic rename)."""

    def __init__(self, directory: str, shard: int, first_sample: int, writer_info: dict) -> None:
        self.directory, self.shard, self.first_sample = directory, shard, first_sample
        self.writer_info = writer_info
        self.final_path = shard_path(directory, shard)
        self.tmp_path = self.final_path + ".tmp"
        self._handle: Optional[BinaryIO] = open(self.tmp_path, "wb")
        self.crc, self.bytes, self.num_samples = 0, 0, 0

    def append(self, records: bytes, num_samples: int) -> None:
        self._handle.write(records)
        self.crc = zlib.crc32(records, self.crc)
        self.bytes += len(records)
        self.num_samples += num_samples

    def commit(self) -> dict:
        """Make the shard durable under its final name; returns its sidecar entry."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None
        entry = {"shard": self.shard, "first_sample": self.first_sample,
                 "num_samples": self.num_samples, "bytes": self.bytes, "crc32": self.crc,
                 "writer": self.writer_info}
        write_json_atomic(sidecar_path(self.directory, self.shard), entry)
        os.replace(self.tmp_path, self.final_path)
        fsync_dir(os.path.dirname(self.final_path))
        return entry


def finished_shards(directory: str, manifest: CacheManifest) -> List[int]:
    """Shards complete on disk (final ``.bin`` of the expected size with its sidecar); leftover
    ``.tmp`` files of interrupted writes are removed. Run on one rank before writing starts."""
    folder = os.path.join(directory, SHARD_DIRNAME)
    for name in os.listdir(folder):
        if name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))
    done = []
    record_bytes = manifest.layout.record_bytes
    for shard in range(manifest.num_shards):
        entry = read_sidecar(directory, shard)
        path = shard_path(directory, shard)
        expected = len(manifest.shard_samples(shard)) * record_bytes
        if entry is not None and os.path.isfile(path) and os.path.getsize(path) == expected \
                and entry.get("bytes") == expected:
            done.append(shard)
    return done


def read_sidecar(directory: str, shard: int) -> Optional[dict]:
    path = sidecar_path(directory, shard)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def write_index(directory: str, manifest: CacheManifest) -> dict:
    """Collect every shard's sidecar into ``index.json`` (all shards must be finished)."""
    shards = []
    for shard in range(manifest.num_shards):
        entry = read_sidecar(directory, shard)
        if entry is None or not os.path.isfile(shard_path(directory, shard)):
            raise RuntimeError(f"{shard_path(directory, shard)} is missing: cannot write the index")
        shards.append({key: entry[key] for key in
                       ("shard", "first_sample", "num_samples", "bytes", "crc32")})
    index = {"num_shards": manifest.num_shards, "num_samples": manifest.num_samples,
             "record_bytes": manifest.layout.record_bytes, "shards": shards}
    write_json_atomic(os.path.join(directory, INDEX_FILENAME), index)
    return index


def read_index(directory: str) -> dict:
    with open(os.path.join(directory, INDEX_FILENAME)) as handle:
        return json.load(handle)


def verify_shards(directory: str, index: dict, shards: Sequence[int]) -> List[str]:
    """Problems with the given shards: each a message naming the shard's path (empty: intact)."""
    entries: Dict[int, dict] = {entry["shard"]: entry for entry in index["shards"]}
    problems = []
    for shard in shards:
        path, entry = shard_path(directory, shard), entries[shard]
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
        elif os.path.getsize(path) != entry["bytes"]:
            problems.append(f"{path}: {os.path.getsize(path)} bytes, the index records "
                            f"{entry['bytes']}")
        elif file_crc32(path) != entry["crc32"]:
            problems.append(f"{path}: checksum mismatch (crc32 {file_crc32(path):08x}, the index "
                            f"records {entry['crc32']:08x}); the shard is corrupted")
    return problems
