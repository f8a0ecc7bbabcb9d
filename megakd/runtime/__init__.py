"""Process groups, device and seeds for one megakd process.

:func:`initialize` is the single entry: it picks the device (CUDA/NCCL, or CPU/gloo through
:mod:`megakd.runtime.cpu_runtime`), starts ``torch.distributed`` from the launcher's environment,
builds megatron-core's TP/PP/VPP/DP/EP groups with ``parallel_state`` and seeds every RNG.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from megakd.configs import BAD_INPUT_STATUS, ConfigError, ParallelConfig, RuntimeConfig
from megakd.runtime import cpu_runtime, processes, watchdog
from megakd.runtime.launcher import LaunchInfo, discover

__all__ = ["RuntimeInfo", "destroy", "discover", "initialize", "initialize_for", "running",
           "set_seed"]


@dataclass(frozen=True)
class RuntimeInfo:
    launch: LaunchInfo
    device: torch.device
    backend: str


def _select_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu)")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch, then megatron's model-parallel RNG tracker (which gives
    each TP rank its own stream for TP-sharded dropout and weight init)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
    device: str = "auto",
    seed: int = 1234,
    timeout_minutes: int = 10,
) -> RuntimeInfo:
    """Start torch.distributed and megatron-core's parallel groups for this process
    (``expert_tensor_parallel_size`` None: the TP size, megatron's default)."""
    from megatron.core import parallel_state

    launch = discover()
    chosen = _select_device(device, launch.local_rank)
    if chosen.type == "cpu":
        cpu_runtime.enable()
        # Ranks sharing a host share its cores: avoid oversubscribing them.
        cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // max(1, launch.local_world_size)))
    cpu_runtime.allow_moe_without_te()  # MoE routers without Transformer Engine
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    watchdog.start(launch.rank, launch.world_size, launched=launch.launcher != "single",
                   collective_timeout_s=timeout_minutes * 60.0)
    processes.forked_children_die_with_rank()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
    )
    set_seed(seed)
    return RuntimeInfo(launch=launch, device=chosen, backend=backend)


def destroy() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    watchdog.stop()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def initialize_for(parallel: ParallelConfig, runtime: RuntimeConfig, seed: int,
                   num_layers: int) -> RuntimeInfo:
    """:func:`initialize` for a run's flags; ``num_layers`` of the model whose virtual pipeline
    stages set megatron's global VPP size (the student's, or the teacher's in teacher-only
    tools)."""
    return initialize(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_size(num_layers),
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        device=runtime.device, seed=seed, timeout_minutes=runtime.distributed_timeout_minutes)


@contextlib.contextmanager
def running(parallel: ParallelConfig, runtime: RuntimeConfig, seed: int,
            num_layers: int) -> Iterator[RuntimeInfo]:
    """Process groups for the block (:func:`initialize_for`), torn down after it. Bad input
    found inside the block (a ConfigError) is first posted to the other ranks, which may be
    waiting in a collective, so every rank ends with the same line; a collective that fails
    because a peer died becomes a :class:`~megakd.runtime.watchdog.PeerLostError` naming it."""
    info = initialize_for(parallel, runtime, seed, num_layers)
    try:
        yield info
    except ConfigError as error:
        watchdog.abort_peers(str(error), BAD_INPUT_STATUS)
        raise
    except RuntimeError as error:
        lost = watchdog.lost_peer_error(error)
        if lost is None:
            raise
        raise lost from error
    finally:
        destroy()
