"""Worker bodies for tests/test_teacher_cache.py (real gloo process groups via dist_harness).

A tiny teacher (4 layers, hidden 64) and student (2 layers, hidden 32) on megatron-core's mock
data, vocab 61 (60 + EOD), top-8 at T = 2. One world-4 launch writes caches at two layouts,
trains students online and from the caches, simulates a crash and checks refusals.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, List, Sequence

import torch

from megakd.configs import ConfigError, KDRunConfig
from megakd.preflight import parse_pretrain_args
from tests.dist_harness import init_layout

SEQ, GBS, ITERS, SAMPLES_PER_SHARD = 16, 8, 3, 4  # 24 samples -> 6 shards
TOPK = ("--kd-topk", "8", "--kd-topk-dtype", "bf16")


def base_argv(tp: int, pp: int, mbs: int, extra: Sequence[str] = ()) -> List[str]:
    return [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--teacher-num-layers", "4", "--teacher-hidden-size", "64",
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--seq-length", str(SEQ), "--micro-batch-size", str(mbs),
        "--global-batch-size", str(GBS), "--train-iters", str(ITERS), "--lr", "1e-2",
        "--lr-decay-style", "constant", "--weight-decay", "0.0", "--clip-grad", "0",
        "--seed", "7", "--mock-data", "--vocab-size", "60", "--make-vocab-size-divisible-by", "16",
        "--kd-loss", "fkl", "--kd-temperature", "2.0", "--kd-loss-weight", "0.5",
        "--device", "cpu", *TOPK, *extra,
    ]


def _config(tp: int, pp: int, mbs: int, extra: Sequence[str] = ()) -> KDRunConfig:
    return parse_pretrain_args(base_argv(tp, pp, mbs, extra),
                               world_size=int(os.environ["WORLD_SIZE"]))


def _train(config: KDRunConfig) -> List[Dict[str, float]]:
    from megakd.distill import CachedTeacher
    from megakd.training import setup
    from megakd.training.loop import train_step

    state = setup(config, init_layout(config))
    assert not config.checkpoint.teacher_cache or isinstance(state.teacher, CachedTeacher)
    return [train_step(state).losses for _ in range(ITERS)]


def _precompute(workdir: str, cache: str, tp: int, pp: int, mbs: int) -> dict:
    from megakd.distill.precompute import precompute
    from megakd.preflight import parse_precompute_args

    argv = ["--teacher-cache", cache, "--cache-samples-per-shard", str(SAMPLES_PER_SHARD),
            "--cache-microbatches-per-pass", "2",
            *base_argv(tp, pp, mbs, ["--teacher-load", f"{workdir}/init_teacher"])]
    config = parse_precompute_args(argv, world_size=int(os.environ["WORLD_SIZE"]))
    summary = precompute(config, init_layout(config).device, log=lambda line: None)
    return {"written": summary.shards_written, "skipped": summary.shards_skipped,
            "bytes_per_token": summary.bytes_per_token, "tokens": summary.tokens_written}


def _on_rank0(action) -> None:
    if torch.distributed.get_rank() == 0:
        action()
    torch.distributed.barrier()


def _simulate_crash(source: str, target: str) -> None:
    """The on-disk state a crash can leave: no index, finished shards, a sidecar whose .bin
    was never renamed (shard 3), a half-written .tmp (shard 4), a shard never started (5)."""
    shutil.copytree(source, target)
    shards = os.path.join(target, "shards")
    os.remove(os.path.join(target, "index.json"))
    os.remove(os.path.join(shards, "shard_000003.bin"))
    with open(os.path.join(shards, "shard_000004.bin"), "rb") as handle:
        half = handle.read()[:100]
    with open(os.path.join(shards, "shard_000004.bin.tmp"), "wb") as handle:
        handle.write(half)
    for name in ("shard_000004.bin", "shard_000004.json", "shard_000005.bin", "shard_000005.json"):
        os.remove(os.path.join(shards, name))


def _corrupt(source: str, target: str) -> None:
    shutil.copytree(source, target)
    path = os.path.join(target, "shards", "shard_000002.bin")
    with open(path, "r+b") as handle:
        handle.seek(40)
        byte = handle.read(1)
        handle.seek(40)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _refusal(config_fn) -> str:
    """Setup of a run that must be refused; the error message (every rank raises it)."""
    from megakd.training import setup

    try:
        config = config_fn()
        setup(config, init_layout(config))
    except (ConfigError, RuntimeError) as error:
        return str(error)
    return "not refused"


def world4_worker(rank: int, workdir: str) -> Dict[str, object]:
    from megakd.formats.checkpoints import save_model_weights
    from megakd.formats.model_metadata import model_metadata
    from megakd.training import setup

    init = _config(2, 2, 2)
    state = setup(init, init_layout(init))
    save_model_weights(state.student, f"{workdir}/init_student")
    # with its megakd_model.json: the precompute takes the teacher's architecture from it
    save_model_weights(state.teacher.chunks, f"{workdir}/init_teacher",
                       model_metadata(init.teacher, state.vocab.padded))
    del state
    load_student = ["--load", f"{workdir}/init_student"]
    online = ["--teacher-load", f"{workdir}/init_teacher", *load_student]
    cache_a, cache_b = f"{workdir}/cache_tp2pp2", f"{workdir}/cache_tp1dp4"
    cache_c, cache_d = f"{workdir}/cache_crashed", f"{workdir}/cache_corrupted"

    results: Dict[str, object] = {}
    results["online_tp2pp2"] = _train(_config(2, 2, 2, online))
    results["precompute_a"] = _precompute(workdir, cache_a, 2, 2, 2)
    results["cached_tp2pp2"] = _train(_config(2, 2, 2, ["--teacher-cache", cache_a, *load_student]))
    results["cached_tp2pp2_window1"] = _train(_config(
        2, 2, 2, ["--teacher-cache", cache_a, "--kd-teacher-window", "1", *load_student]))
    # Written at TP1 x DP4 (four writers in parallel, mbs 1), read at TP2 x PP2 (mbs 2).
    results["precompute_b"] = _precompute(workdir, cache_b, 1, 1, 1)
    results["cached_b_tp2pp2"] = _train(_config(2, 2, 2, ["--teacher-cache", cache_b, *load_student]))

    _on_rank0(lambda: _simulate_crash(cache_a, cache_c))
    results["precompute_c"] = _precompute(workdir, cache_c, 2, 2, 2)

    _on_rank0(lambda: _corrupt(cache_a, cache_d))
    results["refused_corrupt"] = _refusal(
        lambda: _config(2, 2, 2, ["--teacher-cache", cache_d, *load_student]))
    results["refused_seed"] = _refusal(
        lambda: _config(2, 2, 2, ["--teacher-cache", cache_a, "--seed", "8"]))
    results["caches"] = {"a": cache_a, "b": cache_b, "c": cache_c}
    return results
