#!/usr/bin/env python
"""KD loss microbenchmark: forward+backward time and peak memory per rank (CPU, gloo).

Methods, all on the same inputs (student/teacher logits ``[tokens, 1, V/tp]``, fp32, T = 1;
``[s, b, V/tp]`` with b = 1, the layout ModelOpt's losses expect; megakd's take any leading dims):

* ``megakd dense fkl``        ``vocab_parallel_divergence(..., make_divergence("fkl"))``
* ``megakd top-k fkl bf16``   ``teacher_topk(k, bfloat16)`` + ``topk_divergence(..., fkl)``
* ``megakd top-k fkl fp8``    same with ``float8_e4m3fn`` values
* ``plain PyTorch fkl``       ``log_softmax`` x2 + ``kl_div`` + ``sum`` (TP = 1 only; it is not
                              vocab-parallel)
* ``ModelOpt LogitsKLLoss`` / ``ModelOpt TopKLogitsKLLoss`` from
  ``modelopt.torch.distill.plugins.megatron`` when importable (its own code, unmodified; at
  TP > 1 it needs megatron's parallel_state, which is initialised over gloo here)

Memory (per rank, rank 0 shown): ``torch.profiler`` with ``profile_memory=True`` records every
allocation and free of PyTorch's CPU allocator with a running total; "peak extra" is the peak
of that total during forward+backward above its value before the call (inputs excluded; the
gradient w.r.t. the student logits, which every method produces, included), "held fwd->bwd" is
the total when backward starts (saved tensors + output). Both also in units of one fp32
``[tokens, V/tp]`` shard. Time: best of ``--repeats`` forward+backward runs after the profiled
warm-up, ``--threads`` torch threads per rank (default 1: on a small shared machine OpenMP
spin-waits under contention make multi-threaded timings of small ops erratic).

Usage: python tools/bench_kd_loss.py [--tokens 4096] [--vocab 32000] [--small 512 8192]
       [--tp 1 2] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import types
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megakd.runtime.launcher import free_local_port  # noqa: E402
from megakd.runtime.machine import cpu_model  # noqa: E402
from megakd.losses import (  # noqa: E402
    make_divergence,
    teacher_topk,
    topk_bytes_per_token,
    topk_divergence,
    vocab_parallel_divergence,
)

TOPK = 64


# ----------------------------------------------------------------------------------- memory
def _profile_memory(fn: Callable, s: torch.Tensor, t: torch.Tensor) -> dict:
    """One forward+backward under torch.profiler(profile_memory=True).

    The profiler's ``[memory]`` events carry the running total of bytes allocated through
    PyTorch's CPU allocator (every tensor, in every op, forward and backward). Returns the peak
    of that total above its value at the start ("peak extra") and its value when backward
    starts ("held fwd->bwd": saved tensors + output).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = fn(s, t)
        with record_function("kd_backward"):
            loss.sum().backward()
        del loss
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        events = json.loads(Path(trace).read_text())["traceEvents"]
    s.grad = None
    mem = sorted((e for e in events
                  if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
                 key=lambda e: e["ts"])
    bwd = min(e["ts"] for e in events if e.get("name") == "kd_backward")
    if not mem:
        return {"peak_b": 0, "held_b": 0}
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    totals = [e["args"]["Total Allocated"] - base for e in mem]
    before_bwd = [tot for e, tot in zip(mem, totals) if e["ts"] < bwd]
    return {"peak_b": max(totals), "held_b": before_bwd[-1] if before_bwd else 0}


# ----------------------------------------------------------------------------------- methods
def _modelopt_losses(tp: int):
    """(LogitsKLLoss, TopKLogitsKLLoss) instances, or the reason they cannot run."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from modelopt.torch.distill.plugins.megatron import LogitsKLLoss, TopKLogitsKLLoss
        if tp > 1:
            from megatron.core import parallel_state

            if not parallel_state.model_parallel_is_initialized():
                parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        config = types.SimpleNamespace(tensor_model_parallel_size=tp)  # the only field read
        return LogitsKLLoss(config), TopKLogitsKLLoss(config, top_k=TOPK)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return f"{type(exc).__name__}: {exc}"


def _methods(tp: int, group) -> Dict[str, Optional[Callable]]:
    fkl = make_divergence("fkl")

    def megakd_dense(s, t):
        return vocab_parallel_divergence(s, t, fkl, tp_group=group)

    def megakd_topk(dtype):
        def run(s, t):
            tk = teacher_topk(t, TOPK, tp_group=group, dtype=dtype)
            return topk_divergence(s, tk, fkl, tp_group=group)
        return run

    def plain(s, t):
        ls = F.log_softmax(s.float(), dim=-1)
        lt = F.log_softmax(t.float(), dim=-1)
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)

    methods: Dict[str, Optional[Callable]] = {
        "megakd dense fkl": megakd_dense,
        "megakd top-k fkl bf16": megakd_topk(torch.bfloat16),
        "megakd top-k fkl fp8": megakd_topk(torch.float8_e4m3fn),
    }
    if tp == 1:
        methods["plain PyTorch fkl"] = plain
    mo = _modelopt_losses(tp)
    if isinstance(mo, str):
        methods["ModelOpt LogitsKLLoss"] = None
        methods["ModelOpt TopKLogitsKLLoss"] = None
        methods["_modelopt_error"] = mo  # type: ignore[assignment]
    else:
        kl, topk = mo
        methods["ModelOpt LogitsKLLoss"] = lambda s, t: kl(s, t)[0]
        methods["ModelOpt TopKLogitsKLLoss"] = lambda s, t: topk(s, t)[0]
    return methods


def _measure(fn: Callable, s: torch.Tensor, t: torch.Tensor, repeats: int) -> dict:
    result = _profile_memory(fn, s, t)  # also the warm-up
    times: List[float] = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        loss = fn(s, t)
        loss.sum().backward()
        times.append(time.perf_counter() - t0)
        del loss
        s.grad = None
    result["time_s"] = min(times)
    return result


def _worker(rank: int, tp: int, port: int, tokens: int, vocab: int, repeats: int, threads: int,
            out: str) -> None:
    torch.set_num_threads(threads)
    group = None
    if tp > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=tp, timeout=timedelta(minutes=10))
        group = dist.group.WORLD
    gen = torch.Generator().manual_seed(1234 + rank)
    # [s, b, V/tp] with b = 1 (ModelOpt's losses transpose s and b)
    student = (torch.randn(tokens, 1, vocab, generator=gen) * 2).requires_grad_(True)
    teacher = torch.randn(tokens, 1, vocab, generator=gen) * 2 + 0.5 * student.detach()
    results = {}
    methods = _methods(tp, group)
    error = methods.pop("_modelopt_error", None)
    for name, fn in methods.items():
        if fn is None:
            results[name] = {"error": error}
            continue
        results[name] = _measure(fn, student, teacher, repeats)
        if tp > 1:
            dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    if tp > 1:
        dist.destroy_process_group()


def run_config(tokens: int, vocab: int, tp: int, repeats: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        args = (tp, free_local_port(), tokens, vocab, repeats, threads, out)
        mp.start_processes(_worker, args=args, nprocs=tp, join=True, start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000, help="vocab entries per rank")
    parser.add_argument("--small", type=int, nargs=2, default=(512, 8192),
                        metavar=("TOKENS", "VOCAB"), help="the small shape")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per rank (1: stable timings on a shared machine)")
    args = parser.parse_args()

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"python {platform.python_version()}, {args.threads} thread(s) per rank")
    print("top-k bytes/token (k={}): bf16 {}, fp8 {}  (dense fp32 logits row: {} per rank)".format(
        TOPK, topk_bytes_per_token(TOPK, torch.bfloat16),
        topk_bytes_per_token(TOPK, torch.float8_e4m3fn), 4 * args.vocab))
    header = ("| tokens x V/tp | TP | method | fwd+bwd ms | peak extra MiB (shards) "
              "| held fwd->bwd MiB (shards) | time vs plain | time vs ModelOpt "
              "| mem vs ModelOpt |")
    print(header)
    print("|" + "---|" * 9)
    for tokens, vocab in ((args.tokens, args.vocab), tuple(args.small)):
        shard_mib = tokens * vocab * 4 / 2**20
        for tp in args.tp:
            res = run_config(tokens, vocab, tp, args.repeats, args.threads)
            plain = res.get("plain PyTorch fkl", {})
            for name, r in res.items():
                if "error" in r:
                    print(f"| {tokens} x {vocab} | {tp} | {name} | could not run: {r['error']} |")
                    continue
                ref_mo = res.get("ModelOpt TopKLogitsKLLoss" if "top-k" in name
                                 else "ModelOpt LogitsKLLoss", {})
                peak, held = r["peak_b"] / 2**20, r["held_b"] / 2**20

                def ratio(a: float, ref: dict, key: str) -> str:
                    return f"{a / ref[key]:.2f}x" if ref.get(key) else "-"

                print(f"| {tokens} x {vocab} | {tp} | {name} | {1000 * r['time_s']:.0f} "
                      f"| {peak:.0f} ({peak / shard_mib:.2f}) "
                      f"| {held:.0f} ({held / shard_mib:.2f}) "
                      f"| {ratio(r['time_s'], plain, 'time_s')} "
                      f"| {ratio(r['time_s'], ref_mo, 'time_s')} "
                      f"| {ratio(r['peak_b'], ref_mo, 'peak_b')} |", flush=True)


if __name__ == "__main__":
    main()
