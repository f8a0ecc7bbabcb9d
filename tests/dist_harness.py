"""The one multi-rank harness of the test suite: launch N real processes (gloo on CPU) once,
run a list of :class:`Task` s in each, and collect every rank's results.

Each worker gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so
megakd's own launcher discovery runs exactly as under torchrun. A task is a module-level
function ``fn(rank, *args)`` (spawned processes import it by name); tasks run in order in the
same processes, so a world size is started once per test module. :func:`init_layout` (re)builds
megatron's parallel groups for a config inside the running process group.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.distributed.distributed_c10d as c10d

from megakd.runtime.launcher import free_local_port


@dataclass(frozen=True)
class Task:
    """``fn(rank, *args)`` run on every rank; its result is reported under ``label``."""

    label: str
    fn: Callable
    args: tuple = ()


def _run_tasks(rank: int, tasks: Sequence[Task]) -> Dict[str, Any]:
    return {task.label: task.fn(rank, *task.args) for task in tasks}


def _worker(rank: int, world_size: int, port: int, queue, tasks: Sequence[Task]) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import warnings

    warnings.filterwarnings("ignore")
    try:
        queue.put((rank, "ok", _run_tasks(rank, tasks)))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, "error", traceback.format_exc()))


def run_tasks(world_size: int, tasks: Sequence[Task], timeout: float = 900
              ) -> List[Dict[str, Any]]:
    """Run ``tasks`` in order on ``world_size`` processes; per rank ``{label: result}``.

    Raises AssertionError with the worker's traceback if any rank fails.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_local_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, queue, list(tasks)))
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


def run_distributed(world_size: int, fn: Callable, *args: Any, timeout: float = 900) -> List[Any]:
    """One task: ``fn(rank, *args)`` on ``world_size`` processes; its result per rank."""
    per_rank = run_tasks(world_size, [Task("result", fn, args)], timeout=timeout)
    return [results["result"] for results in per_rank]


def init_layout(config):
    """(Re)build megatron's parallel groups for ``config``'s layout (TP, PP, VPP of the
    student, or of the teacher in teacher-only configs) inside the running process group."""
    from megatron.core import parallel_state

    from megakd.runtime import initialize_for

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # megatron drops its references to the old groups but c10d keeps them, each gloo group with
    # its own threads: a worker that rebuilds layouts many times would pile up thousands.
    for group in list(c10d._world.pg_map):
        if group is not c10d.GroupMember.WORLD:
            torch.distributed.destroy_process_group(group)
    model = getattr(config, "student", None) or config.teacher
    seed = config.training.seed if hasattr(config, "training") else 1234
    return initialize_for(config.parallel, config.runtime, seed, model.num_layers)
