"""megatron-core's pipeline schedules as megakd calls them, for teacher and student alike.

Teacher and student may have different numbers of virtual pipeline stages, so each call passes
its model's own ``pp_size``/``vp_size`` instead of relying on megatron's global VPP setting.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Sequence, Union

import torch

from megakd.data import Microbatch


def microbatch_iterators(
    microbatches: Sequence[Microbatch], num_chunks: int
) -> Union[Iterator[Microbatch], List[Iterator[Microbatch]]]:
    """What megatron-core's schedules take as ``data_iterator``: one iterator per model chunk
    with virtual pipelining, a single one otherwise."""
    if num_chunks == 1:
        return iter(microbatches)
    return [iter(microbatches) for _ in range(num_chunks)]


def forward_backward_func(num_chunks: int) -> Callable:
    """``get_forward_backward_func`` for a model of ``num_chunks`` chunks on this PP group."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func(
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        vp_size=num_chunks if num_chunks > 1 else None,
    )


@torch.no_grad()
def forward_only(chunks: List[torch.nn.Module], microbatches: Sequence[Microbatch],
                 forward_step: Callable, seq_length: int, micro_batch_size: int) -> list:
    """megatron-core's forward-only schedule over ``chunks``; on the last pipeline stage, what
    the function returned by ``forward_step`` gives for each microbatch (``[]`` elsewhere)."""
    return forward_backward_func(len(chunks))(
        forward_step_func=forward_step,
        data_iterator=microbatch_iterators(microbatches, len(chunks)),
        model=chunks,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=True,
        collect_non_loss_data=True,
    )
