"""Megatron-style checkpoint roots and the weights inside them.

Layout (as Megatron-LM): a checkpoint *root* holds ``latest_checkpointed_iteration.txt`` (an
iteration number, or ``release`` for converted weights) and one directory per checkpoint,
``iter_0000100`` or ``release``. Each such directory is one megatron-core ``dist_checkpointing``
checkpoint (sharded tensor keys are global, so it loads at any TP/PP/VPP layout) and carries
``megakd_model.json`` (:mod:`megakd.formats.model_metadata`).

Every write goes to a staging directory (``<name>.tmp``) renamed into place only once complete,
and the tracker is replaced atomically after that rename, so a crash at any point leaves the
previous checkpoint as the one that loads. A root with no tracker (empty, or holding only
staging directories of an interrupted first save) holds no checkpoint yet.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException

from megakd.configs import ConfigError
from megakd.formats.fsutil import fsync_dir, write_text_atomic
from megakd.formats.model_metadata import MODEL_METADATA_FILENAME

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
RELEASE = "release"
DIST_METADATA_FILENAME = "metadata.json"  # written by dist_checkpointing.save
STAGING_SUFFIX = ".tmp"
_MODEL_PREFIX = "model"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read; the message names the flag and the path."""


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
    write_text_atomic(os.path.join(root, TRACKER_FILENAME),
                      RELEASE if iteration is None else str(iteration))
    fsync_dir(root)


def is_checkpoint_dir(path: str) -> bool:
    """A complete dist_checkpointing directory (its ``metadata.json`` is written last)."""
    return os.path.isfile(os.path.join(path, DIST_METADATA_FILENAME))


def holds_checkpoint(root: str) -> bool:
    """Whether ``root`` holds a checkpoint: a tracker, or is itself a checkpoint directory.
    An empty root, or one holding only staging directories, holds none yet."""
    return read_tracker(root) is not None or is_checkpoint_dir(root)


def remove_staging_dirs(root: str) -> List[str]:
    """Delete the staging directories interrupted saves left in ``root``; returns their paths."""
    stale = sorted(glob.glob(os.path.join(root, "iter_*" + STAGING_SUFFIX)))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def resolve_checkpoint_dir(path: str, flag: str = "--load") -> str:
    """The checkpoint directory a ``--load``-style flag names: the tracker's entry when ``path``
    is a root, or ``path`` itself when it is one checkpoint directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{flag} {path}: no such checkpoint directory")
    tracked = read_tracker(path)
    if tracked is not None:
        try:
            name = RELEASE if tracked == RELEASE else checkpoint_name(int(tracked))
        except ValueError:
            raise CheckpointError(f"{flag} {path}: {TRACKER_FILENAME} holds {tracked!r}, "
                                  "expected an iteration number or 'release'") from None
        resolved = os.path.join(path, name)
        if not os.path.isdir(resolved):
            raise CheckpointError(f"{flag} {path}: {TRACKER_FILENAME} names {tracked!r} but "
                                  f"{resolved} does not exist")
        return resolved
    if is_checkpoint_dir(path):
        return path
    raise CheckpointError(f"{flag} {path}: neither a checkpoint root (no {TRACKER_FILENAME}) "
                          f"nor a megatron distributed checkpoint (no {DIST_METADATA_FILENAME})")


# ----------------------------------------------------------------------------------------------
# Writing and reading dist_checkpointing directories
# ----------------------------------------------------------------------------------------------


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state(chunks: List[torch.nn.Module]) -> Dict[str, dict]:
    """``{"model": ...}`` or ``{"model0": ..., "model1": ...}`` (one entry per VPP chunk)."""
    if len(chunks) == 1:
        return {_MODEL_PREFIX: unwrap(chunks[0]).sharded_state_dict()}
    return {f"{_MODEL_PREFIX}{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def load_model_states(chunks: List[torch.nn.Module], loaded: dict, strict: bool = True) -> None:
    """Load each chunk's entry of a ``dist_checkpointing.load`` result into the chunk."""
    keys = [_MODEL_PREFIX] if len(chunks) == 1 else [f"{_MODEL_PREFIX}{i}"
                                                      for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        unwrap(chunk).load_state_dict(loaded[key], strict=strict)


def _commit(staging: str, directory: str) -> None:
    """Rename a complete ``staging`` directory to ``directory`` (rank 0). An existing
    ``directory`` is moved aside first and removed only after the new one is in place."""
    aside = None
    if os.path.exists(directory):
        aside = directory + ".old"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(directory, aside)
    os.replace(staging, directory)
    fsync_dir(os.path.dirname(os.path.abspath(directory)))
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def save_staged(sharded_state: dict, directory: str, model_metadata: Optional[dict],
                before_commit: Optional[Callable[[], None]] = None) -> None:
    """Collective: ``dist_checkpointing.save`` into ``directory.tmp``, add
    ``megakd_model.json``, then rename to ``directory``. Nothing appears under the final name
    until every rank has written its part. ``before_commit`` (rank 0, right before the rename)
    may raise to leave the staging directory uncommitted (e.g. the launcher is gone)."""
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    staging = directory.rstrip("/") + STAGING_SUFFIX
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded_state, staging)
    torch.distributed.barrier()
    if rank == 0:
        if model_metadata is not None:
            with open(os.path.join(staging, MODEL_METADATA_FILENAME), "w") as handle:
                json.dump(model_metadata, handle, indent=2, sort_keys=True)
        if before_commit is not None:
            before_commit()
        _commit(staging, directory)
    torch.distributed.barrier()


@contextlib.contextmanager
def _reading(directory: str, flag: str) -> Iterator[None]:
    """Report an unreadable checkpoint (truncated or missing shard files, a damaged common
    state) as a :class:`CheckpointError` naming ``flag`` and the directory."""
    try:
        yield
    except CheckpointError:
        raise
    # dist_checkpointing raises many kinds for damaged files; torch.distributed.checkpoint
    # gathers the ranks' failures into a CheckpointException, which is a BaseException.
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"{flag} {directory}: cannot read the checkpoint "
                              f"({_first_cause(error)})") from error


def _first_cause(error: BaseException) -> str:
    """``Type: message`` of the innermost failure (a rank's, for a CheckpointException)."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))
        if isinstance(error, tuple):  # (exception, traceback) in some torch versions
            error = error[0]
    text = str(error).strip()
    return f"{type(error).__name__}{': ' + text.splitlines()[0][:200] if text else ''}"


def load_sharded(request: dict, directory: str, flag: str) -> dict:
    """Collective ``dist_checkpointing.load`` of ``request`` from ``directory``."""
    from megatron.core import dist_checkpointing

    with _reading(directory, flag):
        return dist_checkpointing.load(request, directory)


def load_common(directory: str, flag: str) -> dict:
    """The checkpoint's common (rank-0) state: iteration, scheduler, layout, ..."""
    from megatron.core import dist_checkpointing

    with _reading(directory, flag):
        return dist_checkpointing.load_common_state_dict(directory)


def save_model_weights(chunks: List[torch.nn.Module], directory: str,
                       model_metadata: Optional[dict] = None) -> None:
    """Collective over all ranks: write the chunks' weights to ``directory`` atomically, with
    ``model_metadata`` as ``megakd_model.json`` when given."""
    save_staged(model_sharded_state(chunks), directory, model_metadata)


def load_model_weights(chunks: List[torch.nn.Module], path: str, flag: str = "--load",
                       strict: bool = True) -> str:
    """Collective: load weights saved at any layout. ``path`` is one checkpoint directory or a
    checkpoint root (its tracker picks the directory); returns the directory read."""
    directory = resolve_checkpoint_dir(path, flag)
    # The checkpoint's keys name the chunks of the layout it was saved at; with virtual
    # pipelining they differ, but sharded tensor keys are global, so load by flat key set.
    loaded = load_sharded(model_sharded_state(chunks), directory, flag)
    load_model_states(chunks, loaded, strict=strict)
    return directory
