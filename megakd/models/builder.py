"""Build megatron-core ``GPTModel`` chunks for this rank.

A model is always a list of chunks, one per virtual pipeline stage held by this rank (a single
chunk without virtual pipelining), as megatron-core's schedules expect. The layer spec is
Transformer Engine's when TE imports, the local (pure PyTorch) spec otherwise.
"""

from __future__ import annotations

import functools
from typing import List, Optional

import torch
import torch.nn.functional as F

from megakd.arguments import ModelArchConfig, ParallelConfig


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports and a GPU is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA/TE install: fall back to the local spec
        return False
    return True


def transformer_config_from_arch(
    arch: ModelArchConfig,
    parallel: ParallelConfig,
    *,
    bf16: bool = False,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
):
    """Megatron ``TransformerConfig`` for one architecture at this run's parallel layout."""
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.hidden_size // arch.num_attention_heads,
        gated_linear_unit=arch.swiglu,
        activation_func=F.silu if arch.swiglu else F.gelu,
        normalization=arch.normalization,
        layernorm_epsilon=arch.norm_epsilon,
        add_bias_linear=arch.add_bias_linear,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        init_method_std=arch.init_method_std,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_size(arch.num_layers),
        sequence_parallel=parallel.sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        calculate_per_token_loss=True,
    )


def _layer_spec(arch: ModelArchConfig):
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_engine_available():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=arch.qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=arch.qk_layernorm, normalization=arch.normalization
    )


def build_gpt_chunks(
    arch: ModelArchConfig,
    parallel: ParallelConfig,
    padded_vocab_size: int,
    max_sequence_length: int,
    *,
    bf16: bool = False,
    device: Optional[torch.device] = None,
) -> List[torch.nn.Module]:
    """GPTModel chunks for this rank: ``[chunk]``, or one per virtual stage with VPP.

    Output of the last stage is vocab-parallel logits ``[b, s, V/tp]`` (``parallel_output``).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config_from_arch(arch, parallel, bf16=bf16)
    spec = _layer_spec(arch)
    vp_size = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size is not None else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=not arch.untie_embeddings_and_output_weights,
            position_embedding_type=arch.position_embedding_type,
            rotary_percent=arch.rotary_percent,
            rotary_base=arch.rotary_base,
            vp_stage=stage,
        )
        if device is not None:
            model.to(device)
        if bf16:
            model.bfloat16()
        chunks.append(model)
    return chunks


def build_student(arch, parallel, padded_vocab_size, max_sequence_length, *, bf16=False, device=None):
    """Trainable student chunks (not yet wrapped in DDP)."""
    chunks = build_gpt_chunks(arch, parallel, padded_vocab_size, max_sequence_length,
                              bf16=bf16, device=device)
    for chunk in chunks:
        chunk.train()
    return chunks


def build_teacher(arch, parallel, padded_vocab_size, max_sequence_length, *, bf16=False, device=None):
    """Frozen teacher chunks: eval mode, no gradients, never given to an optimizer."""
    chunks = build_gpt_chunks(arch, parallel, padded_vocab_size, max_sequence_length,
                              bf16=bf16, device=device)
    for chunk in chunks:
        chunk.eval()
        for param in chunk.parameters():
            param.requires_grad_(False)
    return chunks
