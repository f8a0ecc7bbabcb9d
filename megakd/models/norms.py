"""PyTorch LayerNorm/RMSNorm for megatron-core's local layer spec, sequence parallelism included.

megatron-core's local spec normalises with apex's FusedLayerNorm when apex is installed and
with ``WrappedTorchNorm`` otherwise, and the latter refuses ``sequence_parallel``. Nothing in a
norm needs communication under sequence parallelism: each TP rank normalises its own
``[s/tp, b, h]`` slice with replicated weights, and the weights' gradients, partial sums over the
rank's slice, are summed over the TP group by megatron-core's ``finalize_model_grads`` for every
parameter marked ``sequence_parallel``. :class:`TorchNorm` is ``WrappedTorchNorm`` plus that mark.
"""

from __future__ import annotations

import torch


class TorchNorm:
    """Builds ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` over the last (hidden) dimension,
    with the spec signature megatron-core's ``build_module`` calls norms with."""

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise NotImplementedError("zero-centered gamma needs Transformer Engine or apex")
        kind = config.normalization
        if kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise NotImplementedError(f"normalization {kind!r}: megakd's local spec has "
                                      "LayerNorm and RMSNorm")
        for param in norm.parameters():
            # finalize_model_grads sums these gradients over TP when sequence_parallel is on.
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm
