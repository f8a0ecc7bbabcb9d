"""Precompute the teacher's top-k once (``tools/precompute_teacher_topk.py``).

The teacher is loaded with ``--teacher-load`` at any TP/PP/DP layout and runs megatron-core's
forward-only schedule (the same :class:`~megakd.distill.TeacherRunner` and ``teacher_topk`` as
an online run) over samples ``0 .. train_iters * global_batch_size - 1`` of the train split, in
dataset order. Shards are dealt round-robin to the DP ranks; within a DP rank's model-parallel
group every rank runs the teacher and the last pipeline stage's TP rank 0 writes the shard, so
all DP ranks write in parallel. Nothing is communicated besides the teacher's own schedule, the
broadcast of the finished-shard list at the start and two scalars at the end.

Resumable: rank 0 scans for shards already finished (kept and skipped); interrupted ``.tmp``
files are removed and their shards redone. The result is byte-identical to an uninterrupted
run at the same layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from megakd.arguments import ConfigError, KDRunConfig, pad_vocab_size, parse_args
from megakd.cache.manifest import (
    SHARD_DIRNAME,
    CacheManifest,
    check_same_manifest,
    data_record,
    teacher_record,
    tokenizer_record,
    write_json_atomic,
)
from megakd.cache.shards import ShardWriter, finished_shards, write_index
from megakd.losses import topk_bytes_per_token


@dataclass(frozen=True)
class PrecomputeConfig:
    """The tool's own flags (everything else is pretrain_kd.py's)."""

    cache_dir: str  # --teacher-cache
    samples_per_shard: int = 256  # --cache-samples-per-shard
    microbatches_per_pass: int = 16  # --cache-microbatches-per-pass: per forward-only schedule


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


def build_manifest(config: KDRunConfig, tokenizer, train_dataset, num_samples: int,
                   samples_per_shard: int) -> CacheManifest:
    kd, data = config.kd, config.data
    return CacheManifest(
        k=kd.topk, dtype=kd.topk_dtype, temperature=kd.temperature, seq_length=data.seq_length,
        vocab_size=int(tokenizer.vocab_size), num_samples=num_samples,
        samples_per_shard=samples_per_shard, tokenizer=tokenizer_record(data, tokenizer),
        data=data_record(config, train_dataset, num_samples),
        teacher=teacher_record(config.checkpoint.teacher_load),
    )


def _start_or_resume(cache_dir: str, manifest: CacheManifest) -> List[int]:
    """Rank 0: write (or check) the manifest; the shards already finished."""
    os.makedirs(os.path.join(cache_dir, SHARD_DIRNAME), exist_ok=True)
    path = os.path.join(cache_dir, "manifest.json")
    if os.path.isfile(path):
        check_same_manifest(CacheManifest.read(cache_dir), manifest, cache_dir)
    write_json_atomic(path, manifest.to_dict())
    return finished_shards(cache_dir, manifest)


def _broadcast(value):
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def precompute(config: KDRunConfig, options: PrecomputeConfig, runtime,
               log: Callable[[str], None] = print) -> PrecomputeSummary:
    """Collective over all ranks of the initialised process groups: write the cache."""
    from megatron.core import parallel_state

    from megakd.data import build_gpt_datasets, build_tokenizer, iteration_microbatches
    from megakd.distill import TeacherRunner
    from megakd.models import build_teacher
    from megakd.models.metadata import check_run_tokenizer
    from megakd.training.checkpointing import load_model_weights
    from megakd.training.setup import validation_samples

    train, data, rank = config.training, config.data, torch.distributed.get_rank()
    tokenizer = build_tokenizer(data)
    check_run_tokenizer(tokenizer, {"--teacher-load": config.checkpoint.teacher_load},
                        "--tokenizer-model")
    valid_vocab = tokenizer.vocab_size
    padded_vocab = data.padded_vocab_size or pad_vocab_size(
        valid_vocab, data.make_vocab_size_divisible_by, config.parallel.tensor_model_parallel_size)
    num_samples = train.train_iters * train.global_batch_size
    train_dataset, _, _ = build_gpt_datasets(
        data, tokenizer, [num_samples, validation_samples(config), 0], train.seed)
    if len(train_dataset) < num_samples:
        raise ConfigError(f"the train split holds {len(train_dataset)} samples, fewer than "
                          f"--train-iters x --global-batch-size = {num_samples}")
    manifest = build_manifest(config, tokenizer, train_dataset, num_samples,
                              options.samples_per_shard)
    done = _broadcast(_start_or_resume(options.cache_dir, manifest) if rank == 0 else None)

    teacher = build_teacher(config.teacher, config.parallel, padded_vocab,
                            data.max_position_embeddings, bf16=train.bf16, device=runtime.device,
                            attention_backend=config.runtime.attention_backend)
    load_model_weights(teacher, config.checkpoint.teacher_load)
    runner = TeacherRunner(teacher, config.kd, valid_vocab, data.seq_length,
                           train.micro_batch_size)

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    is_writer = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                 and parallel_state.get_tensor_model_parallel_rank() == 0)
    finished = set(done)
    remaining = [shard for shard in range(manifest.num_shards) if shard not in finished]
    mine = remaining[dp_rank::dp_size]  # shards dealt round-robin to the DP ranks
    progress = _Progress(len(mine), dp_size, log) if is_writer and dp_rank == 0 else None
    writer_info = {"tensor_model_parallel_size": config.parallel.tensor_model_parallel_size,
                   "pipeline_model_parallel_size": config.parallel.pipeline_model_parallel_size,
                   "micro_batch_size": train.micro_batch_size}
    tokens_written, start = 0, time.perf_counter()  # throughput of the teacher passes + writes
    mbs, per_pass = train.micro_batch_size, options.microbatches_per_pass
    for shard in mine:
        samples = manifest.shard_samples(shard)
        writer = ShardWriter(options.cache_dir, shard, samples.start, writer_info) \
            if is_writer else None
        for first in range(samples.start, samples.stop, per_pass * mbs):
            count = min(per_pass * mbs, samples.stop - first)
            microbatches = iteration_microbatches(train_dataset, first, count, mbs, 0, 1,
                                                  runtime.device)
            outputs = runner.run(microbatches)
            if writer is not None:
                for batch, topk in zip(microbatches, outputs):
                    writer.append(manifest.layout.encode(topk, batch.tokens), len(batch.tokens))
        if writer is not None:
            writer.commit()
            tokens_written += len(samples) * data.seq_length
            if progress is not None:
                progress.shard_done(shard, len(samples) * data.seq_length)

    totals = torch.tensor([tokens_written, len(mine) if is_writer else 0], dtype=torch.float64)
    torch.distributed.all_reduce(totals)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        write_index(options.cache_dir, manifest)
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


def format_summary(summary: PrecomputeSummary, manifest_k: int, dtype: str) -> str:
    return (f"precompute: {summary.shards_written} shards written, {summary.shards_skipped} "
            f"already finished, of {summary.num_shards} | {summary.tokens_written} tokens in "
            f"{summary.seconds:.1f} s = {summary.tokens_per_second:.1f} tokens/s\n"
            f"precompute: bytes/token on disk {summary.bytes_per_token:.2f} (k={manifest_k}, "
            f"{dtype}; record {summary.record_bytes} bytes) | raw k*(value bytes + 4) + 4 = "
            f"{summary.raw_bytes_per_token} | target k*(1 + ceil(log2 V)/8) + 4 = "
            f"{summary.target_bytes_per_token:.2f}")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _tool_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="precompute_teacher_topk.py", allow_abbrev=False,
        description="Write the teacher's top-k for a run's train samples to a cache directory. "
                    "Takes every flag of pretrain_kd.py (give the student run's command line "
                    "with --teacher-load; the layout and --micro-batch-size may differ) plus:")
    parser.add_argument("--teacher-cache", required=True, metavar="DIR",
                        help="cache directory to write (resumed if it holds a partial cache)")
    parser.add_argument("--cache-samples-per-shard", type=int, default=256,
                        help="samples per shard file (a multiple of --micro-batch-size)")
    parser.add_argument("--cache-microbatches-per-pass", type=int, default=16,
                        help="microbatches per forward-only pipeline pass")
    return parser


def parse_precompute_args(argv: Optional[Sequence[str]] = None,
                          world_size: Optional[int] = None
                          ) -> Tuple[KDRunConfig, PrecomputeConfig]:
    """The tool's flags and pretrain_kd.py's, validated (ConfigError naming the flag)."""
    ns, rest = _tool_parser().parse_known_args(argv)
    config = parse_args(rest, world_size=world_size)
    options = PrecomputeConfig(ns.teacher_cache, ns.cache_samples_per_shard,
                               ns.cache_microbatches_per_pass)
    errors = []
    if config.kd.topk is None:
        errors.append("--kd-topk is required: the cache holds the teacher's top-k")
    if config.checkpoint.teacher_load is None:
        errors.append("--teacher-load is required: the teacher whose top-k is cached")
    mbs = config.training.micro_batch_size
    if options.samples_per_shard <= 0 or options.samples_per_shard % mbs:
        errors.append(f"--cache-samples-per-shard={options.samples_per_shard} must be a positive "
                      f"multiple of --micro-batch-size ({mbs})")
    if options.microbatches_per_pass <= 0:
        errors.append("--cache-microbatches-per-pass must be positive")
    if errors:
        raise ConfigError("; ".join(errors))
    return config, options


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megakd.runtime import destroy, initialize

    try:
        config, options = parse_precompute_args(argv)
    except ConfigError as error:
        print(f"precompute_teacher_topk.py: error: {error}", file=sys.stderr)
        return 2
    par = config.parallel
    runtime = initialize(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_size(config.teacher.num_layers),
        device=config.runtime.device, seed=config.training.seed,
        timeout_minutes=config.runtime.distributed_timeout_minutes,
    )
    log = (lambda line: print(line, flush=True))
    try:
        summary = precompute(config, options, runtime, log=log)
        if torch.distributed.get_rank() == 0:
            log(format_summary(summary, config.kd.topk, config.kd.topk_dtype))
    finally:
        destroy()
    return 0
