"""Reading a finished cache: records by sample id, checksums, the run identity check.

The teacher source built on it (``--teacher-cache``) is :class:`megakd.distill.teachers.CachedTeacher`.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch

from megakd.configs import ConfigError, DataConfig
from megakd.formats.cache.manifest import (
    INDEX_FILENAME,
    CacheManifest,
    check_run_identity,
    data_record,
    tokenizer_record,
)
from megakd.formats.cache.records import DecodedRecords
from megakd.formats.cache.shards import CacheCorruptionError, read_index, shard_path, verify_shards


_MAX_OPEN_SHARDS = 8


class TeacherCache:
    """A complete cache directory (manifest, index, shards), read by sample id."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.manifest = CacheManifest.read(directory)
        if not os.path.isfile(os.path.join(directory, INDEX_FILENAME)):
            raise ConfigError(f"--teacher-cache {directory}: incomplete cache (no "
                              f"{INDEX_FILENAME}); rerun tools/precompute_teacher_topk.py")
        self.index = read_index(directory)
        self.layout = self.manifest.layout
        self._fds: Dict[int, int] = {}

    @property
    def train_samples_requested(self) -> int:
        """The train-split request the precompute built its dataset with (a reader must build
        the same, so that sample i holds the same tokens)."""
        return int(self.manifest.data["train_samples_requested"])

    def check_run(self, data: DataConfig, seed: int, tokenizer, train_dataset) -> None:
        """Refuse a run with another tokenizer or other data (ConfigError naming the field)."""
        check_run_identity(
            self.manifest, self.directory, tokenizer_record(data, tokenizer),
            data_record(data, seed, train_dataset, self.train_samples_requested))

    def shards_covering(self, num_samples: int) -> range:
        """Shards holding samples ``[0, num_samples)``."""
        per_shard = self.manifest.samples_per_shard
        return range(min(self.manifest.num_shards, -(-num_samples // per_shard)))

    def verify(self, num_samples: int, group=None) -> None:
        """Collective over ``group`` (default: all ranks; None without torch.distributed):
        checksum every shard a run of ``num_samples`` samples reads, each shard on one rank.
        Raises :class:`CacheCorruptionError` naming every bad shard's path, on every rank."""
        shards = list(self.shards_covering(num_samples))
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank(group) if distributed else 0
        world = torch.distributed.get_world_size(group) if distributed else 1
        problems = verify_shards(self.directory, self.index, shards[rank::world])
        if distributed and world > 1:
            gathered: List[List[str]] = [[] for _ in range(world)]
            torch.distributed.all_gather_object(gathered, problems, group=group)
            problems = [problem for rank_problems in gathered for problem in rank_problems]
        if problems:
            raise CacheCorruptionError("--teacher-cache: " + "; ".join(problems))

    def read(self, sample_ids: Sequence[int]) -> DecodedRecords:
        """Decoded records of the given samples, in order: fields ``[n, s, k]`` / ``[n, s]``."""
        manifest, size = self.manifest, self.layout.record_bytes
        records = []
        for sample in sample_ids:
            if not 0 <= sample < manifest.num_samples:
                raise IndexError(f"sample {sample} is not in the cache {self.directory} "
                                 f"({manifest.num_samples} samples)")
            shard, row = divmod(sample, manifest.samples_per_shard)
            record = os.pread(self._fd(shard), size, row * size)
            if len(record) != size:
                raise CacheCorruptionError(f"{shard_path(self.directory, shard)}: truncated "
                                           f"(record of sample {sample} incomplete)")
            records.append(record)
        return self.layout.decode(records, manifest.temperature)

    def _fd(self, shard: int) -> int:
        """An open descriptor of the shard (reads are sequential: keep the last few open)."""
        if shard not in self._fds:
            if len(self._fds) >= _MAX_OPEN_SHARDS:
                os.close(self._fds.pop(next(iter(self._fds))))  # the oldest
            self._fds[shard] = os.open(shard_path(self.directory, shard), os.O_RDONLY)
        return self._fds[shard]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
