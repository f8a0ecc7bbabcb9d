"""Reading a finished cache: records by sample id, and the teacher source a student run uses.

:class:`CachedTeacher` stands in for :class:`megakd.distill.TeacherRunner`: ``run(microbatches)``
returns one :class:`~megakd.losses.TeacherTopK` ``[b, s, k]`` per microbatch on the student's
last pipeline stage (``[]`` elsewhere), read from disk by the microbatches' sample ids instead
of computed by a teacher. No communication; every last-stage rank reads the records it needs.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch

from megakd.arguments import ConfigError, KDRunConfig
from megakd.cache.manifest import (
    INDEX_FILENAME,
    CacheManifest,
    check_run_identity,
    data_record,
    tokenizer_record,
)
from megakd.cache.records import DecodedRecords, token_fingerprint
from megakd.cache.shards import CacheCorruptionError, read_index, shard_path, verify_shards
from megakd.data import Microbatch
from megakd.losses import TeacherTopK


_MAX_OPEN_SHARDS = 8


class CacheMismatchError(RuntimeError):
    """A microbatch whose tokens are not the ones the cached teacher saw."""


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

    def check_run(self, config: KDRunConfig, tokenizer, train_dataset) -> None:
        """Refuse a run with another tokenizer or other data (ConfigError naming the field)."""
        check_run_identity(
            self.manifest, self.directory, tokenizer_record(config.data, tokenizer),
            data_record(config, train_dataset, self.manifest.data["train_samples_requested"]))

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


class CachedTeacher:
    """The teacher source of a ``--teacher-cache`` run (same ``run`` as ``TeacherRunner``)."""

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache

    def run(self, microbatches: Sequence[Microbatch]) -> List[TeacherTopK]:
        """Per microbatch, the cached top-k of its samples ``[b, s, k]`` on the last pipeline
        stage (``[]`` elsewhere), checked against the microbatch's tokens."""
        from megatron.core import parallel_state

        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return []
        outputs = []
        for batch in microbatches:
            if batch.sample_ids is None:
                raise ValueError("--teacher-cache needs microbatches that carry sample_ids")
            sample_ids = batch.sample_ids.tolist()
            decoded = self.cache.read(sample_ids)
            for row, (sample, stored) in enumerate(zip(sample_ids, decoded.fingerprints)):
                if token_fingerprint(batch.tokens[row]) != stored:
                    raise CacheMismatchError(
                        f"--teacher-cache {self.cache.directory}: sample {sample} holds other "
                        "tokens than the ones the cached teacher saw (different data or order)")
            outputs.append(decoded.topk.to(batch.tokens.device))
        return outputs
