"""Model weights as megatron-core distributed checkpoints (load at any TP/PP layout).

A directory written by :func:`save_model_weights` holds one ``dist_checkpointing`` checkpoint
of the model chunks' sharded state dict; :func:`load_model_weights` reads it into chunks built
at any tensor/pipeline/virtual-pipeline layout. The write goes to a temporary sibling directory
that is renamed into place only once complete, so a crash never leaves a half-written
checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import List, Optional

import torch

_MODEL_PREFIX = "model"

# Layout (as Megatron-LM): a checkpoint *root* holds ``latest_checkpointed_iteration.txt`` (an
# iteration number, or ``release`` for converted weights) and one directory per checkpoint,
# ``iter_0000100`` or ``release``. Each such directory is one dist_checkpointing checkpoint and
# carries ``megakd_model.json``: the model's architecture, so a loader needs no model flags.
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MODEL_METADATA_FILENAME = "megakd_model.json"
RELEASE = "release"


def checkpoint_name(iteration: Optional[int]) -> str:
    """``iter_0000100`` for a training checkpoint, ``release`` for converted weights (None)."""
    return RELEASE if iteration is None else f"iter_{iteration:07d}"


def read_tracker(root: str) -> Optional[str]:
    """The tracker's content (``"100"`` or ``"release"``), or None when there is no tracker."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return handle.read().strip()


def write_tracker(root: str, iteration: Optional[int]) -> None:
    """Atomically point the tracker at ``checkpoint_name(iteration)`` (rank 0 only)."""
    path = os.path.join(root, TRACKER_FILENAME)
    with open(path + ".tmp", "w") as handle:
        handle.write(RELEASE if iteration is None else str(iteration))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".tmp", path)


def resolve_checkpoint_dir(path: str, flag: str = "--load") -> str:
    """The checkpoint directory a ``--load``-style flag names: the tracker's entry when ``path``
    is a root, or ``path`` itself when it is one checkpoint directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: no such checkpoint directory")
    tracked = read_tracker(path)
    if tracked is not None:
        name = RELEASE if tracked == RELEASE else checkpoint_name(int(tracked))
        resolved = os.path.join(path, name)
        if not os.path.isdir(resolved):
            raise FileNotFoundError(f"{flag} {path}: {TRACKER_FILENAME} names {tracked!r} but "
                                    f"{resolved} does not exist")
        return resolved
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    raise FileNotFoundError(f"{flag} {path}: neither a checkpoint root (no {TRACKER_FILENAME}) "
                            "nor a megatron distributed checkpoint (no metadata.json)")


def read_model_metadata(checkpoint_dir: str) -> Optional[dict]:
    """The ``megakd_model.json`` stored with a checkpoint, or None for older checkpoints."""
    path = os.path.join(checkpoint_dir, MODEL_METADATA_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


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


def save_model_weights(chunks: List[torch.nn.Module], directory: str,
                       model_metadata: Optional[dict] = None) -> None:
    """Collective over all ranks: write the chunks' weights to ``directory`` atomically, with
    ``model_metadata`` (architecture) as ``megakd_model.json`` when given."""
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
        if model_metadata is not None:
            with open(os.path.join(staging, MODEL_METADATA_FILENAME), "w") as handle:
                json.dump(model_metadata, handle, indent=2, sort_keys=True)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)
    torch.distributed.barrier()


def load_model_weights(chunks: List[torch.nn.Module], directory: str, strict: bool = True) -> None:
    """Collective: load weights saved by :func:`save_model_weights` at any layout. ``directory``
    is one checkpoint directory or a checkpoint root (its tracker picks the directory)."""
    from megatron.core import dist_checkpointing

    directory = resolve_checkpoint_dir(directory)
    sharded = _sharded_state_dict(chunks)
    # The checkpoint's keys name the chunks of the layout it was saved at; with virtual
    # pipelining they differ, but sharded tensor keys are global, so load by flat key set.
    state = dist_checkpointing.load(sharded, directory)
    for chunk, chunk_state in zip(chunks, _chunk_keyed(state, chunks)):
        _unwrap(chunk).load_state_dict(chunk_state, strict=strict)
