"""Run a tool as a real multi-rank job of separate processes (torchrun's environment, no
torchrun), for tests that check what each rank prints and its exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from megakd.runtime.launcher import free_local_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> List[str]:
        """stderr lines that are not third-party warnings."""
        return [line for line in self.stderr.splitlines()
                if line.strip() and "Warning" not in line and "warnings.warn" not in line]


def start(script: str, argv: Sequence[str], world_size: int,
          env: Optional[Dict[str, str]] = None) -> List[subprocess.Popen]:
    """Start ``world_size`` processes of ``script`` (a path under the repo) with ``argv``,
    each with torchrun's environment; returns them running."""
    port = str(free_local_port())
    procs = []
    for rank in range(world_size):
        rank_env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size),
                        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                        PYTHONWARNINGS="ignore", **(env or {}))
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=rank_env, cwd=ROOT))
    return procs


def collect(procs: Sequence[subprocess.Popen], timeout: float = 300) -> List[RankResult]:
    """Wait for every process; their exit status and output."""
    results = []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise AssertionError(f"rank {rank} still running after {timeout} s")
        results.append(RankResult(rank, proc.returncode, out, err))
    return results


def launch(script: str, argv: Sequence[str], world_size: int, timeout: float = 300,
           env: Optional[Dict[str, str]] = None) -> List[RankResult]:
    """Run ``world_size`` processes of ``script`` to completion."""
    return collect(start(script, argv, world_size, env), timeout)
