"""Offline teacher cache (megakd/cache, tools/precompute_teacher_topk.py).

One world-4 launch (module fixture) writes caches at TP2xPP2 and TP1xDP4, trains students
online and from the caches, reruns an interrupted precompute and checks that setup refuses a
corrupted shard and other data. The remaining checks run in this process on the written files.
"""

from __future__ import annotations

import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

from megakd.configs import ConfigError
from megakd.formats.cache import (
    CacheCorruptionError,
    CacheManifest,
    RecordLayout,
    TeacherCache,
    index_bits,
    pack_ids,
    unpack_ids,
)
from megakd.formats.cache.manifest import check_run_identity
from megakd.preflight import parse_pretrain_args as parse_args
from tests import cache_workers
from tests.dist_harness import run_distributed


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher_cache"))
    return run_distributed(4, cache_workers.world4_worker, workdir)


def _last_rank(world4):
    return world4[-1]  # the last rank sits on the last pipeline stage of every layout


# ------------------------------------------------------------------------------ format units


@pytest.mark.parametrize("vocab", [2, 3, 61, 1000, 32000, 50257, 128256, 151936, 2 ** 17, 2 ** 17 + 1])
def test_bitpack_round_trip(vocab):
    bits = index_bits(vocab)
    assert bits == math.ceil(math.log2(vocab))
    ids = np.random.default_rng(vocab).integers(0, vocab, size=4097)
    ids[:3] = [0, vocab - 1, vocab // 2]
    packed = pack_ids(ids, bits)
    assert packed.nbytes == math.ceil(ids.size * bits / 8)
    assert np.array_equal(unpack_ids(packed, ids.size, bits), ids)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_record_round_trip_is_bit_exact(dtype):
    from megakd.losses import teacher_topk

    layout = RecordLayout(seq_length=5, k=7, vocab_size=1001, dtype=dtype)
    logits = torch.randn(3, 5, 1001) * 4
    topk = teacher_topk(logits, 7, temperature=1.5, dtype=layout.value_dtype)
    tokens = torch.randint(0, 1001, (3, 5))
    blob = layout.encode(topk, tokens)
    assert len(blob) == 3 * layout.record_bytes
    size = layout.record_bytes
    decoded = layout.decode([blob[i * size:(i + 1) * size] for i in range(3)], 1.5).topk
    assert torch.equal(decoded.logprobs.view(torch.uint8), topk.logprobs.view(torch.uint8))
    assert torch.equal(decoded.indices, topk.indices)
    assert torch.equal(decoded.tail_logprob, topk.tail_logprob)
    assert decoded.temperature == topk.temperature


def test_bytes_per_token_meets_target():
    """fp8 at a production size: (k-1) values + packed ids + fp32 tail + 8/s fingerprint."""
    for k, vocab, seq in ((64, 128256, 4096), (32, 151936, 8192), (8, 61, 16)):
        layout = RecordLayout(seq_length=seq, k=k, vocab_size=vocab, dtype="fp8")
        target = k * (1 + math.ceil(math.log2(vocab)) / 8) + 4
        assert layout.bytes_per_token <= target, (k, vocab, layout.bytes_per_token, target)
    layout = RecordLayout(seq_length=4096, k=64, vocab_size=128256, dtype="fp8")
    # 63 fp8 values + 64 x 17 bits + fp32 tail + 8 / 4096: 203.002 (target 204, raw 5k + 4 = 324)
    assert round(layout.bytes_per_token, 3) == 203.002


# ------------------------------------------------------------------------------ end to end


def test_cached_losses_equal_online_losses_tp2pp2(world4):
    got = _last_rank(world4)
    online, cached = got["online_tp2pp2"], got["cached_tp2pp2"]
    assert len(online) == len(cached) == cache_workers.ITERS
    for step, (a, b) in enumerate(zip(online, cached)):
        assert a["kd loss"] > 0 and a["lm loss"] > 0
        assert a == b, f"step {step}: online {a} != cached {b}"


def test_cached_teacher_in_windows_is_bitwise_equal(world4):
    """--kd-teacher-window 1 with --teacher-cache: one microbatch's cached top-k read at a
    time, the same losses bit for bit."""
    got = _last_rank(world4)
    assert got["cached_tp2pp2_window1"] == got["cached_tp2pp2"]


def test_cache_written_at_one_layout_read_at_another(world4):
    """Cache written at TP1 x DP4 (mbs 1, four writers) read by a TP2 x PP2 student (mbs 2): the
    online TP2 x PP2 run's losses up to the teacher's cross-layout rounding."""
    got = _last_rank(world4)
    assert got["precompute_b"]["written"] == 6 and got["precompute_b"]["tokens"] == 24 * 16
    for a, b in zip(got["online_tp2pp2"], got["cached_b_tp2pp2"]):
        for name in ("lm loss", "kd loss"):
            assert math.isclose(a[name], b[name], rel_tol=2e-5, abs_tol=1e-6), (name, a, b)
    cache_a, cache_b = (TeacherCache(got["caches"][x]) for x in ("a", "b"))
    ids = list(range(24))
    topk_a, topk_b = cache_a.read(ids).topk, cache_b.read(ids).topk
    assert (topk_a.indices == topk_b.indices).float().mean() > 0.99
    assert torch.allclose(topk_a.tail_logprob, topk_b.tail_logprob, atol=1e-4)


def test_rerun_after_crash_gives_same_bytes(world4):
    got = _last_rank(world4)
    assert got["precompute_a"] == {"written": 6, "skipped": 0, "tokens": 24 * 16,
                                   "bytes_per_token": got["precompute_a"]["bytes_per_token"]}
    assert got["precompute_c"]["written"] == 3 and got["precompute_c"]["skipped"] == 3
    full, resumed = got["caches"]["a"], got["caches"]["c"]
    names = sorted(os.path.relpath(os.path.join(d, f), full)
                   for d, _, files in os.walk(full) for f in files)
    assert sorted(os.path.relpath(os.path.join(d, f), resumed)
                  for d, _, files in os.walk(resumed) for f in files) == names
    assert len(names) == 2 + 2 * 6  # manifest, index, 6 x (shard, sidecar)
    for name in names:
        with open(os.path.join(full, name), "rb") as a, open(os.path.join(resumed, name), "rb") as b:
            assert a.read() == b.read(), name


def test_bytes_on_disk(world4):
    got = _last_rank(world4)
    cache = TeacherCache(got["caches"]["a"])
    shard_bytes = sum(entry["bytes"] for entry in cache.index["shards"])
    per_token = shard_bytes / (24 * 16)
    # bf16, k = 8, V = 61 (6-bit ids), s = 16: 4 + 7 * 2 + 8 * 6 / 8 = 24 bytes/token, + 8 / 16
    # for the sample's fingerprint (raw TeacherTopK: 6k + 4 = 52)
    assert per_token == got["precompute_a"]["bytes_per_token"] == 24.5


def test_setup_refuses_corrupted_shard_and_other_data(world4):
    got = _last_rank(world4)
    assert "shard_000002.bin: checksum mismatch" in got["refused_corrupt"]
    assert "cache_corrupted" in got["refused_corrupt"]
    assert "manifest field 'data.flags.seed'" in got["refused_seed"]


def test_corrupted_shard_detected(world4, tmp_path):
    source = _last_rank(world4)["caches"]["a"]
    target = str(tmp_path / "cache")
    shutil.copytree(source, target)
    path = os.path.join(target, "shards", "shard_000005.bin")
    with open(path, "r+b") as handle:
        handle.seek(0, os.SEEK_END)
        handle.write(b"\0")
    with pytest.raises(CacheCorruptionError, match=f"{path}: .* bytes"):
        TeacherCache(target).verify(24)
    TeacherCache(target).verify(20)  # shards 0-4 only: intact


@pytest.mark.parametrize("flags, field", [
    (("--kd-topk", "4"), "'k'"),
    (("--kd-topk-dtype", "fp8"), "'dtype'"),
    (("--kd-temperature", "1.0"), "'temperature'"),
    (("--seq-length", "32"), "'seq_length'"),
    (("--vocab-size", "100"), "'vocab_size'"),
    (("--train-iters", "4"), "'num_samples'"),
    (("--teacher-load", "TEACHER"), "--teacher-cache and --teacher-load"),
    (("--eval-interval", "2"), "--eval-interval"),
])
def test_mismatched_manifest_refused(world4, flags, field):
    cache = _last_rank(world4)["caches"]["a"]
    teacher = os.path.join(os.path.dirname(cache), "init_teacher")
    flags = [teacher if flag == "TEACHER" else flag for flag in flags]
    argv = cache_workers.base_argv(2, 2, 2, ["--teacher-cache", cache, *flags])
    with pytest.raises(ConfigError, match=re.escape(field)) as error:
        parse_args(argv, world_size=4)
    assert "--teacher-cache" in str(error.value)


def test_identity_mismatch_names_field(world4):
    directory = _last_rank(world4)["caches"]["a"]
    manifest = CacheManifest.read(directory)
    data = dict(manifest.data)
    check_run_identity(manifest, directory, dict(manifest.tokenizer), data)  # itself: accepted
    with pytest.raises(ConfigError, match="'tokenizer.vocab_size'"):
        check_run_identity(manifest, directory, {**manifest.tokenizer, "vocab_size": 62}, data)
    with pytest.raises(ConfigError, match="'data.flags.split'"):
        check_run_identity(manifest, directory, dict(manifest.tokenizer),
                           {**data, "flags": {**data["flags"], "split": "1,0,0"}})
    with pytest.raises(ConfigError, match="'data.sha256'"):
        check_run_identity(manifest, directory, dict(manifest.tokenizer), {**data, "sha256": "0"})
