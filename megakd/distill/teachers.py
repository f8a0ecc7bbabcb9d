"""Where the student's loss gets the teacher's distribution: teacher sources.

Every source implements :class:`TeacherSource`: ``outputs(microbatches)`` returns one
:class:`TeacherOutput` per microbatch on the last pipeline stage (``[]`` elsewhere), for the
tokens the microbatch holds, whoever produced them (a dataset, or the student's own samples).

* :class:`LiveTeacher`: the frozen teacher model runs megatron-core's forward-only schedule over
  the microbatches on the same ranks as the student (its own TP/PP split of its own layers,
  possibly its own virtual stages). Its last stage keeps the logits shard or the TP-reduced
  top-k. Neither model's p2p tensors are touched and megatron-core runs unpatched.
* :class:`CachedTeacher`: ``--teacher-cache``; the top-k read from an offline cache by the
  microbatches' sample ids. No teacher is built.

:func:`build_teacher_source` picks one from the run's flags.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Protocol, Sequence

import torch

from megakd.configs import ConfigError, KDConfig
from megakd.data import Microbatch
from megakd.distill.schedules import forward_only
from megakd.formats.cache import TeacherCache, token_fingerprint
from megakd.formats.topk import TOPK_VALUE_DTYPES, TeacherTopK
from megakd.losses import teacher_topk, vocab_parallel_cross_entropy


@dataclass(frozen=True)
class TeacherOutput:
    """The teacher's distribution over one microbatch's tokens, as the KD loss reads it: the
    vocab-parallel logits shard ``[b, s, V/tp]`` (dense KD), or the TP-reduced top-k
    ``[b, s, k]`` (top-k KD), identical on every TP rank. Exactly one of the two is set."""

    logits: Optional[torch.Tensor] = None
    topk: Optional[TeacherTopK] = None

    def __post_init__(self) -> None:
        if (self.logits is None) == (self.topk is None):
            raise ValueError("a TeacherOutput holds either logits or a top-k")


class TeacherSource(Protocol):
    def outputs(self, microbatches: Sequence[Microbatch]) -> List[TeacherOutput]:
        """One output per microbatch, in order, on the last pipeline stage; ``[]`` elsewhere."""
        ...


MicrobatchContext = Callable[[Microbatch], ContextManager[None]]


class LiveTeacher:
    """The frozen teacher model, run forward-only over each iteration's microbatches.

    ``microbatch_context`` (optional) is entered around each microbatch's forward in
    :meth:`outputs`, on every pipeline stage: intermediate-layer KD captures the paired layers'
    hidden states there (:meth:`megakd.distill.hidden.HiddenStateKD.teacher_microbatch`).
    """

    def __init__(self, chunks: List[torch.nn.Module], kd: KDConfig, valid_vocab_size: int,
                 seq_length: int, micro_batch_size: int,
                 microbatch_context: Optional[MicrobatchContext] = None) -> None:
        self.chunks = chunks
        self.kd = kd
        self.valid_vocab_size = valid_vocab_size
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.microbatch_context = microbatch_context

    def outputs(self, microbatches: Sequence[Microbatch]) -> List[TeacherOutput]:
        return forward_only(self.chunks, microbatches, self._forward_step, self.seq_length,
                            self.micro_batch_size)

    def cross_entropy(self, microbatches: Sequence[Microbatch]) -> List[Dict[str, torch.Tensor]]:
        """The teacher's own LM loss, per microbatch ``{"lm loss": tensor([sum, count])}`` on
        the last stage (``[]`` elsewhere): the baseline a student's validation CE is compared
        to. Reduce with :func:`megakd.distill.reduce_reported`."""
        return forward_only(self.chunks, microbatches, self._cross_entropy_step,
                            self.seq_length, self.micro_batch_size)

    def _forward_step(self, data_iterator: Iterator[Microbatch], model: torch.nn.Module):
        batch = next(data_iterator)
        context = (self.microbatch_context(batch) if self.microbatch_context is not None
                   else contextlib.nullcontext())
        with context:
            output = model(batch.tokens, batch.position_ids, batch.attention_mask)
        return output, self._keep

    def _keep(self, logits: torch.Tensor, non_loss_data: bool = True) -> TeacherOutput:
        """Last stage: reduce the logits shard ``[b, s, V/tp]`` to what the loss needs."""
        if self.kd.topk is None:
            return TeacherOutput(logits=logits)
        from megatron.core import parallel_state

        return TeacherOutput(topk=teacher_topk(
            logits, self.kd.topk, temperature=self.kd.temperature,
            valid_vocab_size=self.valid_vocab_size,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dtype=TOPK_VALUE_DTYPES[self.kd.topk_dtype]))

    def _cross_entropy_step(self, data_iterator: Iterator[Microbatch], model: torch.nn.Module):
        batch = next(data_iterator)
        logits = model(batch.tokens, batch.position_ids, batch.attention_mask)
        return logits, functools.partial(self._masked_cross_entropy, batch)

    def _masked_cross_entropy(self, batch: Microbatch, logits: torch.Tensor,
                              non_loss_data: bool = True) -> Dict[str, torch.Tensor]:
        from megatron.core import parallel_state

        ce = vocab_parallel_cross_entropy(
            logits, batch.labels, valid_vocab_size=self.valid_vocab_size,
            tp_group=parallel_state.get_tensor_model_parallel_group())
        mask = batch.loss_mask.float()
        return {"lm loss": torch.stack([(ce * mask).sum(), mask.sum()])}


class CacheMismatchError(ConfigError):
    """A microbatch whose tokens are not the ones the cached teacher saw."""


class CachedTeacher:
    """``--teacher-cache``: the teacher's top-k read from the cache by sample id."""

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache

    def outputs(self, microbatches: Sequence[Microbatch]) -> List[TeacherOutput]:
        """Per microbatch, the cached top-k of its samples ``[b, s, k]`` on the last pipeline
        stage (``[]`` elsewhere), checked against the microbatch's tokens. No communication."""
        from megatron.core import parallel_state

        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return []
        outputs = []
        for batch in microbatches:
            if batch.sample_ids is None:
                raise CacheMismatchError("--teacher-cache needs microbatches of dataset samples "
                                         "(they carry sample ids)")
            sample_ids = batch.sample_ids.tolist()
            decoded = self.cache.read(sample_ids)
            for row, (sample, stored) in enumerate(zip(sample_ids, decoded.fingerprints)):
                if token_fingerprint(batch.tokens[row]) != stored:
                    raise CacheMismatchError(
                        f"--teacher-cache {self.cache.directory}: sample {sample} holds other "
                        "tokens than the ones the cached teacher saw (different data or order)")
            outputs.append(TeacherOutput(topk=decoded.topk.to(batch.tokens.device)))
        return outputs


def build_teacher_source(kd: KDConfig, teacher_chunks: Optional[List[torch.nn.Module]],
                         cache: Optional[TeacherCache], valid_vocab_size: int, seq_length: int,
                         micro_batch_size: int,
                         microbatch_context: Optional[MicrobatchContext] = None
                         ) -> Optional[TeacherSource]:
    """The run's teacher source: the cache when one is given, else the live teacher model
    (``microbatch_context``: see :class:`LiveTeacher`), else None (``--kd-loss-weight 0``:
    plain LM training)."""
    if cache is not None:
        return CachedTeacher(cache)
    if teacher_chunks is not None and kd.uses_teacher:
        return LiveTeacher(teacher_chunks, kd, valid_vocab_size, seq_length, micro_batch_size,
                           microbatch_context)
    return None
