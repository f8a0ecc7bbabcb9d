"""The state of one training run: what setup builds and the loop advances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from megakd.configs import KDRunConfig
from megakd.data import MicrobatchSource
from megakd.distill import DistillationStep, TeacherSource, Vocabulary
from megakd.formats.root_lock import RootLock
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
    tokenizer_identity: Optional[dict] = None  # stored in every checkpoint's megakd_model.json
    iteration: int = 0
    consumed_samples: int = 0
    save_lock: Optional[RootLock] = None  # rank 0's ownership of --save while training
