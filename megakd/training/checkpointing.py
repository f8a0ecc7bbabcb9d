"""Model weights as megatron-core distributed checkpoints (load at any TP/PP layout).

A directory written by :func:`save_model_weights` holds one ``dist_checkpointing`` checkpoint
of the model chunks' sharded state dict; :func:`load_model_weights` reads it into chunks built
at any tensor/pipeline/virtual-pipeline layout. The write goes to a temporary sibling directory
that is renamed into place only once complete, so a crash never leaves a half-written
checkpoint under the final name.
"""

from __future__ import annotations

import os
import shutil
from typing import List

import torch

_MODEL_PREFIX = "model"


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _sharded_state_dict(chunks: List[torch.nn.Module]) -> dict:
    if len(chunks) == 1:
        return {_MODEL_PREFIX: _unwrap(chunks[0]).sharded_state_dict()}
    return {f"{_MODEL_PREFIX}{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _chunk_keyed(state: dict, chunks: List[torch.nn.Module]):
    if len(chunks) == 1:
        return [state[_MODEL_PREFIX]]
    return [state[f"{_MODEL_PREFIX}{i}"] for i in range(len(chunks))]


def save_model_weights(chunks: List[torch.nn.Module], directory: str) -> None:
    """Collective over all ranks: write the chunks' weights to ``directory`` atomically."""
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    staging = directory.rstrip("/") + ".tmp"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    torch.distributed.barrier()
    dist_checkpointing.save(_sharded_state_dict(chunks), staging)
    torch.distributed.barrier()
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)
    torch.distributed.barrier()


def load_model_weights(chunks: List[torch.nn.Module], directory: str, strict: bool = True) -> None:
    """Collective: load weights saved by :func:`save_model_weights` at any layout."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    sharded = _sharded_state_dict(chunks)
    # The checkpoint's keys name the chunks of the layout it was saved at; with virtual
    # pipelining they differ, but sharded tensor keys are global, so load by flat key set.
    state = dist_checkpointing.load(sharded, directory)
    for chunk, chunk_state in zip(chunks, _chunk_keyed(state, chunks)):
        _unwrap(chunk).load_state_dict(chunk_state, strict=strict)
