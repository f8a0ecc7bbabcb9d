"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

Without Transformer Engine, megatron-core's local layer spec computes attention with
:class:`megatron.core.transformer.dot_product_attention.DotProductAttention`: ``baddbmm`` into a
``[b·np, sq, sk]`` score buffer, a masked softmax, dropout and ``bmm``. Those score tensors
dominate time and memory at long sequences. :class:`SDPADotProductAttention` has the same
constructor and forward signature, so it drops into the spec's ``core_attention`` slot, and lets
PyTorch pick a fused kernel (FlashAttention / memory-efficient / cuDNN on GPU, flash or math on
CPU) that never materialises the scores.

Semantics follow ``DotProductAttention`` (the reference in ``tests/test_attention.py``):

* softmax scale: ``softmax_scale`` if given (megatron passes ``config.softmax_scale``), else
  ``1/sqrt(kv_channels)``. ``config.apply_query_key_layer_scaling`` divides megatron's scores by
  the layer number and multiplies them back inside the fp32 softmax, an fp16-overflow guard that
  leaves the probabilities unchanged; SDPA kernels accumulate in fp32, so it is not needed here.
* masks: an explicit ``attention_mask`` (boolean, ``True`` = masked out, broadcastable to
  ``[b, np, sq, sk]``, usually ``[b, 1, sq, sk]``, e.g. block-diagonal causal for packed
  documents) is applied as given, for every mask type, as megatron's unfused softmax does: it
  replaces the causal mask, so masks built for packed sequences must include causality.
  Without a mask, ``causal``-type attention is causal (bottom-right aligned when ``sq != sk``),
  ``padding``/``arbitrary``/``no_mask`` attend to every key; ``no_mask`` ignores any mask.
* dropout: ``config.attention_dropout`` (or the constructor's override) in training mode only,
  drawn from megatron's model-parallel RNG tracker as megatron does, so each TP rank (which
  holds different heads) uses its own stream.

One documented difference: a query row whose keys are *all* masked gets megatron's uniform
average of the values there (it fills masked scores with -10000), and zeros here (PyTorch's
softmax over an empty set). Such rows are padding, excluded from the loss.

Not supported (they raise ``NotImplementedError`` with the reason): ``packed_seq_params`` (THD
packing, a Transformer Engine feature), ``attention_bias``, context parallelism, sliding-window
attention and non-``vanilla`` ``softmax_type``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

__all__ = ["SDPADotProductAttention"]

_CAUSAL_MASK_TYPES = (
    AttnMaskType.causal,
    AttnMaskType.causal_bottom_right,
    AttnMaskType.padding_causal,
)

# ``enable_gqa`` (keys/values shared by groups of query heads, without copying them) arrived in
# PyTorch 2.5; megakd supports torch >= 2.4, where k/v are expanded instead.
_SDPA_HAS_ENABLE_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


class SDPADotProductAttention(MegatronModule):
    """Causal or masked multi-head / grouped-query attention with PyTorch's SDPA.

    A drop-in for megatron-core's ``DotProductAttention`` in a ``SelfAttention`` submodule spec.
    Heads are sharded over tensor parallelism: each TP rank holds
    ``num_attention_heads / tp`` query heads and ``num_query_groups / tp`` key/value groups
    (megatron's ``Attention`` replicates k/v when there are fewer groups than TP ranks), and
    attention itself needs no communication. The module has no parameters or buffers, so
    checkpoints are interchangeable with ``DotProductAttention``'s.

    Args:
        config: the model's ``TransformerConfig`` (``kv_channels``, head counts,
            ``attention_dropout``, ``sequence_parallel``, ...).
        layer_number: 1-based layer index (megatron's; only used to reject sliding-window layers).
        attn_mask_type: default mask type (the local GPT spec passes ``AttnMaskType.causal``).
        attention_type: ``"self"`` or ``"cross"`` (unused, as in megatron).
        attention_dropout: dropout probability overriding ``config.attention_dropout``.
        softmax_scale: scale of ``q·k``; ``None`` gives ``1/sqrt(kv_channels)``.
        cp_comm_type: context-parallel communication type (context parallelism is unsupported).
        pg_collection: process groups; only ``tp`` is used (default: megatron's global groups).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        super().__init__(config=config)
        self.config: TransformerConfig = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        if config.context_parallel_size != 1:
            raise NotImplementedError(
                "SDPADotProductAttention does not support context parallelism; "
                "use Transformer Engine (--attention-backend auto on a GPU with TE)")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(
                f"SDPADotProductAttention supports softmax_type='vanilla' only, got "
                f"{config.softmax_type!r}; use --attention-backend unfused")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     layer_number):
            raise NotImplementedError(
                "SDPADotProductAttention does not implement sliding-window attention; "
                "use --attention-backend unfused")

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp_size = self.tp_group.size()

        # Per-rank (TP-sharded) sizes, as DotProductAttention computes them.
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)

        self.softmax_scale = (
            1.0 / math.sqrt(self.hidden_size_per_attention_head)
            if softmax_scale is None else softmax_scale
        )
        self.dropout_p = float(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """Attention of this rank's heads.

        Args:
            query: ``[sq, b, np, hn]``, ``np`` = query heads on this TP rank.
            key: ``[sk, b, ng, hn]``, ``ng`` = key/value groups on this TP rank (``np % ng == 0``).
            value: ``[sk, b, ng, hv]``.
            attention_mask: ``None``, or boolean with ``True`` = masked out, broadcastable to
                ``[b, np, sq, sk]`` (megatron's ``[b, 1, sq, sk]``).
            attn_mask_type: overrides the constructor's mask type for this call.
            attention_bias: unsupported (must be ``None``).
            packed_seq_params: unsupported (must be ``None``).

        Returns:
            ``[sq, b, np·hv]``: this rank's slice of the attention output (``hp`` = hidden size
            per partition), the input of the row-parallel output projection.
        """
        if packed_seq_params is not None:
            raise NotImplementedError(
                "SDPADotProductAttention does not support packed_seq_params (THD packed "
                "sequences need Transformer Engine); pass a [b, 1, s, s] boolean attention_mask "
                "(True = masked out) that separates the documents instead")
        if attention_bias is not None:
            raise NotImplementedError("SDPADotProductAttention does not support attention_bias")

        sq, b, num_heads, _ = query.shape
        sk, _, num_groups, _ = key.shape
        if num_heads % num_groups != 0:
            raise ValueError(f"{num_heads} query heads are not divisible into {num_groups} "
                             "key/value groups")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sdpa_mask, is_causal = _sdpa_mask(attention_mask, mask_type, sq, sk, query.device)

        # [s, b, heads, d] -> [b, heads, s, d] (views; SDPA accepts these strides)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa_kwargs = {}
        if num_groups != num_heads:
            # Fused GPU kernels share k/v across a group only without an explicit mask; with a
            # mask, repeat them so the memory-efficient kernel stays eligible.
            if _SDPA_HAS_ENABLE_GQA and sdpa_mask is None:
                gqa_kwargs["enable_gqa"] = True
            else:
                repeats = num_heads // num_groups
                k = k.repeat_interleave(repeats, dim=1)
                v = v.repeat_interleave(repeats, dim=1)

        dropout_p = self.dropout_p if self.training else 0.0

        def attend() -> Tensor:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale, **gqa_kwargs)

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # As DotProductAttention: TP ranks hold different heads, so each draws its dropout
            # mask from its own model-parallel RNG stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()

        # [b, np, sq, hv] -> [sq, b, np, hv] -> [sq, b, np·hv]
        return context.permute(2, 0, 1, 3).reshape(sq, b, num_heads * context.size(-1))


def _sdpa_mask(attention_mask: Optional[Tensor], mask_type: AttnMaskType, sq: int, sk: int,
               device: torch.device) -> Tuple[Optional[Tensor], bool]:
    """(SDPA's boolean mask with True = attend, or None; is_causal) for megatron's mask
    (True = masked out) and mask type."""
    if attention_mask is not None and mask_type != AttnMaskType.no_mask:
        if attention_mask.dtype != torch.bool:
            raise TypeError("attention_mask must be boolean (True = masked out), got "
                            f"{attention_mask.dtype}")
        return ~attention_mask, False
    if mask_type in _CAUSAL_MASK_TYPES and sq > 1:
        if sq == sk:
            return None, True
        # queries are the last sq positions of the sk keys (e.g. a KV cache)
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq), False
    return None, False
