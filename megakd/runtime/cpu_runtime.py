"""Run megatron-core on CPU over gloo.

megatron-core targets CUDA, but its tensor-parallel layers, pipeline schedules, DDP, optimizer
and ``dist_checkpointing`` work on CPU once a handful of CUDA-only calls are redirected. This
module is the only place in megakd that knows about it (see DESIGN.md, "Running without a GPU").
It is switched on by :func:`megakd.runtime.initialize` only when CUDA is absent or ``--device cpu``
is given, and it redirects:

1. ``torch.cuda.current_device()`` (used in ~175 places to place tensors) returns the CPU device,
   and the few CUDA helpers megatron calls for bookkeeping (synchronize, streams, memory stats)
   become no-ops. ``torch.cuda.Event`` is a wall-clock event whose ``elapsed_time`` is real
   milliseconds (megatron-core's static inference loop times every decode step with it).
2. A ``TorchFunctionMode`` rewrites ``device="cuda"`` arguments to CPU, turns ``Tensor.cuda()``
   into a no-op, and reports CPU float tensors as their CUDA type names (megatron's gradient
   clipping asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``).
3. The model-parallel RNG tracker's CUDA RNG state helpers use the CPU generator.
4. megatron-core's inference communication (``inference/communication_utils``: the logits
   broadcast from the last pipeline stage) asserts ``tensor.is_cuda``; it accepts CPU tensors.
5. Without Transformer Engine, megatron-core's MoE router reads ``moe_utils.te_general_gemm``,
   a name only defined when TE imports (a NameError); :func:`allow_moe_without_te` defines it as
   None, which selects the router's own ``torch.mm`` path. Also needed on a GPU without TE, so
   :func:`megakd.runtime.initialize` calls it whatever the device.

6. megatron-core's ``alltoall`` MoE token dispatcher copies its split sizes (tokens sent to
   and received from each EP rank) to the host as NumPy arrays, but only when they are CUDA
   tensors; on CPU they stay tensors, which ``all_to_all_single`` refuses as split sizes. The
   dispatcher's copy helper converts CPU tensors too (:func:`_splits_to_host`).

gloo itself carries every collective megatron-core's ``allgather`` and ``alltoall`` token
dispatchers use (``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``all_to_all_single``
with uneven splits), so expert parallelism runs on CPU (``tests/test_moe.py``, EP = 2).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_active_mode: "_CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch function call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: work on CPU is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args: Any) -> "_WallClockEvent":
        event = _WallClockEvent()
        event.record()
        return event


class _WallClockEvent:
    """Stands in for ``torch.cuda.Event``: ``record`` notes the wall-clock time (work on CPU
    is already done when the call returns), ``elapsed_time`` is in milliseconds as CUDA's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._recorded_at: "float | None" = None

    def record(self, *args: Any) -> None:
        self._recorded_at = time.perf_counter()

    def wait(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: "_WallClockEvent") -> float:
        if self._recorded_at is None or end_event._recorded_at is None:
            raise RuntimeError("both events must be recorded before elapsed_time")
        return (end_event._recorded_at - self._recorded_at) * 1000.0


def _cpu_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    clone = kwargs.get("clone", False)
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_cpu_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _seed_cpu_generator(seed: int) -> None:
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
    torch.default_generator.manual_seed(int(seed))


def _tensor_present(tensor: Any) -> None:
    assert tensor is not None


def _allow_cpu_inference_communication() -> None:
    """megatron-core's inference p2p/broadcast helpers assert ``tensor.is_cuda`` (through
    ``_is_cuda``, looked up at call time); keep only their not-None check."""
    from megatron.core.inference import communication_utils

    communication_utils._is_cuda = _tensor_present


def allow_moe_without_te() -> None:
    """Give megatron-core's MoE router the ``te_general_gemm = None`` it tests for when
    Transformer Engine is absent (the name is otherwise undefined). Idempotent; a no-op when
    TE imported."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _splits_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """CPU twin of megatron-core's ``moe_utils.maybe_move_tensor_to_cpu``: the tensor itself,
    or its NumPy array when ``as_numpy`` (the alltoall split sizes)."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _allow_cpu_moe_alltoall() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _splits_to_host


def enable() -> None:
    """Switch megatron-core to CPU execution for the rest of this process. Idempotent."""
    global _active_mode
    if _active_mode is not None:
        return
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _WallClockEvent
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.manual_seed = _seed_cpu_generator
    cuda.manual_seed_all = _seed_cpu_generator
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    # The tracker warns when the CPU generator moves inside a "GPU" RNG fork; here the forked
    # generator *is* the CPU generator, so that is expected.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )

    _allow_cpu_inference_communication()
    allow_moe_without_te()
    _allow_cpu_moe_alltoall()

    # Warnings that only concern CUDA execution, or deprecations inside megatron-core's
    # checkpoint code that users cannot act on.
    for message in ("When using async grad allreduce", "Please use DTensor instead",
                    "`load_state_dict` is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{message}.*")

    _active_mode = _CudaToCpuMode()
    _active_mode.__enter__()
