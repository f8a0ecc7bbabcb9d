"""Write the pruned checkpoint: read the source's global tensors piece by piece, slice them
(:mod:`megakd.prune.slicing`), save them under the same keys with the pruned shapes.

The source checkpoint stores layout-free global tensors (megatron-core ``dist_checkpointing``
keys; decoder-layer tensors stacked over layers), so the writer never needs the layout the
model was loaded at: the model tensors are cut into pieces (one decoder layer of one key, or
one whole non-layer tensor), each piece is assigned to one rank (largest first, to the rank
with the fewest bytes so far), every rank reads its pieces in one collective
``dist_checkpointing.load``, slices them, and all ranks save the pruned pieces in one
collective save, pruned layer ``j`` (source layer ``plan.layers[j]``) at offset ``j`` of the
stacked tensors. Peak memory per rank is about its share of the kept source tensors
(``1/world`` of the model, plus the largest single piece). The result loads at any TP/PP/VPP.
Optimizer, RNG and other non-model entries of a training checkpoint are not copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megakd.configs import ConfigError
from megakd.formats.checkpoints import CheckpointError, save_staged
from megakd.prune.plan import PruningPlan
from megakd.prune.slicing import (
    LAYER_PREFIX,
    MODEL_PREFIXES,
    UnknownTensorError,
    prune_tensor,
    rule_for,
)


@dataclass(frozen=True)
class Piece:
    """One unit of reading and writing: a non-layer tensor, or one layer of a stacked one."""

    key: str
    is_tensor: bool
    shape: Tuple[int, ...]  # the piece's shape in the source (without the layer axis)
    dtype: Optional[torch.dtype]
    source_layer: Optional[int] = None  # None: not a decoder-layer entry
    target_layer: Optional[int] = None

    @property
    def bytes(self) -> int:
        if not self.is_tensor:
            return 1
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def model_entries(checkpoint_dir: str, flag: str) -> Dict[str, object]:
    """The checkpoint's model entries, ``key -> ShardedTensor | ShardedObject`` metadata (global
    shapes and dtypes; an object listed once per key). Refuses keys the pruning rules do not
    know and decoder layers that are not stacked."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    entries: Dict[str, object] = {}
    for entry in load_sharded_metadata(checkpoint_dir).values():
        if not entry.key.startswith(MODEL_PREFIXES):
            continue  # optimizer, RNG, ... of a training checkpoint
        if isinstance(entry, ShardedObject):
            stacked = entry.key.startswith(LAYER_PREFIX) and len(entry.global_shape) == 1
            if not stacked and math.prod(entry.global_shape) != 1:
                raise ConfigError(f"{flag} {checkpoint_dir}: object {entry.key} is sharded "
                                  f"{tuple(entry.global_shape)}; tools/prune.py cannot prune it")
            entries.setdefault(entry.key, entry)
            continue
        try:
            rule_for(entry.key)
        except UnknownTensorError:
            raise ConfigError(f"{flag} {checkpoint_dir}: tensor {entry.key} cannot be pruned "
                              "(tools/prune.py prunes dense GPT layers)") from None
        entries[entry.key] = entry
    return entries


def plan_pieces(entries: Dict[str, object], plan: PruningPlan, source_layers: int
                ) -> List[Piece]:
    """Every piece of the pruned model: each kept layer of each decoder-layer key, and each
    other key whole."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pieces = []
    for key, entry in sorted(entries.items()):
        is_tensor = not isinstance(entry, ShardedObject)
        shape = tuple(entry.global_shape)
        dtype = entry.dtype if is_tensor else None
        if not key.startswith(LAYER_PREFIX):
            pieces.append(Piece(key, is_tensor, shape, dtype))
            continue
        if shape[0] != source_layers:
            raise ConfigError(f"{key} stacks {shape[0]} layers, megakd_model.json says "
                              f"{source_layers}")
        for target, source in enumerate(plan.layers):
            pieces.append(Piece(key, is_tensor, shape[1:], dtype, source, target))
    return pieces


def assign(pieces: List[Piece], world_size: int) -> List[int]:
    """The rank reading and writing each piece: largest first, to the least-loaded rank."""
    load = [0] * world_size
    owners = [0] * len(pieces)
    for index in sorted(range(len(pieces)), key=lambda i: (-pieces[i].bytes, i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += pieces[index].bytes
    return owners


def _sharded(piece: Piece, data, layers: int, layer: Optional[int]):
    """The ShardedTensor / ShardedObject of ``piece`` holding ``data`` at ``layer`` of a
    ``layers``-long stacked key (or the whole key when ``layer`` is None)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    if piece.is_tensor:
        offsets = () if layer is None else ((0, layer, layers),)
        return ShardedTensor.from_rank_offsets(piece.key, data, *offsets, replica_id=0,
                                               prepend_axis_num=0 if layer is None else 1)
    if layer is None:  # a whole non-layer object (one shard: see model_entries)
        return ShardedObject(piece.key, data, piece.shape, (0,) * len(piece.shape), replica_id=0)
    return ShardedObject(piece.key, data, (layers,), (layer,), replica_id=0)


def read_pieces(pieces: List[Piece], checkpoint_dir: str, source_layers: int,
                flag: str) -> List:
    """Collective: the source data of ``pieces`` (this rank's), in order."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    request = {}
    for index, piece in enumerate(pieces):
        if piece.is_tensor:
            data = torch.empty(piece.shape, dtype=piece.dtype)
            request[str(index)] = _sharded(piece, data, source_layers, piece.source_layer)
        else:
            request[str(index)] = _sharded(piece, None, source_layers, piece.source_layer)
    try:  # the dropped layers are never read: no check that every shard is
        loaded = dist_checkpointing.load(request, checkpoint_dir, validate_access_integrity=False)
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"{flag} {checkpoint_dir}: cannot read the checkpoint "
                              f"({type(error).__name__}: {str(error).strip()[:200]})") from error
    return [loaded[str(index)] for index in range(len(pieces))]


def _dropped_tensors(pieces: List[Piece], plan: PruningPlan, source_layers: int,
                     world_size: int) -> List[Piece]:
    """Alone (world size 1), a rank must read every layer of a stacked tensor (megatron-core
    0.16's torch_dist loader places the layers nobody reads on "the next rank", which is
    itself): the dropped layers are read too, and discarded."""
    if world_size > 1:
        return []
    dropped = sorted(set(range(source_layers)) - set(plan.layers))
    keys = {(p.key, p.shape, p.dtype) for p in pieces if p.is_tensor and p.source_layer is not None}
    return [Piece(key, True, shape, dtype, layer) for key, shape, dtype in sorted(keys)
            for layer in dropped]


def write_pruned_checkpoint(source_dir: str, plan: PruningPlan, source_layers: int,
                            directory: str, metadata: dict, flag: str = "--load",
                            before_commit: Optional[Callable[[], None]] = None) -> int:
    """Collective over all ranks: write the pruned model to ``directory`` (atomically, with
    ``metadata`` as ``megakd_model.json``). Returns the bytes this rank read."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    pieces = plan_pieces(model_entries(source_dir, flag), plan, source_layers)
    owners = assign(pieces, world)
    mine = [piece for piece, owner in zip(pieces, owners) if owner == rank]
    data = read_pieces(mine + _dropped_tensors(pieces, plan, source_layers, world),
                       source_dir, source_layers, flag)
    layers = len(plan.layers)
    state = {}
    for index, (piece, value) in enumerate(zip(mine, data)):
        if piece.is_tensor:
            value = prune_tensor(piece.key, value, plan, piece.source_layer)
        state[str(index)] = _sharded(piece, value, layers, piece.target_layer)
    save_staged(state, directory, metadata, before_commit=before_commit)
    return sum(piece.bytes for piece in mine)
