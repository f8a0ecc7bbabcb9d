"""The reference path: decode by re-running the whole sequence each step, no KV cache.

Every step is one call of megatron-core's forward-only pipeline schedule over the model's
chunks, so it works at any layout the training forward works at: TP, PP, virtual pipeline
chunks (interleaved schedule) and sequence parallelism. It is the fallback for the layouts
megatron-core's static inference loop refuses (VPP, SP) and the reference the KV-cache path
is tested and benchmarked against. Cost: step ``t`` processes the whole padded sequence, so
a generation costs ``O(steps x total length)`` token-forwards instead of ``O(total length)``.

It steps in lockstep like the static loop (:mod:`megakd.generation.outputs`), consuming the
sampler identically, so with the same seed both paths draw the same tokens up to rounding.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megakd.generation.outputs import DecodeTrace
from megakd.generation.sampling import Draw, Sampler


def _forward_backward_func(num_chunks: int):
    return get_forward_backward_func(
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        vp_size=num_chunks if num_chunks > 1 else None,
    )


def _gathered_position(logits: torch.Tensor, position: int,
                       non_loss_data: bool = True) -> torch.Tensor:
    """``[mb, V]`` full logits at ``position`` from a vocab shard ``[mb, s, V/tp]`` (all-gather
    over TP of ``mb x V/tp`` values)."""
    column = logits[:, position, :].contiguous()
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(column) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(shards, column, group=group)
    return torch.cat(shards, dim=-1)


def _forward_step(data_iterator, model, position: int):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)
    return output, functools.partial(_gathered_position, position=position)


@torch.no_grad()
def _last_position_logits(chunks: List[torch.nn.Module], tokens: torch.Tensor,
                          position: int) -> Optional[torch.Tensor]:
    """Full logits ``[b, V_padded]`` at ``position`` on the last stage (None elsewhere) for
    ``tokens`` ``[b, s]``. With virtual pipeline chunks the interleaved schedule needs a
    multiple of PP microbatches: rows are split into PP microbatches (padded by repeating
    the last row)."""
    batch, seq = tokens.shape
    splits = parallel_state.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
    rows = math.ceil(batch / splits)
    padded = torch.cat([tokens, tokens[-1:].expand(rows * splits - batch, seq)])
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(rows, seq)
    microbatches: List[Dict[str, torch.Tensor]] = [
        {"tokens": padded[i * rows:(i + 1) * rows], "position_ids": positions}
        for i in range(splits)]
    iterators = ([iter(microbatches) for _ in chunks] if len(chunks) > 1
                 else iter(microbatches))
    outputs = _forward_backward_func(len(chunks))(
        forward_step_func=functools.partial(_forward_step, position=position),
        data_iterator=iterators, model=chunks, num_microbatches=splits, seq_length=seq,
        micro_batch_size=rows, forward_only=True, collect_non_loss_data=True)
    return torch.cat(outputs)[:batch] if outputs else None


def _broadcast_draw(draw: Optional[Draw], batch: int, device: torch.device) -> Draw:
    """The last pipeline stage's draw on every stage (one broadcast of ``3 x b`` float64
    values over the PP group; token ids are exact in float64)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return draw
    packed = torch.empty(3, batch, dtype=torch.float64, device=device)
    if draw is not None:
        packed = torch.stack([draw.tokens.double(), draw.logprobs.double(),
                              draw.full_logprobs.double()])
    torch.distributed.broadcast(packed, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return Draw(tokens=packed[0].long(), logprobs=packed[1].float(),
                full_logprobs=packed[2].float())


def decode_full_forward(chunks: List[torch.nn.Module], prompts: Sequence[Sequence[int]],
                        sampler: Sampler, max_new_tokens: int, eod: int,
                        sequence_multiple: int = 1) -> DecodeTrace:
    """Decode one batch on this rank's chunks (eval mode) with full forwards.

    Every rank of the TP x PP replica calls this with the same arguments. The sequence is
    right-padded to ``longest prompt + max_new_tokens`` rounded up to ``sequence_multiple``
    (the TP size under sequence parallelism); causal attention makes the padding invisible.
    The last stage samples and broadcasts the tokens to the other stages.
    """
    device = next(chunks[0].parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    total = int(lengths.max()) + max_new_tokens
    seq = math.ceil(total / sequence_multiple) * sequence_multiple
    tokens = torch.full((len(prompts), seq), eod, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    trace = DecodeTrace()
    position = int(lengths.min())
    while True:
        logits = _last_position_logits(chunks, tokens, position - 1)
        draw = _broadcast_draw(sampler(logits) if logits is not None else None,
                               len(prompts), device)
        started = lengths <= position
        trace.record(draw, started)
        tokens[started, position] = draw.tokens[started]
        done |= started & (draw.tokens == eod)
        if bool(done.all()) or position + 1 >= total:
            return trace
        position += 1
