"""Worker bodies for tests/test_student_data.py: the student's own samples as training data
(GKD, DistiLLM adaptive) at TP=2 x PP=2 on chat data (one 4-rank launch)."""

from __future__ import annotations

import os
import signal
from typing import Dict, List, Optional, Sequence

import torch

from tests.data_workers import make_config
from tests.dist_harness import init_layout

ITERS = 6
# pure KD (the tiny random teacher and the data disagree: CE would pull the other way)
GKD = ["--kd-student-data-fraction", "0.5", "--gen-max-new-tokens", "8", "--eval-interval",
       str(ITERS), "--eval-iters", "1", "--kd-loss-weight", "1", "--lr", "3e-3"]
ADAPTIVE = ["--kd-adaptive-sgo", "--kd-sgo-initial-phi", "1.0", "--kd-sgo-replay-buffer-size",
            "3", "--gen-max-new-tokens", "8", "--eval-interval", "2", "--eval-iters", "1"]


def _flags(corpus: Dict[str, str], workdir: str) -> List[str]:
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            corpus["tokenizer"], "--data-path", corpus["chat"], "--dataset-format", "chat",
            "--split", "80,20,0", "--global-batch-size", "4", "--train-iters", str(ITERS),
            "--load", f"{workdir}/student", "--teacher-load", f"{workdir}/teacher"]


def save_models(rank: int, corpus: Dict[str, str], workdir: str) -> None:
    from megakd.formats.checkpoints import save_model_weights
    from megakd.training import setup

    flags = [f for f in _flags(corpus, workdir) if not f.startswith(f"{workdir}/")
             and f not in ("--load", "--teacher-load")]
    config = make_config(2, 2, int(os.environ["WORLD_SIZE"]), flags)
    state = setup(config, init_layout(config), log=lambda line: None)
    save_model_weights(state.student, f"{workdir}/student")
    save_model_weights(state.teacher.chunks, f"{workdir}/teacher")


def _sigterm_at(iteration: Optional[int], rank: int):
    def hook(state, record) -> None:
        if state.iteration == iteration and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def run(rank: int, corpus: Dict[str, str], workdir: str, extra: Sequence[str],
        sigterm_at: Optional[int] = None, fraction_zero_source: bool = False
        ) -> Dict[str, object]:
    """Train; per-iteration losses, validations, the buffer size, this rank's weights."""
    from megakd.configs import StudentDataConfig
    from megakd.distill import StudentDataMicrobatches
    from megakd.training import TrainingHooks, setup, train
    from megakd.training.evaluation import Validator

    config = make_config(2, 2, int(os.environ["WORLD_SIZE"]), [*_flags(corpus, workdir), *extra])
    state = setup(config, init_layout(config), log=lambda line: None)
    if fraction_zero_source:  # the student-data source at lambda = 0: all reference data
        state.source = StudentDataMicrobatches(state.source, state.generator,
                                               StudentDataConfig(fraction=0.0),
                                               config.generation, config.data.seq_length,
                                               ITERS, config.training.seed)
    start = (state.iteration, getattr(state.source, "buffer", None) and len(state.source.buffer))
    kd_before = None
    if "--kd-student-data-fraction" in extra and sigterm_at is None and state.iteration == 0:
        # the held-out window the end-of-training validation reads too
        kd_before = Validator(state).student_losses().get("kd loss")
    records = []
    hooks = TrainingHooks(after_step=[lambda s, r: records.append(r),
                                      _sigterm_at(sigterm_at, rank)])
    history = train(state, log=lambda line: None, hooks=hooks)
    params = torch.cat([p.detach().flatten() for c in state.student for p in c.parameters()])
    buffer = getattr(state.source, "buffer", None)
    schedule = getattr(state.source, "schedule", None)
    return {"start": start, "iterations": [r.iteration for r in records],
            "losses": [r.losses for r in records], "data": [r.data for r in records],
            "validations": [(v.iteration, v.losses) for v in history.validations
                            if v.model == "student"],
            "kd_before": kd_before, "exit_reason": history.exit_reason,
            "buffer": None if buffer is None else len(buffer),
            "phi": None if schedule is None else schedule.phi,
            "params": params.numpy()}
