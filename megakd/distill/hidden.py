"""Intermediate-layer KD: hidden states of paired layers, captured, moved and compared.

``--kd-intermediate-pairs S:T,...`` pairs the output of the student's transformer layer ``S``
with the teacher's layer ``T`` (1-based global ``layer_number``, as megatron numbers layers
across pipeline stages and virtual chunks). Per teacher window (:mod:`megakd.distill.window`):

1. **Teacher capture.** Forward hooks on the paired teacher ``TransformerLayer`` modules keep
   each microbatch's output ``[s, b, h_t]`` (``[s/tp, b, h_t]`` with sequence parallelism)
   during the teacher's forward-only schedule, on the pipeline rank that owns the layer. They
   are active only inside :meth:`HiddenStateKD.teacher_microbatch`, which the live teacher
   enters around each microbatch's forward; any other forward (validation baseline,
   generation) passes through untouched.
2. **Exchange.** Right after the teacher's window, a teacher layer whose paired student layer
   lives on another pipeline rank is sent there with point-to-point send/recv inside the
   pipeline group, every rank posting the same (pair, microbatch) order in one batched call.
   Cost per such pair and microbatch: ``b x s x h_t`` values of the teacher's dtype, split
   over the TP ranks under SP (each sends its ``s/tp`` shard), sent by every TP rank without
   SP. Teacher layers paired on the same stage cost nothing.
3. **Student loss.** Forward hooks on the paired student layers, active inside
   :meth:`HiddenStateKD.student_microbatch` (the student's forward step), project the output
   (:class:`~megakd.distill.hidden_loss.HiddenProjection` when the hidden sizes differ),
   compute the per-token loss against the held teacher state, sum it over the microbatch's
   KD-mask tokens and attach it to the layer's output (:func:`attach_aux_loss`), so that it
   backpropagates on the stage that owns the layer, inside megatron's schedule.
4. **Report.** After the iteration, the per-microbatch sums are all-reduced over TP (under
   SP) and PP (two tiny collectives) and added to the last stage's reported losses as
   ``"hidden loss"`` (a token mean over the KD mask, summed over pairs).

Normalisation is the logit loss's (:mod:`megakd.distill.loss`): the objective gains
``w_h * sum_pairs sum_tokens loss / N_kd`` with ``N_kd`` the iteration's global KD-mask token
count; the attached loss is pre-multiplied by the anchor token total that
``finalize_model_grads`` divides by, and its gradient carries the optimizer's loss scale.
Memory: the window's teacher states for the pairs whose student layer is on this rank,
``W x b x s x h_t`` per pair (``/tp`` under SP).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from megakd.configs import KDConfig
from megakd.data import Microbatch, kd_loss_mask
from megakd.distill.hidden_loss import (
    HIDDEN_LOSSES,
    HiddenProjection,
    attach_aux_loss,
    attach_projections,
    local_token_mask,
)
from megakd.distill.loss import GlobalTokenCounts, anchor_token_total

HIDDEN_LOSS_NAME = "hidden loss"


def transformer_layers(chunks: Sequence[torch.nn.Module]
                       ) -> Dict[int, Tuple[int, torch.nn.Module]]:
    """``{global layer_number: (chunk index, TransformerLayer)}`` of this rank's chunks (any
    wrappers; every virtual stage)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    found: Dict[int, Tuple[int, torch.nn.Module]] = {}
    for index, chunk in enumerate(chunks):
        for module in chunk.modules():
            if isinstance(module, TransformerLayer):
                found[module.layer_number] = (index, module)
    return found


def pipeline_owners(layers: Iterable[int], pp_group) -> Dict[int, int]:
    """``{layer number: pipeline rank}`` for a whole model: an all-gather of each pipeline
    rank's layer numbers (once, at setup)."""
    gathered: List[Optional[List[int]]] = [None] * torch.distributed.get_world_size(pp_group)
    torch.distributed.all_gather_object(gathered, sorted(layers), group=pp_group)
    return {layer: rank for rank, numbers in enumerate(gathered) for layer in numbers or ()}


def build_projections(kd: KDConfig, student_chunks: Sequence[torch.nn.Module],
                      student_hidden: int, teacher_hidden: int, seed: int,
                      device: torch.device) -> Dict[int, HiddenProjection]:
    """The student's learned projections for this rank's paired layers (none when the
    hidden sizes are equal); call on the unwrapped chunks, before DDP and the optimizer."""
    owned = {layer: index for layer, (index, _) in transformer_layers(student_chunks).items()}
    return attach_projections(student_chunks, [s for s, _ in kd.layer_pairs], owned,
                              student_hidden, teacher_hidden, seed, device)


class HiddenStateKD:
    """This rank's part of intermediate-layer KD (see the module docstring)."""

    def __init__(self, kd: KDConfig, student_chunks: Sequence[torch.nn.Module],
                 teacher_chunks: Sequence[torch.nn.Module],
                 projections: Dict[int, HiddenProjection], teacher_shape: Tuple[int, int, int],
                 teacher_dtype: torch.dtype, sequence_parallel: bool) -> None:
        from megatron.core import parallel_state
        from megatron.core.utils import get_model_config

        self.kd = kd
        self.pairs = kd.layer_pairs
        self.loss_fn = HIDDEN_LOSSES[kd.intermediate_loss]
        self.projections = projections
        self.teacher_shape = teacher_shape  # [s (or s/tp under SP), b, h_t]
        self.teacher_dtype = teacher_dtype
        self.device = next(teacher_chunks[0].parameters()).device
        self.sequence_parallel = sequence_parallel
        self.student_config = get_model_config(student_chunks[0])
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        student_layers = transformer_layers(student_chunks)
        teacher_layers = transformer_layers(teacher_chunks)
        student_owner = pipeline_owners(student_layers, self.pp_group)
        teacher_owner = pipeline_owners(teacher_layers, self.pp_group)
        self.teacher_of = {s: t for s, t in self.pairs if s in student_layers}
        self.needed_here = set(self.teacher_of.values())
        # (teacher layer, source rank, destination rank) for pairs split across stages.
        self.transfers = sorted({(t, teacher_owner[t], student_owner[s]) for s, t in self.pairs
                                 if teacher_owner[t] != student_owner[s]})
        self.held: Dict[Tuple[int, int], torch.Tensor] = {}  # (microbatch, teacher layer)
        self.sums: Dict[int, torch.Tensor] = {}  # microbatch -> summed loss on this rank
        self._teacher_index: Optional[int] = None
        self._student: Optional[Tuple[Microbatch, float]] = None
        self._hooks = [teacher_layers[t][1].register_forward_hook(self._teacher_hook(t))
                       for t in sorted({t for _, t in self.pairs}) if t in teacher_layers]
        self._hooks += [student_layers[s][1].register_forward_hook(self._student_hook(s))
                        for s in sorted(self.teacher_of)]

    # -- teacher side --------------------------------------------------------------------

    @contextlib.contextmanager
    def teacher_microbatch(self, batch: Microbatch) -> Iterator[None]:
        """Capture the paired teacher layers' outputs of ``batch`` during the block."""
        self._teacher_index = batch.index
        try:
            yield
        finally:
            self._teacher_index = None

    def _teacher_hook(self, layer: int):
        def keep(module, args, output):
            if self._teacher_index is not None:
                hidden = output[0] if isinstance(output, tuple) else output
                self.held[(self._teacher_index, layer)] = hidden.detach().clone()
        return keep

    def exchange(self, window: Sequence[Microbatch]) -> None:
        """Send each captured teacher state to the pipeline rank of its student layer (see the
        module docstring for the cost), then drop what this rank does not use."""
        ranks = torch.distributed.get_process_group_ranks(self.pp_group)
        ops = []
        for layer, source, destination in self.transfers:
            for batch in window:
                if self.pp_rank == source:
                    ops.append(torch.distributed.P2POp(
                        torch.distributed.isend, self.held[(batch.index, layer)].contiguous(),
                        ranks[destination], self.pp_group))
                elif self.pp_rank == destination:
                    buffer = torch.empty(self.teacher_shape, dtype=self.teacher_dtype,
                                         device=self.device)
                    self.held[(batch.index, layer)] = buffer
                    ops.append(torch.distributed.P2POp(torch.distributed.irecv, buffer,
                                                       ranks[source], self.pp_group))
        if ops:
            for request in torch.distributed.batch_isend_irecv(ops):
                request.wait()
        for key in [k for k in self.held if k[1] not in self.needed_here]:
            del self.held[key]

    def end_window(self) -> None:
        """Free the window's teacher states."""
        self.held.clear()

    # -- student side --------------------------------------------------------------------

    @contextlib.contextmanager
    def student_microbatch(self, batch: Microbatch, counts: GlobalTokenCounts
                           ) -> Iterator[None]:
        """Compute (and attach) the hidden losses of ``batch`` during the block. Each
        microbatch's sum is pre-multiplied by ``w_h * anchor / N_kd`` (module docstring)."""
        factor = (self.kd.intermediate_weight * anchor_token_total(self.kd, counts)
                  / max(counts.kd_tokens, 1.0))
        self._student = (batch, factor)
        try:
            yield
        finally:
            self._student = None

    def _student_hook(self, layer: int):
        def attach(module, args, output):
            if self._student is None:
                return None
            if isinstance(output, tuple):
                return (self._attach_loss(layer, output[0]),) + tuple(output[1:])
            return self._attach_loss(layer, output)
        return attach

    def _attach_loss(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The summed loss of one pair for the active microbatch (recorded for the report),
        attached to the layer's output ``[s, b, h_s]`` when gradients are being built."""
        batch, factor = self._student
        teacher = self.held.get((batch.index, self.teacher_of[layer]))
        if teacher is None:
            raise RuntimeError(f"no teacher hidden state of layer {self.teacher_of[layer]} for "
                               f"microbatch {batch.index} (student layer {layer})")
        projection = self.projections.get(layer)
        student = projection(hidden) if projection is not None else hidden.float()
        per_token = self.loss_fn(student, teacher.float())  # [s, b]
        mask = local_token_mask(kd_loss_mask(batch, self.kd.on_prompt), hidden.shape[0],
                                self.tp_rank, self.sequence_parallel)
        total = (per_token * mask.to(per_token.dtype)).sum()
        previous = self.sums.get(batch.index)
        self.sums[batch.index] = total.detach() if previous is None else previous + total.detach()
        if not (torch.is_grad_enabled() and hidden.requires_grad) or factor == 0.0:
            return hidden
        return attach_aux_loss(hidden, total * factor, self._loss_scale(hidden.device))

    def _loss_scale(self, device: torch.device) -> torch.Tensor:
        """The optimizer's loss scale (``grad_scale_func``, 1 in fp32/bf16), as megatron's
        schedule applies it to the main loss and to MoE's auxiliary losses."""
        scale = self.student_config.grad_scale_func
        ones = torch.ones(1, device=device)
        return scale(ones) if scale is not None else ones

    # -- report --------------------------------------------------------------------------

    def report(self, reported: List[Dict[str, torch.Tensor]],
               microbatches: Sequence[Microbatch]) -> List[Dict[str, torch.Tensor]]:
        """Add ``"hidden loss": [sum, KD tokens]`` to each microbatch's reported losses on the
        last stage. Collective over TP (under SP) and PP, in the same order on every rank:
        the per-microbatch sums ``[n_mb]`` (float64) are all-reduced."""
        sums = torch.zeros(len(microbatches), dtype=torch.float64, device=self.device)
        for position, batch in enumerate(microbatches):
            value = self.sums.pop(batch.index, None)
            if value is not None:
                sums[position] = value.double()
        self.sums.clear()
        if self.sequence_parallel and torch.distributed.get_world_size(self.tp_group) > 1:
            torch.distributed.all_reduce(sums, group=self.tp_group)
        if torch.distributed.get_world_size(self.pp_group) > 1:
            torch.distributed.all_reduce(sums, group=self.pp_group)
        for entry, batch, value in zip(reported, microbatches, sums):
            tokens = kd_loss_mask(batch, self.kd.on_prompt).float().sum()
            entry[HIDDEN_LOSS_NAME] = torch.stack([value.to(tokens.dtype), tokens])
        return reported

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def build_hidden_kd(kd: KDConfig, student_chunks: Sequence[torch.nn.Module],
                    teacher_chunks: Sequence[torch.nn.Module],
                    projections: Dict[int, HiddenProjection], seq_length: int,
                    micro_batch_size: int, sequence_parallel: bool) -> HiddenStateKD:
    """Collective over the pipeline group (which rank owns which layer). ``teacher_chunks``
    are the frozen teacher's, unwrapped; ``student_chunks`` may be DDP-wrapped."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_model_config

    teacher_config = get_model_config(teacher_chunks[0])
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tokens = seq_length // tp if sequence_parallel else seq_length
    return HiddenStateKD(kd, student_chunks, teacher_chunks, projections,
                         (tokens, micro_batch_size, teacher_config.hidden_size),
                         teacher_config.params_dtype, sequence_parallel)
