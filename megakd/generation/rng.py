"""Generation never moves the training RNG streams; sampling has seeds of its own.

:func:`preserved_rng_states` snapshots every stream training draws from (Python's ``random``,
NumPy's global state, torch's CPU generator, the CUDA generators once CUDA is initialised,
and megatron's model-parallel RNG tracker, whose per-TP-rank streams drive TP-sharded
dropout) and restores them afterwards, so a training step after generation is bitwise the
step it would have been without it. :func:`sampling_seed` derives the seed of one
generation call from the run's seed, the iteration and the data-parallel rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch


def sampling_seed(run_seed: int, iteration: int, data_parallel_rank: int) -> int:
    """A 63-bit seed for one generation call: the same on every TP/PP rank of a model
    replica, different between DP ranks and iterations (a hash, not a sum, so neighbouring
    runs and ranks do not share streams)."""
    key = f"megakd-generation:{int(run_seed)}:{int(iteration)}:{int(data_parallel_rank)}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _tracker():
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


def _copy_state(state: Any) -> Any:
    """A tracker state: a generator-state tensor, or a (graph-safe) ``torch.Generator``."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, torch.Generator):
        return state, state.get_state()
    return state


def _restored(saved: Any) -> Any:
    """The tracker state to set back from a :func:`_copy_state` copy (which stays intact)."""
    if isinstance(saved, torch.Tensor):
        return saved.clone()
    if isinstance(saved, tuple) and isinstance(saved[0], torch.Generator):
        generator, state = saved
        generator.set_state(state)
        return generator
    return saved


@dataclass
class RngStates:
    """Copies of every training RNG stream's state."""

    python: tuple
    numpy: tuple
    torch_cpu: torch.Tensor
    cuda: Optional[List[torch.Tensor]]
    tracker: Dict[str, Any]

    @classmethod
    def capture(cls) -> "RngStates":
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = torch.cuda.get_rng_state_all()
        return cls(python=random.getstate(), numpy=np.random.get_state(),
                   torch_cpu=torch.get_rng_state(), cuda=cuda,
                   tracker={name: _copy_state(state)
                            for name, state in _tracker().get_states().items()})

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        if self.tracker:
            _tracker().set_states({name: _restored(saved)
                                   for name, saved in self.tracker.items()})


@contextlib.contextmanager
def preserved_rng_states() -> Iterator[RngStates]:
    """Every training RNG stream is as it was on entry when the block exits."""
    states = RngStates.capture()
    try:
        yield states
    finally:
        states.restore()
