#!/usr/bin/env python
"""Kill a training job with SIGKILL at random times, relaunch it, and check that it ends
exactly where an uninterrupted run ends (bitwise equal final weights).

Each cycle starts the job (``--ranks`` processes of tools/pretrain_kd.py with torchrun's
environment, ``--load ROOT --save ROOT --save-interval 1``), kills every rank with SIGKILL after
1 to 3 of the launch's own iterations plus a random time within one iteration and save (in a
step or a save), and relaunches it, until ``--kills`` kills have happened; the last launch runs
to the end. An uninterrupted run of the same flags is the reference; the two final checkpoints'
student weights are compared tensor by tensor (both loaded at TP=1).

    python tools/chaos_kill.py --kills 10            # prints one line per cycle and the verdict
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megakd.runtime.launcher import free_local_port  # noqa: E402

TOOL = os.path.join(ROOT, "tools", "pretrain_kd.py")
FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--teacher-num-layers", "2", "--teacher-hidden-size", "48",
         "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--lr", "1e-3", "--lr-warmup-iters", "2", "--lr-decay-iters", "100", "--mock-data",
         "--vocab-size", "60",
         "--make-vocab-size-divisible-by", "16", "--kd-loss", "fkl", "--kd-loss-weight", "0.5",
         "--device", "cpu", "--log-interval", "1", "--seed", "5"]


def start_job(argv: Sequence[str], ranks: int, log_dir: str, tag: str) -> List[subprocess.Popen]:
    port = str(free_local_port())
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        out = open(os.path.join(log_dir, f"{tag}.rank{rank}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, TOOL, *argv], stdout=out,
                                      stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    return procs


def wait_job(procs: Sequence[subprocess.Popen], timeout: float = 600) -> List[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
    return codes


def kill_job(procs: Sequence[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def compare_roots(first: str, second: str) -> float:
    """max |difference| between the student weights of two checkpoint roots' latest
    checkpoints, loaded at TP=1 in a fresh process (inf when their shapes differ)."""
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from tools.chaos_kill import _compare_in_process\n"
            "print(_compare_in_process(%r, %r))\n") % (ROOT, first, second)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return float(out.stdout.strip().splitlines()[-1])


def _compare_in_process(first: str, second: str) -> float:
    from megakd.configs import ParallelConfig, RuntimeConfig
    from megakd.formats.checkpoints import load_model_weights, resolve_checkpoint_dir
    from megakd.formats.model_metadata import arch_from_metadata, read_model_metadata
    from megakd.models import build_gpt_chunks
    from megakd.runtime import running
    from megakd.runtime.launcher import set_single_process_env

    set_single_process_env()
    with running(ParallelConfig(), RuntimeConfig(device="cpu"), seed=1, num_layers=1):
        weights = []
        for root in (first, second):
            metadata = read_model_metadata(resolve_checkpoint_dir(root))
            arch, padded, _ = arch_from_metadata(metadata)
            seq_length = int(FLAGS[FLAGS.index("--seq-length") + 1])
            (model,) = build_gpt_chunks(arch, ParallelConfig(), padded, seq_length,
                                        attention_backend="unfused")
            load_model_weights([model], root)
            weights.append(dict(model.state_dict()))
        worst = 0.0
        for name, tensor in weights[0].items():
            other = weights[1][name]
            if not hasattr(tensor, "shape"):
                continue
            if tensor.shape != other.shape:
                return float("inf")
            worst = max(worst, (tensor.float() - other.float()).abs().max().item())
        return worst


def _iterations_logged(log_dir: str, tag: str) -> int:
    """Iterations rank 0 of launch ``tag`` has logged so far (0: still starting up)."""
    try:
        with open(os.path.join(log_dir, f"{tag}.rank0.log")) as handle:
            return handle.read().count(" iteration ")
    except OSError:
        return 0


def _wait_for_iterations(log_dir: str, tag: str, count: int,
                         procs: Sequence[subprocess.Popen]) -> None:
    while _iterations_logged(log_dir, tag) < count and all(p.poll() is None for p in procs):
        time.sleep(0.05)


def run_chaos(kills: int, iters: int, ranks: int, workdir: str, seed: int = 0,
              max_delay: float = 0.5, log=print) -> dict:
    """``kills`` SIGKILLs of the whole job with relaunches; then the comparison with an
    uninterrupted run. Each kill lands after a random number (0 to 2) of the launch's own
    iterations and a random time within one iteration plus one save (measured on the
    reference run, at least ``max_delay`` s), so kills fall in steps and in saves and the
    job makes progress between them whatever the machine's speed."""
    rng = random.Random(seed)
    chaos, reference = os.path.join(workdir, "chaos"), os.path.join(workdir, "reference")
    argv = [*FLAGS, "--train-iters", str(iters), "--save-interval", "1"]
    started = time.monotonic()
    codes = wait_job(start_job([*argv, "--save", reference], ranks, workdir, "reference"))
    if any(codes):
        raise RuntimeError(f"the reference run failed: {codes} (logs in {workdir})")
    # an upper bound of one iteration plus its save (the reference's startup included)
    window = max(max_delay, (time.monotonic() - started) / iters)
    launches, killed, done = 0, 0, False
    for _ in range(kills):
        tag = f"launch{launches}"
        procs = start_job([*argv, "--load", chaos, "--save", chaos], ranks, workdir, tag)
        launches += 1
        after = rng.randint(1, 3)  # iterations of this launch before the random delay
        _wait_for_iterations(workdir, tag, after, procs)
        delay = rng.uniform(0.0, window)
        deadline = time.monotonic() + delay
        try:
            codes = [proc.wait(timeout=max(0.01, deadline - time.monotonic())) for proc in procs]
            done = not any(codes)
            log(f"chaos: launch {launches}: ended before its kill ({codes})")
            if done:
                break
        except subprocess.TimeoutExpired:
            kill_job(procs)
            killed += 1
            log(f"chaos: launch {launches}: SIGKILL {delay:.2f} s after its iteration {after} "
                f"(tracker: {_tracker(chaos)})")
    if not done:
        codes = wait_job(start_job([*argv, "--load", chaos, "--save", chaos], ranks, workdir,
                                   f"launch{launches}"))
        launches += 1
        if any(codes):
            raise RuntimeError(f"the last launch failed: {codes} (logs in {workdir})")
    difference = compare_roots(chaos, reference)
    orphans = _survivors(chaos)
    log(f"chaos: {launches} launches, {killed} killed, final tracker {_tracker(chaos)} vs reference "
        f"{_tracker(reference)}; max |weight difference| = {difference}; "
        f"processes of killed launches still alive: {len(orphans)}")
    return {"launches": launches, "kills": killed, "difference": difference, "orphans": orphans, "tracker": _tracker(chaos),
            "reference_tracker": _tracker(reference)}


def _survivors(root: str) -> List[int]:
    """Pids of processes (a rank's forked helpers) whose command line names ``root``."""
    time.sleep(2.0)  # a helper's parent-death signal is asynchronous
    return [proc.pid for proc in psutil.process_iter(["cmdline"])
            if proc.pid != os.getpid() and root in " ".join(proc.info["cmdline"] or [])]


def _tracker(root: str) -> Optional[str]:
    from megakd.formats.checkpoints import read_tracker

    return read_tracker(root) if os.path.isdir(root) else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=0.5,
                        help="the random delay before a kill is drawn from [0, D] seconds, D "
                             "this or the reference run's time per iteration, the larger")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="megakd_chaos_")
    os.makedirs(workdir, exist_ok=True)
    result = run_chaos(args.kills, args.iters, args.ranks, workdir, args.seed, args.max_delay)
    ok = result["difference"] == 0.0 and result["tracker"] == result["reference_tracker"]
    print(f"chaos: {'bitwise equal' if ok else 'DIFFERENT'}")
    if result["orphans"]:
        print(f"chaos: processes left alive by killed launches: {result['orphans']}")
        ok = False
    if ok and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
