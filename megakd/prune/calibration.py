"""Calibration forwards: the first samples of the train split through the model, forward only,
on its own TP/PP layout (megatron-core's pipeline schedule), with the LM loss on the way.

Calibration microbatch ``k`` holds samples ``[k * mbs, (k + 1) * mbs)`` of the train split;
data-parallel replica ``r`` runs the microbatches ``k = r (mod DP)``, so the statistics, summed
over replicas, do not depend on the layout. Every position of a sample is calibrated (as
Minitron and ModelOpt do); the LM loss counts the tokens of the loss mask (responses for chat
data).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, List, Sequence, Tuple

import torch

from megakd.data import Microbatch
from megakd.data.batches import collate
from megakd.losses import vocab_parallel_cross_entropy


def calibration_microbatches(dataset, count: int, micro_batch_size: int, dp_rank: int,
                             dp_size: int, device: torch.device) -> List[Microbatch]:
    """This data-parallel replica's calibration microbatches (see the module doc)."""
    out = []
    for k in range(dp_rank, count, dp_size):
        ids = [(k * micro_batch_size + j) % len(dataset) for j in range(micro_batch_size)]
        batch = collate([dataset[i] for i in ids], len(out), device)
        batch.sample_ids = torch.tensor(ids, dtype=torch.int64)
        out.append(batch)
    return out


def _loss_sums(logits: torch.Tensor, batch: Microbatch, valid_vocab: int,
               non_loss_data: bool = True) -> torch.Tensor:
    """``[2]`` fp64: the summed LM loss over the loss-mask tokens and their count, from this
    rank's logits shard ``[b, s, V/tp]`` (two ``[b*s]`` all-reduces over TP)."""
    from megatron.core import parallel_state

    ce = vocab_parallel_cross_entropy(logits, batch.labels, valid_vocab_size=valid_vocab,
                                      tp_group=parallel_state.get_tensor_model_parallel_group())
    mask = batch.loss_mask.to(ce.dtype)
    return torch.stack([(ce * mask).double().sum(), mask.double().sum()])


def _forward_step(data_iterator: Iterator[Microbatch], model: torch.nn.Module,
                  valid_vocab: int):
    batch = next(data_iterator)
    output = model(batch.tokens, batch.position_ids, batch.attention_mask)
    return output, functools.partial(_loss_sums, batch=batch, valid_vocab=valid_vocab)


@torch.no_grad()
def calibrate(chunks: List[torch.nn.Module], microbatches: Sequence[Microbatch],
              seq_length: int, micro_batch_size: int, valid_vocab: int,
              device: torch.device) -> Tuple[float, int]:
    """Collective over all ranks: one forward-only pass of ``microbatches`` through this
    rank's ``chunks`` (one chunk: no virtual pipeline). Returns ``(loss sum, tokens)`` over
    every replica's calibration tokens, the same on every rank (the last stage's ``[2]`` is
    broadcast over PP, then summed over DP)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    sums = torch.zeros(2, dtype=torch.float64, device=device)
    if microbatches:
        outputs = get_forward_backward_func()(
            forward_step_func=functools.partial(_forward_step, valid_vocab=valid_vocab),
            data_iterator=iter(microbatches), model=chunks,
            num_microbatches=len(microbatches), seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True, collect_non_loss_data=True)
        if outputs:
            sums = torch.stack(list(outputs)).sum(dim=0).to(device)
    torch.distributed.broadcast(sums, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    return float(sums[0]), int(round(float(sums[1])))


@contextlib.contextmanager
def layer_left_out(chunks: List[torch.nn.Module], layer: int) -> Iterator[None]:
    """Within the block, global layer ``layer`` (0-based) passes its input through unchanged
    (on whichever pipeline stage holds it; a no-op elsewhere)."""
    handles = []
    for chunk in chunks:
        while hasattr(chunk, "module"):
            chunk = chunk.module
        for module in chunk.decoder.layers:
            if module.layer_number - 1 == layer:
                handles.append(module.register_forward_hook(_identity, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _identity(module, args, kwargs, output):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return (hidden, output[1]) if isinstance(output, tuple) else hidden
