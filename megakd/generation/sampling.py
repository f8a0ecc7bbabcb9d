"""One decode step's choice of the next token: filters, draw and log-probs.

The sampling distribution of a step is built from the full (TP-gathered) logits of the last
position, in this order:

1. padded vocab entries (ids >= ``vocab_size``, embedding rows added to make the vocabulary
   divisible) are dropped: the distribution lives on the tokenizer's ``vocab_size`` ids only;
2. divide by ``--gen-temperature``;
3. ``--gen-top-k``: keep the k largest logits (ties with the k-th are kept);
4. ``--gen-top-p``: keep the smallest set of most likely tokens whose probability (after
   top-k, renormalised) reaches p; the most likely token is always kept;
5. softmax. ``--gen-greedy`` takes its argmax, otherwise one token is drawn from it with
   this call's own ``torch.Generator`` (seeded per :meth:`Generator.generate` call; torch's
   global generators are never used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megakd.configs import GenerationConfig


@dataclass(frozen=True)
class Draw:
    """The tokens chosen at one decode step for a batch of ``b`` sequences.

    ``logprobs`` is ``log q(token)`` under the sampling distribution of the step (after
    temperature, top-k and top-p; for greedy, the distribution whose mode was taken);
    ``full_logprobs`` is ``log p(token)`` under the model's own distribution (temperature 1,
    no filter), both over the ``vocab_size`` valid ids only.
    """

    tokens: torch.Tensor  # [b] int64
    logprobs: torch.Tensor  # [b] float32
    full_logprobs: torch.Tensor  # [b] float32


def filtered_logits(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Tempered, top-k and top-p filtered logits ``[b, V]`` (float32; removed ids are
    ``-inf``) from valid-vocab logits ``[b, V]``."""
    scores = logits.float()
    if config.temperature != 1.0:
        scores = scores / config.temperature
    vocab = scores.size(-1)
    if 0 < config.top_k < vocab:
        kth_largest = torch.topk(scores, config.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_largest, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        removed_sorted = mass_before >= config.top_p  # position 0 always stays (0 < p)
        removed = torch.zeros_like(removed_sorted).scatter(-1, order, removed_sorted)
        scores = scores.masked_fill(removed, float("-inf"))
    return scores


class Sampler:
    """Chooses each step's tokens for one :meth:`Generator.generate` call.

    Args:
        config: temperature, top-k, top-p, greedy.
        vocab_size: valid token ids ``[0, vocab_size)``; logits beyond are padding.
        seed: seeds this sampler's own generator (created on the logits' device at the
            first draw), so draws depend only on ``seed`` and the logits.
    """

    def __init__(self, config: GenerationConfig, vocab_size: int, seed: int) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.seed = int(seed)
        self._generator: Optional[torch.Generator] = None

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor) -> Draw:
        """Next tokens from the last position's full logits ``[b, V_padded]``."""
        valid = logits[:, : self.vocab_size].float()
        scores = filtered_logits(valid, self.config)
        logprobs = F.log_softmax(scores, dim=-1)
        if self.config.greedy:
            tokens = scores.argmax(dim=-1)
        else:
            tokens = torch.multinomial(logprobs.exp(), 1, generator=self._rng(logits.device))
            tokens = tokens.view(-1)
        picked = tokens.unsqueeze(-1)
        return Draw(
            tokens=tokens.long(),
            logprobs=logprobs.gather(-1, picked).squeeze(-1),
            full_logprobs=F.log_softmax(valid, dim=-1).gather(-1, picked).squeeze(-1),
        )
