"""Activation statistics of calibration forwards, gathered on whatever layout the model runs at.

Forward hooks on this rank's transformer layers accumulate, over every calibration sample,
the statistics Minitron's importance is computed from (each per-forward value in fp32, the
running sums in fp64):

- hidden channels: for the output of each layer's input norm and pre-MLP norm ``[s, b, h]``,
  ``sum over samples of (mean over the sequence of |x|)^2`` -> ``[2, h]``;
- attention heads: the same for the input of ``linear_proj`` ``[s, b, H/tp * d]`` (the
  attention output of this rank's heads, before the output projection) -> ``[H/tp * d]``;
- MLP neurons: the same for the input of ``linear_fc2`` ``[s, b, F/tp]`` -> ``[F/tp]``;
- the layer itself: ``sum over tokens of 1 - cos(x_in, x_out)`` and the token count.

:func:`gather_statistics` turns the per-rank sums into every layer's global sums on every
rank: an all-gather over TP of the head and neuron shards, an all-reduce over DP (the
calibration batches are split over data-parallel replicas) and an all-gather over PP (each
stage holds its own layers). Sizes are ``(2h + H*d + F + 2)`` fp64 values per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F


@dataclass
class LayerStatistics:
    """Sums over calibration samples for one transformer layer (fp64, on the layer's device
    while collected, on the CPU once gathered)."""

    hidden_sq: torch.Tensor  # [2, h]: input-norm and pre-MLP-norm outputs
    head_sq: torch.Tensor  # [H*d] (this rank's [H/tp*d] until gathered)
    ffn_sq: torch.Tensor  # [F] (this rank's [F/tp] until gathered)
    cosine_distance: torch.Tensor  # []: sum over tokens of 1 - cos(layer input, layer output)
    tokens: int = 0


def squared_mean_magnitude(x: torch.Tensor) -> torch.Tensor:
    """``[c]``: sum over the batch of ``(mean over the sequence of |x|)^2`` for ``x``
    ``[s, b, c]`` (computed in fp32, returned in fp64)."""
    return x.detach().float().abs().mean(dim=0).pow(2).sum(dim=0).double()


class StatisticsCollector:
    """Forward hooks on the transformer layers of ``chunks`` (this rank's model chunks, any
    TP/PP layout, megatron-core's local spec) that accumulate :class:`LayerStatistics` per
    layer, keyed by the layer's 0-based global index. Call :meth:`remove` when done."""

    def __init__(self, chunks: List[torch.nn.Module]) -> None:
        self.layers: Dict[int, LayerStatistics] = {}
        self._handles = []
        for chunk in chunks:
            for layer in _unwrap(chunk).decoder.layers:
                self._watch(layer)

    def _watch(self, layer: torch.nn.Module) -> None:
        attention, mlp = layer.self_attention, layer.mlp
        device = next(layer.parameters()).device

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        self.layers[layer.layer_number - 1] = stats = LayerStatistics(
            hidden_sq=zeros(2, layer.config.hidden_size),
            head_sq=zeros(attention.linear_proj.input_size_per_partition),
            ffn_sq=zeros(mlp.linear_fc2.input_size_per_partition), cosine_distance=zeros())

        def norm_hook(site: int):
            def hook(module, inputs, output):
                stats.hidden_sq[site] += squared_mean_magnitude(output)
            return hook

        def input_hook(total: torch.Tensor):
            def hook(module, args):
                total.add_(squared_mean_magnitude(args[0]))
            return hook

        def layer_hook(module, args, kwargs, output):
            x_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            x_out = output[0] if isinstance(output, tuple) else output
            distance = 1.0 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # [s, b]
            stats.cosine_distance += distance.double().sum()
            stats.tokens += distance.numel()

        self._handles += [
            layer.input_layernorm.register_forward_hook(norm_hook(0)),
            layer.pre_mlp_layernorm.register_forward_hook(norm_hook(1)),
            attention.linear_proj.register_forward_pre_hook(input_hook(stats.head_sq)),
            mlp.linear_fc2.register_forward_pre_hook(input_hook(stats.ffn_sq)),
            layer.register_forward_hook(layer_hook, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _tp_gather(shard: torch.Tensor) -> torch.Tensor:
    """This rank's channel shard ``[c/tp]`` -> the global ``[c]`` (TP ranks hold consecutive
    blocks of heads and of MLP neurons)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(size)]
    torch.distributed.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts)


def _flatten(stats: LayerStatistics) -> torch.Tensor:
    tail = torch.stack([stats.cosine_distance,
                        torch.tensor(float(stats.tokens), dtype=torch.float64,
                                     device=stats.cosine_distance.device)])
    return torch.cat([stats.hidden_sq.flatten(), stats.head_sq, stats.ffn_sq, tail])


def _unflatten(flat: torch.Tensor, like: LayerStatistics) -> LayerStatistics:
    sizes = [like.hidden_sq.numel(), like.head_sq.numel(), like.ffn_sq.numel(), 2]
    hidden, heads, ffn, tail = (part.cpu() for part in torch.split(flat, sizes))
    return LayerStatistics(hidden.view(like.hidden_sq.shape).clone(), heads.clone(), ffn.clone(),
                           tail[0].clone(), int(round(float(tail[1]))))


def gather_statistics(local: Dict[int, LayerStatistics], device: torch.device
                      ) -> Dict[int, LayerStatistics]:
    """Collective over all ranks: every layer's statistics, summed over all calibration
    samples, on every rank, on the CPU (see the module doc for what is communicated)."""
    from megatron.core import parallel_state

    order = sorted(local)
    gathered = {i: LayerStatistics(local[i].hidden_sq.to(device),
                                   _tp_gather(local[i].head_sq.to(device)),
                                   _tp_gather(local[i].ffn_sq.to(device)),
                                   local[i].cosine_distance.to(device), local[i].tokens)
                for i in order}
    if order:  # every stage holds at least one layer
        flats = [_flatten(gathered[i]) for i in order]
        flat = torch.cat(flats)
        torch.distributed.all_reduce(flat, group=parallel_state.get_data_parallel_group())
        gathered = {i: _unflatten(part, gathered[i])
                    for i, part in zip(order, torch.split(flat, [f.numel() for f in flats]))}
    stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(stages, gathered,
                                        group=parallel_state.get_pipeline_model_parallel_group())
    return {index: stats for stage in stages for index, stats in stage.items()}
