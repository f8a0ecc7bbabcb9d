"""How the ranks are split: tensor, pipeline (virtual), data and expert parallelism."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megakd.configs.fields import flag

# megatron-core's token dispatchers that run without DeepEP/HybridEP kernels.
MOE_TOKEN_DISPATCHERS = ("allgather", "alltoall")


@dataclass
class ParallelConfig:
    """Megatron's parallel layout; DP = world size / (TP x PP)."""

    tensor_model_parallel_size: int = flag(1, name="--tensor-model-parallel-size", low=1,
                                           help="tensor parallelism (TP)")
    pipeline_model_parallel_size: int = flag(1, name="--pipeline-model-parallel-size", low=1,
                                             help="pipeline parallelism (PP); DP = world / "
                                                  "(TP x PP)")
    num_layers_per_virtual_pipeline_stage: Optional[int] = flag(
        None, name="--num-layers-per-virtual-pipeline-stage", low=1,
        help="interleaved pipeline for student and teacher (each model's layers per rank must "
             "split into >= 2 chunks)")
    sequence_parallel: bool = flag(False, name="--sequence-parallel",
                                   help="Megatron sequence parallelism (needs TP > 1)")
    use_distributed_optimizer: bool = flag(False, name="--use-distributed-optimizer",
                                           help="shard optimizer state across DP")
    expert_model_parallel_size: int = flag(
        1, name="--expert-model-parallel-size", low=1,
        help="expert parallelism (EP) of MoE models: each rank holds experts / EP of every "
             "MoE layer; EP x expert TP must divide the ranks of a pipeline stage (TP x DP)")
    expert_tensor_parallel_size: Optional[int] = flag(
        None, name="--expert-tensor-parallel-size", low=1, default_text="TP",
        help="tensor parallelism inside each expert (1: whole experts, as ModelOpt and "
             "Megatron-LM's large-MoE recipes)")
    moe_token_dispatcher_type: str = flag(
        "allgather", name="--moe-token-dispatcher-type", choices=MOE_TOKEN_DISPATCHERS,
        help="how MoE layers move tokens to their experts' ranks (alltoall for large EP)")
    world_size: int = 1  # set from the launcher's environment, not a flag

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.model_parallel_size

    @property
    def expert_tensor_size(self) -> int:
        """Tensor parallelism inside experts: ``--expert-tensor-parallel-size``, or TP."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def virtual_pipeline_size(self, num_layers: int) -> Optional[int]:
        """Model chunks per pipeline rank for a model of ``num_layers`` layers (None: no VPP)."""
        if self.num_layers_per_virtual_pipeline_stage is None:
            return None
        per_rank = num_layers // self.pipeline_model_parallel_size
        return per_rank // self.num_layers_per_virtual_pipeline_stage
