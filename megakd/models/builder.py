"""Build megatron-core ``GPTModel`` chunks for this rank.

A model is always a list of chunks, one per virtual pipeline stage held by this rank (a single
chunk without virtual pipelining), as megatron-core's schedules expect. The layer spec is
Transformer Engine's when TE imports, the local (pure PyTorch) spec otherwise, whose core
attention is PyTorch's SDPA (:mod:`megakd.models.attention`) unless ``--attention-backend``
asks for megatron's unfused ``DotProductAttention``. Models with ``--num-experts`` get
megatron-core's MoE layers in every layer (:mod:`megakd.models.moe`).
"""

from __future__ import annotations

import functools
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F

from megakd.configs import (ATTENTION_BACKENDS, ConfigError, ModelArchConfig, ParallelConfig,
                            TeacherFP8Config)
from megakd.configs.rules import moe_student_rules
from megakd.models.attention import SDPADotProductAttention
from megakd.models.moe import moe_config_fields
from megakd.models.norms import TorchNorm


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
    params_dtype: Optional[torch.dtype] = None,
    perform_initialization: bool = True,
    moe_grouped_gemm: bool = False,
    fp8: Optional[TeacherFP8Config] = None,
):
    """Megatron ``TransformerConfig`` for one architecture at this run's parallel layout.

    ``params_dtype`` overrides ``bf16`` (the converters build fp16/bf16/fp32 models);
    ``perform_initialization=False`` leaves weights uninitialised (they are about to be loaded);
    ``moe_grouped_gemm``: experts as one Transformer Engine grouped GEMM (TE spec only);
    ``fp8``: megatron-core's FP8 fields (``--teacher-fp8-*``; the TE spec runs them).
    """
    dtype = params_dtype or (torch.bfloat16 if bf16 else torch.float32)
    with warnings.catch_warnings():
        # megatron-core 0.16 warns about its own default cuda_graph_scope on every config.
        warnings.filterwarnings("ignore", message="full scope is deprecated")
        return _transformer_config(arch, parallel, dtype, hidden_dropout, attention_dropout,
                                   perform_initialization, moe_grouped_gemm,
                                   fp8.transformer_config_fields() if fp8 else {})


def _transformer_config(arch: ModelArchConfig, parallel: ParallelConfig, dtype: torch.dtype,
                        hidden_dropout: float, attention_dropout: float,
                        perform_initialization: bool, moe_grouped_gemm: bool,
                        fp8_fields: dict):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
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
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        calculate_per_token_loss=True,
        # Interleaved schedules exchange activations and gradients with the same peer in one
        # step; batched p2p matches those by posting order, which pairs them wrongly at PP=2
        # (silently: both are [s, b, h]). Megatron-LM's VPP default is unbatched p2p too.
        batch_p2p_comm=parallel.virtual_pipeline_size(arch.num_layers) is None,
        perform_initialization=perform_initialization,
        **moe_config_fields(arch, parallel, grouped_gemm=moe_grouped_gemm),
        **fp8_fields,
    )


def _uses_transformer_engine(attention_backend: str) -> bool:
    """Whether ``--attention-backend`` selects Transformer Engine's spec here."""
    return attention_backend == "auto" and transformer_engine_available()


def _layer_spec(arch: ModelArchConfig, attention_backend: str = "auto"):
    """Transformer layer spec for ``--attention-backend``.

    ``auto``: Transformer Engine's spec when TE is available, else megatron-core's local spec
    with :class:`~megakd.models.attention.SDPADotProductAttention` (``sdpa``). ``sdpa``,
    ``unfused`` and ``local`` always use the local spec; ``unfused``/``local`` keep megatron's
    ``DotProductAttention`` (baddbmm + softmax + bmm). MoE layers: ``TEGroupedMLP`` experts
    with TE, ``SequentialMLP`` of local linears otherwise (same checkpoint keys).
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, "
                         f"got {attention_backend!r}")
    if _uses_transformer_engine(attention_backend):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=arch.num_experts, moe_grouped_gemm=arch.is_moe,
            qk_layernorm=arch.qk_layernorm
        )
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=arch.num_experts, moe_grouped_gemm=False,
        qk_layernorm=arch.qk_layernorm, normalization=arch.normalization
    )
    # get_gpt_layer_local_spec builds a new spec on every call: replacing its slots is local.
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = TorchNorm  # sequence-parallel capable
    if arch.qk_layernorm:
        layer.self_attention.submodules.q_layernorm = TorchNorm
        layer.self_attention.submodules.k_layernorm = TorchNorm
    if attention_backend in ("auto", "sdpa"):
        layer.self_attention.submodules.core_attention = SDPADotProductAttention
    return spec


def _block_spec(layer_spec, config, vp_stage: Optional[int]):
    """The local spec as a whole block, so the final norm is :class:`TorchNorm` too (megatron's
    default block pairs a layer spec with apex's or the SP-refusing torch norm). TE specs pass
    through unchanged."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if layer_spec.submodules.input_layernorm is not TorchNorm:
        return layer_spec
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=TorchNorm,
    )


def build_gpt_chunks(
    arch: ModelArchConfig,
    parallel: ParallelConfig,
    padded_vocab_size: int,
    max_sequence_length: int,
    *,
    bf16: bool = False,
    device: Optional[torch.device] = None,
    attention_backend: str = "auto",
    params_dtype: Optional[torch.dtype] = None,
    perform_initialization: bool = True,
    fp8: Optional[TeacherFP8Config] = None,
) -> List[torch.nn.Module]:
    """GPTModel chunks for this rank: ``[chunk]``, or one per virtual stage with VPP.

    Output of the last stage is vocab-parallel logits ``[b, s, V/tp]`` (``parallel_output``).
    ``attention_backend`` is ``--attention-backend`` (see :func:`_layer_spec`);
    ``params_dtype``/``perform_initialization``/``fp8`` as in
    :func:`transformer_config_from_arch`. FP8 needs Transformer Engine's spec (ConfigError
    naming ``--teacher-fp8-format`` otherwise; the preflight refuses it earlier).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if fp8 is not None and fp8.enabled and not _uses_transformer_engine(attention_backend):
        raise ConfigError(f"--teacher-fp8-format {fp8.format}: FP8 execution needs Transformer "
                          "Engine's layer spec (Transformer Engine on a GPU, --attention-backend "
                          "auto)")
    config = transformer_config_from_arch(
        arch, parallel, bf16=bf16, params_dtype=params_dtype,
        perform_initialization=perform_initialization,
        moe_grouped_gemm=arch.is_moe and _uses_transformer_engine(attention_backend), fp8=fp8)
    spec = _layer_spec(arch, attention_backend)
    vp_size = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size is not None else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=_block_spec(spec, config, stage),
            vocab_size=padded_vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=not arch.untie_embeddings_and_output_weights,
            position_embedding_type=arch.position_embedding_type,
            rotary_percent=arch.rotary_percent,
            rotary_base=arch.rotary_base,
            rope_scaling=arch.use_rope_scaling,
            rope_scaling_factor=arch.rope_scaling_factor,
            vp_stage=stage,
        )
        if device is not None:
            model.to(device)
        if bf16:
            model.bfloat16()
        chunks.append(model)
    return chunks


def build_student(arch, parallel, padded_vocab_size, max_sequence_length, *, bf16=False, device=None,
                  attention_backend="auto"):
    """Trainable student chunks (not yet wrapped in DDP). A MoE student at TP > 1 needs
    sequence parallelism (ConfigError naming the flag, before anything is built)."""
    problems = moe_student_rules(arch, parallel)
    if problems:
        raise ConfigError("; ".join(problems))
    chunks = build_gpt_chunks(arch, parallel, padded_vocab_size, max_sequence_length,
                              bf16=bf16, device=device, attention_backend=attention_backend)
    for chunk in chunks:
        chunk.train()
    return chunks


def build_teacher(arch, parallel, padded_vocab_size, max_sequence_length, *, bf16=False, device=None,
                  attention_backend="auto", fp8: Optional[TeacherFP8Config] = None):
    """Frozen teacher chunks: eval mode, no gradients, never given to an optimizer;
    ``fp8`` (``--teacher-fp8-*``) runs its GEMMs in FP8 through Transformer Engine."""
    chunks = build_gpt_chunks(arch, parallel, padded_vocab_size, max_sequence_length,
                              bf16=bf16, device=device, attention_backend=attention_backend,
                              fp8=fp8)
    for chunk in chunks:
        chunk.eval()
        for param in chunk.parameters():
            param.requires_grad_(False)
    return chunks
