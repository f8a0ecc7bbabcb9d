"""The architecture of one GPTModel (student or teacher)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megakd.configs.fields import flag

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "none")
# --moe-router-load-balancing-type: megatron-core's router losses (per micro-batch, per
# sequence, over the global batch) or none (sinkhorn is left out: its router differs).
MOE_LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
# Fields that only shape the student's training (its router loss), not the function the
# weights compute: recorded in megakd_model.json like the rest, but a run may choose its own.
TRAINING_ONLY_FIELDS = ("moe_router_load_balancing_type", "moe_aux_loss_coeff")


@dataclass
class ModelArchConfig:
    """Architecture of one GPTModel. Stored with every checkpoint as ``megakd_model.json``
    (:mod:`megakd.formats.model_metadata`), so a loader needs no model flags.

    Fields with ``teacher=True`` also have a ``--teacher-*`` flag; the teacher's unset ones
    default to the student's (its FFN width to 4 x its own hidden size when its hidden size is
    given). The other fields are one flag for both models.
    """

    num_layers: int = flag(name="--num-layers", help="transformer layers", teacher=True,
                           low=1, default_text="required")
    hidden_size: int = flag(name="--hidden-size", help="hidden size", teacher=True, low=1,
                            default_text="required")
    num_attention_heads: int = flag(name="--num-attention-heads", help="attention heads",
                                    teacher=True, low=1, default_text="required")
    ffn_hidden_size: Optional[int] = flag(None, name="--ffn-hidden-size", help="MLP width",
                                          teacher=True, low=1, default_text="4 x hidden")
    num_query_groups: Optional[int] = flag(
        None, name="--num-query-groups", teacher=True, low=1, default_text="heads (MHA)",
        help="key/value head groups for grouped-query attention (with --group-query-attention)")
    kv_channels: Optional[int] = flag(None, name="--kv-channels", teacher=True, low=1,
                                      default_text="hidden / heads",
                                      help="attention head dim (Qwen3 differs from hidden/heads)")
    swiglu: bool = flag(False, name="--swiglu", help="gated SiLU MLP")
    normalization: str = flag("LayerNorm", name="--normalization", choices=NORMALIZATIONS,
                              help="LayerNorm or RMSNorm")
    position_embedding_type: str = flag("learned_absolute", name="--position-embedding-type",
                                        choices=POSITION_EMBEDDINGS,
                                        help="learned_absolute, rope or none")
    rotary_base: int = flag(10000, name="--rotary-base", low=1, help="RoPE base")
    rotary_percent: float = flag(1.0, name="--rotary-percent", low=0.0, high=1.0,
                                 low_inclusive=False, help="fraction of the head dim rotated")
    untie_embeddings_and_output_weights: bool = flag(
        False, name="--untie-embeddings-and-output-weights", help="separate output layer")
    add_bias_linear: bool = flag(True, name="--disable-bias-linear", inverted=True,
                                 help="no biases in linear layers")
    qk_layernorm: bool = flag(False, name="--qk-layernorm",
                              help="normalise queries and keys (Qwen3-style)")
    add_qkv_bias: bool = flag(False, name="--add-qkv-bias", help="bias on QKV only (Qwen2-style)")
    norm_epsilon: float = flag(1e-5, name="--norm-epsilon", low=0.0, low_inclusive=False,
                               help="normalisation epsilon")
    init_method_std: float = flag(0.02, name="--init-method-std", low=0.0,
                                  help="weight init std")
    use_rope_scaling: bool = flag(
        False, name="--use-rope-scaling",
        help="Llama-3.x RoPE scaling (megatron fixes low/high frequency factors 1/4 and "
             "original context 8192)")
    rope_scaling_factor: float = flag(8.0, name="--rope-scaling-factor", low=0.0,
                                      low_inclusive=False,
                                      help="RoPE scaling factor with --use-rope-scaling")
    # ---- mixture of experts (megatron-core MoE layers in every layer; dense when unset) ----
    num_experts: Optional[int] = flag(None, name="--num-experts", teacher=True, low=1,
                                      default_text="dense MLP",
                                      help="routed experts per layer (mixture of experts)")
    moe_router_topk: int = flag(2, name="--moe-router-topk", teacher=True, low=1,
                                help="experts each token is routed to")
    moe_ffn_hidden_size: Optional[int] = flag(None, name="--moe-ffn-hidden-size", teacher=True,
                                              low=1, default_text="--ffn-hidden-size",
                                              help="width of each routed expert's MLP")
    moe_shared_expert_intermediate_size: Optional[int] = flag(
        None, name="--moe-shared-expert-intermediate-size", teacher=True, low=1,
        default_text="none", help="width of the shared expert every token also passes through")
    moe_router_pre_softmax: bool = flag(
        False, name="--moe-router-pre-softmax",
        help="router softmax over all experts before the top-k, weights not renormalised "
             "(Qwen3-MoE norm_topk_prob=false); default: softmax over the top-k logits "
             "(Mixtral, Qwen3-MoE norm_topk_prob=true)")
    moe_router_load_balancing_type: str = flag(
        "aux_loss", name="--moe-router-load-balancing-type", choices=MOE_LOAD_BALANCING_TYPES,
        help="the MoE student's router loss: aux_loss (per micro-batch), seq_aux_loss, "
             "global_aux_loss or none")
    moe_aux_loss_coeff: float = flag(0.0, name="--moe-aux-loss-coeff", low=0.0,
                                     help="weight of the MoE student's load-balancing loss")
    # The tokenizer's true vocabulary (before padding); set from the data flags, no flag here.
    vocab_size: Optional[int] = None
    # A converted model's attention window when it can bind (Mistral/Mixtral config.json's
    # sliding_window below max_position_embeddings); no flag: megatron's GPTModel attends to
    # the whole causal context, so runs are limited to --seq-length <= this.
    sliding_window: Optional[int] = None

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None and self.hidden_size is not None:
            self.ffn_hidden_size = 4 * self.hidden_size

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Width of one routed expert: ``--moe-ffn-hidden-size``, or ``--ffn-hidden-size``."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def head_dim(self) -> int:
        """Attention head dim: ``--kv-channels``, or hidden size / heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """Key/value groups: ``--num-query-groups``, or one per head (multi-head attention)."""
        return self.num_query_groups or self.num_attention_heads
