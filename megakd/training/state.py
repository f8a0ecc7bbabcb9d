"""The state of one training run: what setup builds and the loop advances."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch

from megakd.configs import KDRunConfig
from megakd.data import MicrobatchSource, Vocabulary
from megakd.distill import DistillationStep, TeacherSource
from megakd.formats.root_lock import RootLock
from megakd.generation import Generator
from megakd.runtime import RuntimeInfo
from megakd.training.nonfinite import SkipPolicy


@dataclass
class TrainingState:
    config: KDRunConfig
    runtime: RuntimeInfo
    student: List[torch.nn.Module]  # DDP-wrapped chunks
    teacher: Optional[TeacherSource]  # None: plain LM training (--kd-loss-weight 0)
    step: DistillationStep
    source: MicrobatchSource  # each iteration's microbatches
    optimizer: object  # megatron.core.optimizer.MegatronOptimizer
    scheduler: object  # megatron.core.optimizer_param_scheduler.OptimizerParamScheduler
    train_dataset: object
    vocab: Vocabulary
    skips: SkipPolicy  # non-finite iterations skipped so far (--skip-nonfinite-iterations)
    valid_dataset: object = None  # held-out split; None without --eval-interval
    tokenizer: object = None  # megatron.core.tokenizers tokenizer of the run
    tokenizer_identity: Optional[dict] = None  # stored in every checkpoint's megakd_model.json
    generator: Optional[Generator] = None  # the student's sampler (student data, --eval-generate)
    iteration: int = 0
    consumed_samples: int = 0
    save_lock: Optional[RootLock] = None  # rank 0's ownership of --save while training
    hooks: Optional["TrainingHooks"] = None  # the run's own (DistiLLM's schedule), run first


@dataclass
class TrainingHooks:
    """Callbacks the loop runs on every rank: after each training iteration (with its
    ``IterationRecord``), after each validation of the student (with its ``ValidationRecord``),
    and right before each checkpoint save. Hooks may read and change the state (e.g. a
    schedule that reacts to validation losses)."""

    after_step: List[Callable[["TrainingState", Any], None]] = field(
        default_factory=list)
    after_validation: List[Callable[["TrainingState", Any], None]] = field(
        default_factory=list)
    before_save: List[Callable[["TrainingState"], None]] = field(default_factory=list)

    def __add__(self, other: "TrainingHooks") -> "TrainingHooks":
        return TrainingHooks(self.after_step + other.after_step,
                             self.after_validation + other.after_validation,
                             self.before_save + other.before_save)
