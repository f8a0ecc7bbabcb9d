"""Mixture-of-experts layers: megatron-core's ``MoELayer`` configured from a ModelArchConfig.

Every transformer layer of a MoE model replaces its MLP with megatron-core's ``MoELayer``: a
router (``[E, h]`` linear, top-k over the softmax), ``E`` routed experts (SwiGLU MLPs of width
``--moe-ffn-hidden-size``) and optionally one shared expert. Under expert parallelism each rank
of the EP group holds ``E / EP`` experts; the token dispatcher (``allgather`` or ``alltoall``)
moves each token's hidden state ``[h]`` to the ranks of its top-k experts and the weighted
expert outputs back. With the local spec (CPU, no Transformer Engine) experts run one after
the other (``SequentialMLP``); with Transformer Engine as one grouped GEMM (``TEGroupedMLP``).
Both store the same global checkpoint keys, so a checkpoint loads under either, at any EP.

The student's router load-balancing loss is attached by megatron-core's router to the
activations (``MoEAuxLossAutoScaler``); megatron's pipeline schedules set its scale, and its
gradient is divided like the main loss under ``calculate_per_token_loss``. Nothing else is
needed to train with it; :func:`router_loss_report` only reads it for logging.
"""

from __future__ import annotations

from typing import Any, Dict

from megakd.configs import ModelArchConfig, ParallelConfig


def moe_config_fields(arch: ModelArchConfig, parallel: ParallelConfig,
                      grouped_gemm: bool = False) -> Dict[str, Any]:
    """megatron ``TransformerConfig`` fields of ``arch``'s MoE layers ({} for a dense model).

    A dense model keeps expert parallelism at 1 in its own config (megatron-core refuses EP
    without experts) even when the run's EP groups serve a MoE teacher or student.
    """
    if not arch.is_moe:
        return {}
    return {
        "num_moe_experts": arch.num_experts,
        "moe_router_topk": arch.moe_router_topk,
        "moe_ffn_hidden_size": arch.expert_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": arch.moe_shared_expert_intermediate_size,
        "moe_router_pre_softmax": arch.moe_router_pre_softmax,
        "moe_router_load_balancing_type": arch.moe_router_load_balancing_type,
        "moe_aux_loss_coeff": arch.moe_aux_loss_coeff,
        "moe_token_dispatcher_type": parallel.moe_token_dispatcher_type,
        "moe_grouped_gemm": grouped_gemm,
        "expert_model_parallel_size": parallel.expert_model_parallel_size,
        "expert_tensor_parallel_size": parallel.expert_tensor_size,
    }


def router_loss_report(student: ModelArchConfig, num_microbatches: int) -> Dict[str, float]:
    """The MoE student's router losses of the last training step, for the log line:
    ``{"load_balancing_loss": mean over MoE layers and microbatches}`` (without the
    coefficient, as Megatron-LM logs it), or {} for a dense student.

    Collective: all-reduces megatron-core's per-layer loss tracker over the pipeline stages
    (each holds its own layers) and the data-parallel ranks; call it on every rank once per
    training step, after the step. It then clears the tracker for the next step.
    """
    from megatron.core.transformer.moe import moe_utils

    if not student.is_moe:
        return {}
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    names = sorted(tracker)
    moe_utils.reduce_aux_losses_tracker_across_ranks(names)
    report = {name: (tracker[name]["values"].float().sum()
                     / (student.num_layers * max(1, num_microbatches))).item()
              for name in names}
    moe_utils.clear_aux_losses_tracker()
    return report

