#!/usr/bin/env python
"""Peak memory and step time against the teacher window (``--kd-teacher-window W``).

Dense KD with a vocabulary large enough for the teacher's logits to dominate memory: vocab
32000 (mock data), seq 256, micro-batch 2, 16 microbatches per iteration, student 2 layers
hidden 128, teacher 2 layers hidden 256, float32 on CPU (gloo). One fresh launch per
(PP, W), so each peak is that run's own: every rank reports its peak resident set size
(``ru_maxrss``, the whole process: Python, torch, both models, activations, teacher outputs)
and its mean step time after the first iteration. The table shows the last pipeline stage
(it holds the teacher outputs) and the held teacher output ``W x b x s x V/tp x 4 B``.

    python tools/bench_window.py [--iters 4] [--pp 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")

from megakd.runtime.launcher import free_local_port  # noqa: E402
from megakd.runtime.machine import cpu_model  # noqa: E402

VOCAB, SEQ, MBS, MICROBATCHES = 32000, 256, 2, 16


def _flags(pp: int, window: int, iters: int):
    return ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4",
            "--teacher-num-layers", "2", "--teacher-hidden-size", "256",
            "--pipeline-model-parallel-size", str(pp),
            "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
            "--disable-bias-linear", "--seq-length", str(SEQ), "--micro-batch-size", str(MBS),
            "--global-batch-size", str(MBS * MICROBATCHES), "--train-iters", str(iters),
            "--lr", "1e-4", "--mock-data", "--vocab-size", str(VOCAB), "--kd-loss", "fkl",
            "--kd-loss-weight", "0.5", "--device", "cpu", "--kd-teacher-window", str(window)]


def _one(pp: int, window: int, iters: int) -> None:
    """One run on this rank (under torch.distributed.run); prints a JSON line per rank."""
    from megakd.preflight import parse_pretrain_args
    from megakd.runtime import running
    from megakd.training import TrainingHooks, setup, train

    steps = []
    config = parse_pretrain_args(_flags(pp, window, iters),
                                 world_size=int(os.environ["WORLD_SIZE"]))
    with running(config.parallel, config.runtime, config.training.seed,
                 config.student.num_layers) as runtime:
        state = setup(config, runtime, log=lambda line: None)
        train(state, log=lambda line: None,
              hooks=TrainingHooks(after_step=[lambda s, r: steps.append(r.elapsed_ms)]))
    print("RESULT " + json.dumps({
        "rank": int(os.environ["RANK"]),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_ms": statistics.mean(steps[1:]),
    }), flush=True)


def _launch(pp: int, window: int, iters: int) -> dict:
    """The last stage's result of one fresh launch."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(pp),
               "--master-port", str(free_local_port()), os.path.abspath(__file__),
               "--one", "--pp", str(pp), "--window", str(window), "--iters", str(iters)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // pp)))
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    results = [json.loads(line[len("RESULT "):]) for line in out.splitlines()
               if line.startswith("RESULT ")]
    return max(results, key=lambda r: r["rank"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--pp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--window", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        _one(args.pp[0], args.window, args.iters)
        return 0
    held_mib = MBS * SEQ * VOCAB * 4 / 2**20  # one microbatch's logits, float32, TP = 1
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores, CPU (gloo); dense KD, vocab {VOCAB}, "
          f"seq {SEQ}, micro-batch {MBS}, {MICROBATCHES} microbatches per iteration, "
          f"{args.iters} iterations (first excluded from step time)")
    print("| PP | W | held teacher logits MiB | peak RSS MiB (last stage) | step ms | "
          "step vs W = all |")
    print("|---|---|---|---|---|---|")
    for pp in args.pp:
        baseline = None
        for window in (MICROBATCHES, MICROBATCHES // 2, MICROBATCHES // 4, 1):
            result = _launch(pp, window, args.iters)
            baseline = baseline or result["step_ms"]
            label = "all (16)" if window == MICROBATCHES else str(window)
            print(f"| {pp} | {label} | {window * held_mib:.0f} | {result['peak_mib']:.0f} | "
                  f"{result['step_ms']:.0f} | {result['step_ms'] / baseline:.2f}x |", flush=True)
    print(f"\nCommand: python tools/bench_window.py --iters {args.iters} --pp "
          f"{' '.join(map(str, args.pp))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
