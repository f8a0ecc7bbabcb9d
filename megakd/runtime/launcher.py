"""Who am I? Rank and world discovery for torchrun, SLURM ``srun`` and ``mpirun``.

The launcher's environment is read once into a :class:`LaunchInfo`; nothing else in megakd
reads ``RANK``/``SLURM_PROCID``/``OMPI_COMM_WORLD_RANK`` directly.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm", "mpi" or "single"


def first_host(nodelist: str) -> str:
    """First hostname of a SLURM node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _mpi_rank_world(env: Mapping[str, str]) -> Optional[tuple]:
    for rank_key, size_key, local_key, local_size_key in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
         "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ):
        if rank_key in env and size_key in env:
            return (int(env[rank_key]), int(env[size_key]), int(env.get(local_key, 0)),
                    int(env.get(local_size_key, 1)))
    try:  # mpi4py, when installed (`pip install megakd[mpi]`), knows even without env vars
        if env.get("MEGAKD_USE_MPI4PY") == "1":
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
            local = comm.Split_type(MPI.COMM_TYPE_SHARED)
            return comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size()
    except ImportError:
        pass
    return None


def discover(env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """Read rank, world size and rendezvous address from the launcher's environment.

    Precedence: torchrun (``RANK``/``WORLD_SIZE``), then SLURM (``SLURM_PROCID``/``SLURM_NTASKS``),
    then MPI (Open MPI / PMI variables, or mpi4py), else a single process.
    """
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port, launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_STEP_TASKS_PER_NODE", "1"))
        return LaunchInfo(
            rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=int(re.match(r"\d+", tasks_per_node).group(0)),
            master_addr=env.get("MASTER_ADDR", first_host(nodelist)), master_port=port,
            launcher="slurm",
        )
    mpi = _mpi_rank_world(env)
    if mpi is not None:
        rank, world, local_rank, local_world = mpi
        return LaunchInfo(rank, world, local_rank, local_world,
                          env.get("MASTER_ADDR", "127.0.0.1"), port, "mpi")
    return LaunchInfo(0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def discover_world_size(env: Optional[Mapping[str, str]] = None) -> int:
    return discover(env).world_size


def free_local_port() -> int:
    """A TCP port free on this host right now (for a rendezvous started in this process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_single_process_env(overwrite: bool = True) -> None:
    """torchrun's environment for a one-rank world in this process (tools that run without a
    launcher). With ``overwrite=False`` variables already set are kept."""
    values = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                  MASTER_ADDR="127.0.0.1")
    if overwrite or "MASTER_PORT" not in os.environ:
        values["MASTER_PORT"] = str(free_local_port())
    for name, value in values.items():
        if overwrite:
            os.environ[name] = value
        else:
            os.environ.setdefault(name, value)
