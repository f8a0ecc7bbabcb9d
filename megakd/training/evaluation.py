"""Validation on the held-out split (``--eval-interval``, ``--eval-iters``).

As Megatron-LM, each validation reads the *next* ``--eval-iters`` global batches of the
validation split (the split holds one window per validation, see
:func:`megakd.training.setup.validation_samples`). The student runs forward-only in ``eval()``
mode and reports its CE (``lm loss``) and, with a teacher, the KD divergence (``kd loss``), each
a token mean over all the window's microbatches and data-parallel ranks. Once, before training,
the teacher's own CE on the first window is the baseline the student's ``lm loss`` is compared to.

Validation leaves training untouched: it reads a different dataset, does not move
``consumed_samples``, restores each chunk's train/eval mode, and builds no gradients.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from megakd.data import Microbatch, iteration_microbatches
from megakd.distill import LiveTeacher, reduce_reported
from megakd.training.generation_eval import EXACT_MATCH, ROUGE, GenerationEvaluator
from megakd.training.state import TrainingState


@dataclass
class ValidationRecord:
    """One validation: after ``iteration`` training iterations, of ``model`` ("student", or
    "teacher" for the baseline); token means (on the last pipeline stage, ``{}`` elsewhere)."""

    iteration: int
    model: str
    losses: Dict[str, float]


@contextlib.contextmanager
def eval_mode(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """``eval()`` on every chunk for the block, then each chunk's previous mode back."""
    was_training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        yield
    finally:
        for chunk, training in zip(chunks, was_training):
            chunk.train(training)


class Validator:
    """Runs the validations of one training run; ``windows_done`` counts the windows read."""

    def __init__(self, state: TrainingState) -> None:
        if state.valid_dataset is None:
            raise ValueError("--eval-interval needs a validation split (none was built: check "
                             "that --split gives the validation split a weight)")
        self.state = state
        self.interval = state.config.eval.interval
        self.eval_iters = state.config.eval.iters
        # DistiLLM's schedule compares every validation with one before training.
        self.initial = state.config.student_data.adaptive
        # A resumed run continues after the windows its earlier validations read.
        self.windows_done = state.iteration // self.interval + int(self.initial)
        self.generation = _generation_evaluator(state)
        self.last_example: Optional[str] = None  # one generated answer (--eval-generate)

    @property
    def has_teacher(self) -> bool:
        """A teacher model to compute the baseline with (not a cache: it holds no CE)."""
        return isinstance(self.state.teacher, LiveTeacher)

    def due(self, iteration: int) -> bool:
        """Periodic validation after this iteration? (The last iteration is left to the
        end-of-training validation.)"""
        train_iters = self.state.config.training.train_iters
        return iteration % self.interval == 0 and iteration < train_iters

    def _window(self, window: int, eval_iter: int) -> List[Microbatch]:
        from megatron.core import parallel_state

        train = self.state.config.training
        first_sample = (window * self.eval_iters + eval_iter) * train.global_batch_size
        return iteration_microbatches(
            self.state.valid_dataset, first_sample, train.global_batch_size,
            train.micro_batch_size, parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(), self.state.runtime.device,
        )

    def student_losses(self) -> Dict[str, float]:
        """The student's ``lm loss`` (and ``kd loss``) on the next window; token means on the
        last pipeline stage, ``{}`` elsewhere."""
        from megatron.core import parallel_state

        reported: List[dict] = []
        with eval_mode(self.state.student):
            for eval_iter in range(self.eval_iters):
                microbatches = self._window(self.windows_done, eval_iter)
                reported += self.state.step.run(microbatches, forward_only=True)
        self.windows_done += 1
        dp_group = parallel_state.get_data_parallel_group()
        losses = reduce_reported(reported, dp_group)
        if self.generation is not None:
            metrics, self.last_example = self.generation.evaluate(dp_group)
            losses.update(metrics)
        return losses

    def teacher_losses(self) -> Dict[str, float]:
        """The teacher's own ``lm loss`` on the first window (the one the first validation
        reads); ``{}`` off the last stage or without a teacher."""
        from megatron.core import parallel_state

        if not self.has_teacher:
            return {}
        reported: List[dict] = []
        for eval_iter in range(self.eval_iters):
            reported += self.state.teacher.cross_entropy(self._window(0, eval_iter))
        return reduce_reported(reported, parallel_state.get_data_parallel_group())


def _generation_evaluator(state: TrainingState) -> Optional[GenerationEvaluator]:
    from megatron.core import parallel_state

    config = state.config
    if not config.eval.generate:
        return None
    return GenerationEvaluator(
        state.valid_dataset, config.eval.generate, state.generator, state.tokenizer,
        config.generation, config.data.seq_length, parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(), state.runtime.device)


def validation_scalars(losses: Dict[str, float], prefix: str = "") -> Dict[str, float]:
    """TensorBoard/W&B tags for validation losses, as Megatron-LM: ``lm loss validation``,
    ``lm loss validation ppl``, ``kd loss validation`` (``prefix`` e.g. ``"teacher "``)."""
    scalars = {}
    for name, value in losses.items():
        scalars[f"{prefix}{name} validation"] = value
        if name == "lm loss":
            scalars[f"{prefix}{name} validation ppl"] = math.exp(min(20.0, value))
    return scalars


def format_validation(title: str, losses: Dict[str, float]) -> str:
    """Megatron-LM's validation block: the losses (perplexity for ``lm loss``) between rules."""
    line = f" {title} | "
    for name in ("lm loss", "kd loss", "hidden loss"):
        if name in losses:
            line += f"{name} value: {losses[name]:.6E} | "
            if name == "lm loss":
                line += f"{name} PPL: {math.exp(min(20.0, losses[name])):.6E} | "
    for name in (ROUGE, EXACT_MATCH):
        if name in losses:
            line += f"{name}: {losses[name]:.4f} | "
    rule = "-" * (len(line) + 1)
    return "\n".join([rule, line, rule])
