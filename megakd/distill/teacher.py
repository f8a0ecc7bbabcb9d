"""The frozen teacher's forward-only pass over one iteration's microbatches.

Design (see DESIGN.md, "Teacher and student under pipeline parallelism"): the teacher is its
own megatron-core pipeline over the same PP ranks as the student. Before the student's
forward-backward schedule runs, the teacher runs megatron-core's *forward-only* schedule over
the iteration's microbatches; its last stage keeps, per microbatch, what the KD loss needs
(the vocab-parallel logits shard, or the TP-reduced top-k), and the student's loss function on
the last stage reads entry ``i`` for microbatch ``i``. Neither model's p2p tensors are touched
and megatron-core runs unpatched; the teacher's hidden size may differ from the student's and
either model may use virtual pipeline stages.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Union

import torch

from megakd.arguments import KDConfig
from megakd.data import Microbatch
from megakd.losses import TeacherTopK, teacher_topk, vocab_parallel_cross_entropy

TeacherOutput = Union[torch.Tensor, TeacherTopK]


class TeacherSource(Protocol):
    """Where the student's step gets teacher outputs: the live :class:`TeacherRunner`, or an
    offline cache (:class:`megakd.cache.CachedTeacher`, ``--teacher-cache``)."""

    def run(self, microbatches: Sequence[Microbatch]) -> List[TeacherOutput]:
        """One output per microbatch, in order, on the last pipeline stage; ``[]`` elsewhere."""
        ...

_TOPK_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def microbatch_iterators(
    microbatches: Sequence[Microbatch], num_chunks: int
) -> Union[Iterator[Microbatch], List[Iterator[Microbatch]]]:
    """What megatron-core's schedules take as ``data_iterator``: one iterator per model chunk
    with virtual pipelining, a single one otherwise."""
    if num_chunks == 1:
        return iter(microbatches)
    return [iter(microbatches) for _ in range(num_chunks)]


def pipeline_sizes(num_chunks: int) -> dict:
    """Explicit ``pp_size``/``vp_size`` for ``get_forward_backward_func``: teacher and student
    may have different numbers of virtual stages, so the global VPP setting can't be used."""
    from megatron.core import parallel_state

    return dict(
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        vp_size=num_chunks if num_chunks > 1 else None,
    )


class TeacherRunner:
    """Runs the teacher forward-only and keeps its per-microbatch outputs on the last stage.

    Dense KD keeps the logits shard ``[b, s, V/tp]``; top-k KD keeps a :class:`TeacherTopK`
    (``k`` values + global indices + log-normalizer per token, identical on every TP rank).
    """

    def __init__(
        self,
        chunks: List[torch.nn.Module],
        kd: KDConfig,
        valid_vocab_size: int,
        seq_length: int,
        micro_batch_size: int,
    ) -> None:
        self.chunks = chunks
        self.kd = kd
        self.valid_vocab_size = valid_vocab_size
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size

    def _forward_step(self, data_iterator: Iterator[Microbatch], model: torch.nn.Module):
        batch = next(data_iterator)
        logits = model(batch.tokens, batch.position_ids, batch.attention_mask)
        return logits, self._keep

    def _keep(self, logits: torch.Tensor, non_loss_data: bool = True) -> TeacherOutput:
        """Last stage: reduce the logits shard ``[b, s, V/tp]`` to what the loss needs."""
        if self.kd.topk is None:
            return logits
        from megatron.core import parallel_state

        return teacher_topk(
            logits,
            self.kd.topk,
            temperature=self.kd.temperature,
            valid_vocab_size=self.valid_vocab_size,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dtype=_TOPK_DTYPES[self.kd.topk_dtype],
        )

    def _cross_entropy_step(self, data_iterator: Iterator[Microbatch], model: torch.nn.Module):
        batch = next(data_iterator)
        logits = model(batch.tokens, batch.position_ids, batch.attention_mask)
        return logits, functools.partial(self._masked_cross_entropy, batch)

    def _masked_cross_entropy(self, batch: Microbatch, logits: torch.Tensor,
                              non_loss_data: bool = True) -> Dict[str, torch.Tensor]:
        """Last stage: the teacher's CE summed over the loss mask, and the token count."""
        from megatron.core import parallel_state

        ce = vocab_parallel_cross_entropy(
            logits, batch.labels, valid_vocab_size=self.valid_vocab_size,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )
        mask = batch.loss_mask.float()
        return {"lm loss": torch.stack([(ce * mask).sum(), mask.sum()])}

    def run(self, microbatches: Sequence[Microbatch]) -> List[TeacherOutput]:
        """Teacher outputs for each microbatch on the last pipeline stage; ``[]`` elsewhere."""
        return self._forward_only(microbatches, self._forward_step)

    def cross_entropy(self, microbatches: Sequence[Microbatch]) -> List[Dict[str, torch.Tensor]]:
        """The teacher's own LM loss, per microbatch ``{"lm loss": tensor([sum, count])}`` on
        the last stage (``[]`` elsewhere): the baseline a student's validation CE is compared to.
        Reduce with :func:`megakd.distill.reduce_reported`."""
        return self._forward_only(microbatches, self._cross_entropy_step)

    @torch.no_grad()
    def _forward_only(self, microbatches: Sequence[Microbatch], forward_step: Callable) -> list:
        """megatron-core's forward-only schedule over the teacher chunks; what ``forward_step``'s
        function returns on the last stage, per microbatch."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        forward_backward = get_forward_backward_func(**pipeline_sizes(len(self.chunks)))
        return forward_backward(
            forward_step_func=forward_step,
            data_iterator=microbatch_iterators(microbatches, len(self.chunks)),
            model=self.chunks,
            num_microbatches=len(microbatches),
            seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )
