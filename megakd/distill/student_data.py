"""The student's own samples as training data: GKD's mix and DistiLLM's adaptive schedule.

:class:`StudentDataMicrobatches` is a :class:`~megakd.data.MicrobatchSource` that wraps the
reference data. For each microbatch it draws one number u ~ U(0, 1) from a stream keyed by
(seed, iteration, DP rank, microbatch), the same on every TP/PP rank of a model replica, and:

* **GKD** (``--kd-student-data-fraction`` λ): u < λ -> the student samples answers to the
  microbatch's prompts (λ = 1: on-policy);
* **DistiLLM adaptive** (``--kd-adaptive-sgo``, ``jongwooko/distillm`` ``finetune.py``): with
  φ the schedule's value and t/T the training progress, u < φ·(1 − t/T), or u < φ while the
  replay buffer is not yet full -> fresh samples (also stored in the buffer); else u < φ ->
  samples drawn uniformly from the buffer; else the reference data. φ starts at
  ``--kd-sgo-initial-phi`` and rises by ``--kd-sgo-phi-step`` (capped at 1) after a validation
  whose CE exceeds the last reference value by more than ``--kd-sgo-loss-eps``; that value
  then becomes the reference (the first validation, before training, sets it).

A student sample keeps the prompt and replaces the last answer: the KD term covers the
student's answer (``kd_mask``), the CE term none of it (CE applies to reference answers only).
A row whose prompt leaves no room for a new token keeps its reference answer. Generation runs
on the student's own TP/PP layout (:class:`megakd.generation.Generator`), seeded per
(seed, iteration, DP rank, microbatch) and never touching the training RNG. The buffer and
the schedule are this source's state, saved with every checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import time
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megakd.configs import GenerationConfig, StudentDataConfig
from megakd.data import DatasetMicrobatches, Microbatch
from megakd.data.batches import collate
from megakd.data.packing import generated_sample, last_response
from megakd.generation import Generator, sampling_seed

FRESH, REPLAY, REFERENCE = "fresh", "replay", "reference"


def _uniform(*key: object) -> float:
    """A U(0, 1) draw determined by ``key`` (no generator state to checkpoint)."""
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


class AdaptiveSchedule:
    """DistiLLM's φ: the probability mass given to student samples, raised when validation CE
    on reference answers worsens."""

    def __init__(self, config: StudentDataConfig) -> None:
        self.config = config
        self.phi = config.initial_phi
        self.reference_loss: Optional[float] = None

    def thresholds(self, progress: float) -> Tuple[float, float]:
        """(fresh-sample threshold φ·(1 − t/T), student-data threshold φ)."""
        return self.phi * (1.0 - progress), self.phi

    def observe(self, validation_ce: float) -> None:
        if self.reference_loss is None:
            self.reference_loss = validation_ce
        elif validation_ce >= self.reference_loss + self.config.loss_eps:
            self.phi = min(1.0, self.phi + self.config.phi_step)
            self.reference_loss = validation_ce

    def state_dict(self) -> dict:
        return {"phi": self.phi, "reference_loss": self.reference_loss}

    def load_state_dict(self, state: dict) -> None:
        self.phi, self.reference_loss = float(state["phi"]), state["reference_loss"]


class ReplayBuffer:
    """The last ``capacity`` student samples (prompt and answer ids), drawn uniformly."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.samples: Deque[Tuple[List[int], List[int]]] = collections.deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def full(self) -> bool:
        return len(self.samples) >= self.capacity

    def add(self, samples: Sequence[Tuple[List[int], List[int]]]) -> None:
        self.samples.extend(samples)

    def draw(self, count: int, seed: int) -> List[Tuple[List[int], List[int]]]:
        picks = np.random.default_rng(seed).choice(len(self.samples), size=count,
                                                   replace=len(self.samples) < count)
        return [self.samples[int(i)] for i in picks]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "samples": [list(s) for s in self.samples]}

    def load_state_dict(self, state: dict) -> None:
        self.samples = collections.deque((tuple(s) for s in state["samples"]),
                                         maxlen=self.capacity)


def choose(u: float, student_data: StudentDataConfig, schedule: Optional[AdaptiveSchedule],
           buffer: Optional[ReplayBuffer], progress: float) -> str:
    """Which data microbatch with draw ``u`` holds (module docstring)."""
    if schedule is None:
        return FRESH if u < student_data.fraction else REFERENCE
    fresh, student = schedule.thresholds(progress)
    if u < fresh or (u < student and not buffer.full):
        return FRESH
    if u < student and len(buffer) > 0:
        return REPLAY
    return REFERENCE


class StudentDataMicrobatches:
    """Reference microbatches, some of them answered by the student (module docstring)."""

    def __init__(self, reference: DatasetMicrobatches, generator: Generator,
                 student_data: StudentDataConfig, generation: GenerationConfig,
                 seq_length: int, train_iters: int, seed: int) -> None:
        self.reference = reference
        self.generator = generator
        self.student_data, self.generation = student_data, generation
        self.seq_length, self.train_iters, self.seed = seq_length, train_iters, seed
        self.schedule = AdaptiveSchedule(student_data) if student_data.adaptive else None
        self.buffer = (ReplayBuffer(student_data.replay_buffer_size)
                       if student_data.adaptive else None)
        self._report: Dict[str, float] = {}

    def microbatches(self, consumed_samples: int) -> List[Microbatch]:
        iteration = consumed_samples // self.reference.global_batch_size
        progress = min(1.0, iteration / self.train_iters)
        generated_tokens, seconds, kinds = 0, 0.0, collections.Counter()
        out = []
        for batch in self.reference.microbatches(consumed_samples):
            key = (self.seed, iteration, self.reference.data_parallel_rank, batch.index)
            kind = choose(_uniform("megakd-sgo", *key), self.student_data, self.schedule,
                          self.buffer, progress)
            kinds[kind] += 1
            if kind == FRESH:
                start = time.perf_counter()
                batch, tokens = self._fresh(batch, key)
                seconds += time.perf_counter() - start
                generated_tokens += tokens
            elif kind == REPLAY:
                batch = self._replay(batch, key)
            out.append(batch)
        self._report = {"generated tokens": float(generated_tokens), "generation seconds": seconds,
                        **{f"{kind} microbatches": float(n) for kind, n in kinds.items()}}
        return out

    def _fresh(self, batch: Microbatch, key: tuple) -> Tuple[Microbatch, int]:
        """The batch with each row's last answer replaced by the student's (collective over
        the model replica: every TP/PP rank generates the same)."""
        rows = [last_response(batch.tokens[i].cpu(), batch.labels[i].cpu(),
                              batch.loss_mask[i].cpu()) for i in range(batch.tokens.shape[0])]
        usable = [i for i, row in enumerate(rows)
                  if row is not None and len(row[0]) < self.seq_length]
        if not usable:
            return batch, 0
        prompts = [rows[i][0] for i in usable]
        room = self.seq_length - max(len(p) for p in prompts)
        config = dataclasses.replace(self.generation,
                                     max_new_tokens=min(self.generation.max_new_tokens, room))
        seed = sampling_seed(self.seed, key[1] * 1_000_003 + key[3], key[2])
        answers = [g.tokens for g in self.generator.generate(prompts, config, seed)]
        if self.buffer is not None:
            self.buffer.add(list(zip(prompts, answers)))
        samples = self._rows(batch)
        for i, prompt, answer in zip(usable, prompts, answers):
            samples[i] = generated_sample(prompt, answer, self.seq_length)
        return collate(samples, batch.index, batch.tokens.device), sum(map(len, answers))

    def _replay(self, batch: Microbatch, key: tuple) -> Microbatch:
        seed = sampling_seed(self.seed, key[1] * 1_000_003 + key[3], key[2]) ^ 0x5EED
        drawn = self.buffer.draw(batch.tokens.shape[0], seed)
        samples = [generated_sample(prompt, answer, self.seq_length) for prompt, answer in drawn]
        return collate(samples, batch.index, batch.tokens.device)

    @staticmethod
    def _rows(batch: Microbatch) -> List[Dict[str, torch.Tensor]]:
        """The batch's rows as samples, every one with a ``kd_mask`` (its loss mask)."""
        rows = []
        for i in range(batch.tokens.shape[0]):
            row = {"tokens": batch.tokens[i].cpu(), "labels": batch.labels[i].cpu(),
                   "loss_mask": batch.loss_mask[i].cpu(),
                   "kd_mask": batch.loss_mask[i].cpu(),
                   "position_ids": batch.position_ids[i].cpu()}
            if batch.prompt_mask is not None:
                row["prompt_mask"] = batch.prompt_mask[i].cpu()
            rows.append(row)
        return rows

    def observe_validation(self, validation_ce: float) -> None:
        """DistiLLM's φ update from a validation CE (the same value on every rank)."""
        if self.schedule is not None:
            self.schedule.observe(validation_ce)

    def report(self) -> Dict[str, float]:
        return dict(self._report)

    def state_dict(self) -> dict:
        if self.schedule is None:
            return {}
        return {"schedule": self.schedule.state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.schedule is not None and state:
            self.schedule.load_state_dict(state["schedule"])
            self.buffer.load_state_dict(state["buffer"])
