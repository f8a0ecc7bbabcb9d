"""Launch a function on N real processes (gloo on CPU) and collect each rank's result.

Each worker gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so
megakd's own launcher discovery runs exactly as under torchrun.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import time
import traceback
from typing import Any, Callable, List

from megakd.runtime.launcher import free_local_port


def _worker(fn: Callable, rank: int, world_size: int, port: int, queue, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import warnings

    warnings.filterwarnings("ignore")
    try:
        queue.put((rank, "ok", fn(rank, *args)))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(world_size: int, fn: Callable, *args: Any, timeout: float = 900) -> List[Any]:
    """Run ``fn(rank, *args)`` on ``world_size`` processes; returns results ordered by rank.

    Raises AssertionError with the worker's traceback if any rank fails.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_local_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, queue, args))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, payload = queue.get(timeout=2.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:  # killed or crashed before it could report (e.g. a bad import)
                    errors.append(f"ranks {dead} exited with {[procs[r].exitcode for r in dead]} "
                                  "without reporting")
                elif time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout} s")
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")  # the others may be stuck in a collective
    finally:
        for proc in procs:
            proc.join(timeout=5 if errors else timeout)
            if proc.is_alive():
                proc.kill()
    assert not errors, "\n".join(errors)
    return [results[r] for r in range(world_size)]
