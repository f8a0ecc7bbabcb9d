"""The pieces of intermediate-layer (hidden-state) KD that hold no communication: the per-token
losses, the student's learned projections and the autograd attachment of the loss.

Shapes follow megatron-core: a transformer layer's output is ``[s, b, h]``, or ``[s/tp, b, h]``
with sequence parallelism (teacher and student share TP and SP, so their shards hold the same
tokens). Per-token losses reduce the hidden dimension: ``[s, b, h] -> [s, b]``.

* :data:`HIDDEN_LOSSES`: ``cosine`` (``1 - cos(student, teacher)``) and ``mse`` (mean squared
  difference over the teacher's hidden size), computed in float32 whatever the model dtype.
* :class:`HiddenProjection`: ``h_student -> h_teacher`` without bias, a submodule of the student
  chunk that owns the paired layer (``kd_projections.layer<N>`` in its state dict, so it is in
  the optimizer and the distributed checkpoint). Its weight is replicated over TP; it is marked
  ``sequence_parallel`` so that under SP, where each TP rank sees only its sequence shard,
  megatron-core's ``finalize_model_grads`` sums its gradient over TP (as for norm weights).
* :func:`attach_aux_loss`: megatron's MoEAuxLossAutoScaler idiom. The layer's output passes
  through unchanged and the loss rides along in the autograd graph: when the output's gradient
  arrives (inside megatron's pipeline schedule, on the stage that owns the layer), the loss
  gets a gradient of ``scale`` (the optimizer's loss scale), so it backpropagates there with
  the main loss and no extra schedule step.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

PROJECTIONS_ATTRIBUTE = "kd_projections"  # the ModuleDict on the owning GPTModel chunk


def cosine_per_token(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos(student, teacher)`` over the hidden dim: ``[s, b, h] x2 -> [s, b]``."""
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)


def mse_per_token(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the hidden dim: ``[s, b, h] x2 -> [s, b]``."""
    return (student - teacher).pow(2).mean(dim=-1)


HIDDEN_LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cosine": cosine_per_token,
    "mse": mse_per_token,
}


class HiddenProjection(torch.nn.Module):
    """``y = x W^T``, ``W: [h_teacher, h_student]``, applied to the student layer's output.

    Initialised like ``torch.nn.Linear`` (uniform in ``±1/sqrt(h_student)``) from a generator
    seeded by the run's seed and the student layer number, so every rank and every parallel
    layout starts from the same matrix.
    """

    def __init__(self, student_hidden: int, teacher_hidden: int, seed: int, layer_number: int,
                 device: torch.device) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + layer_number)
        bound = 1.0 / math.sqrt(student_hidden)
        weight = torch.empty(teacher_hidden, student_hidden).uniform_(-bound, bound,
                                                                      generator=generator)
        self.weight = torch.nn.Parameter(weight.to(device))
        # finalize_model_grads all-reduces it over TP under sequence parallelism (replicated
        # weight, per-rank sequence shards); without SP every TP rank holds the same gradient.
        self.weight.sequence_parallel = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[s, b, h_student] -> [s, b, h_teacher]`` in float32."""
        return F.linear(hidden.float(), self.weight.float())


def projection_name(layer_number: int) -> str:
    return f"layer{layer_number}"


def attach_projections(chunks: Sequence[torch.nn.Module], student_layers: Sequence[int],
                       owned: Dict[int, int], student_hidden: int, teacher_hidden: int,
                       seed: int, device: torch.device) -> Dict[int, HiddenProjection]:
    """Give each chunk that owns a paired student layer a ``kd_projections`` ModuleDict (one
    :class:`HiddenProjection` per such layer) when the hidden sizes differ; returns them by
    layer number. ``owned`` maps this rank's layer numbers to their chunk index. Call before
    DDP wrapping and before the optimizer is built."""
    if student_hidden == teacher_hidden:
        return {}
    projections: Dict[int, HiddenProjection] = {}
    for layer in student_layers:
        if layer not in owned:
            continue
        chunk = chunks[owned[layer]]
        if not hasattr(chunk, PROJECTIONS_ATTRIBUTE):
            setattr(chunk, PROJECTIONS_ATTRIBUTE, torch.nn.ModuleDict())
        projection = HiddenProjection(student_hidden, teacher_hidden, seed, layer, device)
        getattr(chunk, PROJECTIONS_ATTRIBUTE)[projection_name(layer)] = projection
        projections[layer] = projection
    return projections


def is_projection_key(key: str) -> bool:
    """Whether a (sharded) state-dict key names a hidden-state projection."""
    return key.startswith(PROJECTIONS_ATTRIBUTE + ".")


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the activation; backward gives the aux loss a gradient of ``scale``."""

    @staticmethod
    def forward(ctx, activation: torch.Tensor, aux_loss: torch.Tensor, scale: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return activation

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, None]:
        (aux_loss,) = ctx.saved_tensors
        return grad, ctx.scale.to(aux_loss).reshape(aux_loss.shape), None


def attach_aux_loss(activation: torch.Tensor, aux_loss: torch.Tensor, scale: torch.Tensor
                    ) -> torch.Tensor:
    """``activation`` (``[s, b, h]``) with ``aux_loss`` (a scalar) attached for backward, where
    it gets the gradient ``scale`` (one element: the loss scale). The result is made viewless,
    as megatron's layers do: a pipeline stage's last output is sent and may be deallocated,
    which megatron refuses for views."""
    from megatron.core.utils import make_viewless_tensor

    out = _AttachAuxLoss.apply(activation, aux_loss, scale)
    return make_viewless_tensor(inp=out, requires_grad=out.requires_grad, keep_graph=True)


def local_token_mask(mask: torch.Tensor, local_tokens: int, tp_rank: int,
                     sequence_parallel: bool) -> torch.Tensor:
    """The KD mask ``[b, s]`` as the layer output's ``[s_local, b]``: transposed, and under
    sequence parallelism this TP rank's shard of the sequence."""
    mask = mask.t()
    if sequence_parallel:
        mask = mask[tp_rank * local_tokens:(tp_rank + 1) * local_tokens]
    return mask

