"""Precompute the teacher's top-k once (``tools/precompute_teacher_topk.py``).

The teacher is loaded with ``--teacher-load`` at any TP/PP/DP layout and runs megatron-core's
forward-only schedule (the same :class:`~megakd.distill.teachers.LiveTeacher` and
``teacher_topk`` as an online run) over samples ``0 .. train_iters * global_batch_size - 1`` of the train split, in
dataset order. Shards are dealt round-robin to the DP ranks; within a DP rank's model-parallel
group every rank runs the teacher and the last pipeline stage's TP rank 0 writes the shard, so
all DP ranks write in parallel. Nothing is communicated besides the teacher's own schedule, the
broadcast of the finished-shard list at the start and two scalars at the end.

Resumable: rank 0 scans for shards already finished (kept and skipped); interrupted ``.tmp``
files are removed and their shards redone. The result is byte-identical to an uninterrupted
run at the same layout.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, List

import torch

from megakd.configs import ConfigError, PrecomputeRunConfig
from megakd.data import build_tokenizer_and_vocabulary, iteration_microbatches
from megakd.distill.builders import build_datasets, build_loaded_teacher
from megakd.distill.teachers import LiveTeacher
from megakd.formats.cache.manifest import (
    MANIFEST_FILENAME,
    SHARD_DIRNAME,
    CacheManifest,
    check_same_manifest,
    data_record,
    teacher_record,
    tokenizer_record,
    write_json_atomic,
)
from megakd.formats.cache.shards import ShardWriter, finished_shards, write_index
from megakd.losses import topk_bytes_per_token


@dataclass(frozen=True)
class PrecomputeSummary:
    num_shards: int
    shards_written: int  # by all ranks in this invocation
    shards_skipped: int  # finished by an earlier invocation
    tokens_written: int
    seconds: float  # from the first teacher pass to the last shard (setup excluded)
    record_bytes: int
    bytes_per_token: float  # on disk, fingerprint included
    raw_bytes_per_token: int  # k * (value bytes + 4) + 4: TeacherTopK in memory
    target_bytes_per_token: float  # k * (1 + ceil(log2 V) / 8) + 4

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_written / self.seconds if self.seconds > 0 else 0.0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """Progress line of one writer, scaled to all DP ranks (each writes an equal share)."""

    def __init__(self, my_shards: int, dp_size: int, log: Callable[[str], None]) -> None:
        self.total, self.dp_size = my_shards, dp_size
        self.log, self.start, self.done, self.tokens = log, time.perf_counter(), 0, 0

    def shard_done(self, shard: int, tokens: int) -> None:
        self.done, self.tokens = self.done + 1, self.tokens + tokens
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / self.done * (self.total - self.done)
        self.log(f"precompute: shard {shard} done | {self.done}/{self.total} shards of DP rank 0 "
                 f"| {rate * self.dp_size:.1f} tokens/s (all {self.dp_size} DP ranks) | elapsed "
                 f"{_clock(elapsed)} | ETA {_clock(eta)}")


def build_manifest(config: PrecomputeRunConfig, tokenizer, train_dataset,
                   num_samples: int) -> CacheManifest:
    kd, data = config.kd, config.data
    return CacheManifest(
        k=kd.topk, dtype=kd.topk_dtype, temperature=kd.temperature, seq_length=data.seq_length,
        vocab_size=int(tokenizer.vocab_size), num_samples=num_samples,
        samples_per_shard=config.precompute.samples_per_shard,
        tokenizer=tokenizer_record(data, tokenizer),
        data=data_record(data, config.training.seed, train_dataset, num_samples),
        teacher=teacher_record(config.checkpoint.teacher_load),
    )


def _start_or_resume(cache_dir: str, manifest: CacheManifest) -> List[int]:
    """Rank 0: write (or check) the manifest; the shards already finished."""
    os.makedirs(os.path.join(cache_dir, SHARD_DIRNAME), exist_ok=True)
    if os.path.isfile(os.path.join(cache_dir, MANIFEST_FILENAME)):
        check_same_manifest(CacheManifest.read(cache_dir), manifest, cache_dir)
    write_json_atomic(os.path.join(cache_dir, MANIFEST_FILENAME), manifest.to_dict())
    return finished_shards(cache_dir, manifest)


def _broadcast(value):
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def precompute(config: PrecomputeRunConfig, device: torch.device,
               log: Callable[[str], None] = print) -> PrecomputeSummary:
    """Collective over all ranks of the initialised process groups: write the cache."""
    from megatron.core import parallel_state

    train, data, rank = config.training, config.data, torch.distributed.get_rank()
    tokenizer, vocab = build_tokenizer_and_vocabulary(
        data, config.parallel.tensor_model_parallel_size)
    num_samples = train.train_samples
    train_dataset, _ = build_datasets(data, tokenizer, train.seed, num_samples)
    if len(train_dataset) < num_samples:
        raise ConfigError(f"the train split holds {len(train_dataset)} samples, fewer than "
                          f"--train-iters x --global-batch-size = {num_samples}")
    manifest = build_manifest(config, tokenizer, train_dataset, num_samples)
    cache_dir = config.checkpoint.teacher_cache
    done = _broadcast(_start_or_resume(cache_dir, manifest) if rank == 0 else None)

    teacher = build_loaded_teacher(config.teacher, config.parallel, data, config.runtime, vocab,
                                   train.bf16, device, config.checkpoint.teacher_load,
                                   fp8=config.teacher_fp8)
    runner = LiveTeacher(teacher, config.kd, vocab.valid, data.seq_length,
                         train.micro_batch_size)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    is_writer = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                 and parallel_state.get_tensor_model_parallel_rank() == 0)
    remaining = [shard for shard in range(manifest.num_shards) if shard not in set(done)]
    mine = remaining[dp_rank::dp_size]  # shards dealt round-robin to the DP ranks
    progress = _Progress(len(mine), dp_size, log) if is_writer and dp_rank == 0 else None
    start = time.perf_counter()  # throughput of the teacher passes + writes
    tokens_written = 0
    for shard in mine:
        _write_shard(config, manifest, shard, runner, train_dataset, device, is_writer)
        if is_writer:
            tokens_written += len(manifest.shard_samples(shard)) * data.seq_length
            if progress is not None:
                progress.shard_done(shard, len(manifest.shard_samples(shard)) * data.seq_length)

    totals = torch.tensor([tokens_written, len(mine) if is_writer else 0], dtype=torch.float64)
    torch.distributed.all_reduce(totals)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        write_index(cache_dir, manifest)
    torch.distributed.barrier()
    layout = manifest.layout
    return PrecomputeSummary(
        num_shards=manifest.num_shards, shards_written=int(totals[1].item()),
        shards_skipped=len(done), tokens_written=int(totals[0].item()),
        seconds=float(elapsed.item()), record_bytes=layout.record_bytes,
        bytes_per_token=layout.bytes_per_token,
        raw_bytes_per_token=topk_bytes_per_token(layout.k, layout.value_dtype),
        target_bytes_per_token=layout.k * (1 + layout.bits / 8) + 4,
    )


def _write_shard(config: PrecomputeRunConfig, manifest: CacheManifest, shard: int,
                 runner: LiveTeacher, train_dataset, device: torch.device,
                 is_writer: bool) -> None:
    """Run the teacher over one shard's samples (every rank of this DP replica) and, on the
    writer rank, append their records and commit the shard."""
    samples = manifest.shard_samples(shard)
    writer = None
    if is_writer:
        writer = ShardWriter(config.checkpoint.teacher_cache, shard, samples.start, {
            "tensor_model_parallel_size": config.parallel.tensor_model_parallel_size,
            "pipeline_model_parallel_size": config.parallel.pipeline_model_parallel_size,
            "micro_batch_size": config.training.micro_batch_size})
    mbs = config.training.micro_batch_size
    per_pass = config.precompute.microbatches_per_pass * mbs
    for first in range(samples.start, samples.stop, per_pass):
        count = min(per_pass, samples.stop - first)
        microbatches = iteration_microbatches(train_dataset, first, count, mbs, 0, 1, device)
        outputs = runner.outputs(microbatches)
        if writer is not None:
            for batch, output in zip(microbatches, outputs):
                writer.append(manifest.layout.encode(output.topk, batch.tokens),
                              len(batch.tokens))
    if writer is not None:
        writer.commit()


def format_summary(summary: PrecomputeSummary, manifest_k: int, dtype: str) -> str:
    return (f"precompute: {summary.shards_written} shards written, {summary.shards_skipped} "
            f"already finished, of {summary.num_shards} | {summary.tokens_written} tokens in "
            f"{summary.seconds:.1f} s = {summary.tokens_per_second:.1f} tokens/s\n"
            f"precompute: bytes/token on disk {summary.bytes_per_token:.2f} (k={manifest_k}, "
            f"{dtype}; record {summary.record_bytes} bytes) | raw k*(value bytes + 4) + 4 = "
            f"{summary.raw_bytes_per_token} | target k*(1 + ceil(log2 V)/8) + 4 = "
            f"{summary.target_bytes_per_token:.2f}")
