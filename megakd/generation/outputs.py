"""What generation returns, and how a decode loop's per-step record becomes it.

Both decode loops (megatron-core's static KV-cache loop and the full-forward reference) step
a batch in lockstep: the first step reads the logits after the shortest prompt, every later
step one position further. A row whose prompt is longer is still being fed its own prompt
tokens at the early steps; its samples there are discarded (``started`` is False).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import torch

from megakd.generation.sampling import Draw


@dataclass
class Generated:
    """One prompt's continuation.

    ``tokens`` are the new tokens only (the end-of-document token included when it was
    generated). ``logprobs[i]`` is the log-probability of ``tokens[i]`` under the sampling
    distribution actually used (tempered, top-k/top-p filtered, padded vocab excluded; for
    greedy, the distribution whose argmax was taken), ``full_logprobs[i]`` under the model's
    untempered, unfiltered distribution over the valid vocabulary. ``finished``: generation
    stopped at the end-of-document token, not at the token budget.
    """

    prompt: List[int]
    tokens: List[int]
    logprobs: List[float]
    full_logprobs: List[float]
    finished: bool


@dataclass
class DecodeTrace:
    """Every step's :class:`Draw` for a batch of ``b`` rows, and which rows had started
    generating at that step (``[b]`` bool: the row's prompt is fully consumed)."""

    draws: List[Draw] = field(default_factory=list)
    started: List[torch.Tensor] = field(default_factory=list)

    def record(self, draw: Draw, started: torch.Tensor) -> None:
        self.draws.append(draw)
        self.started.append(started.detach().to("cpu", torch.bool))


def assemble(prompts: Sequence[Sequence[int]], trace: DecodeTrace, max_new_tokens: int,
             eod: int) -> List[Generated]:
    """Per prompt: its started steps' draws, cut after the first ``eod`` or at the budget."""
    tokens = torch.stack([d.tokens.cpu() for d in trace.draws])  # [steps, b]
    logprobs = torch.stack([d.logprobs.cpu() for d in trace.draws])
    full_logprobs = torch.stack([d.full_logprobs.cpu() for d in trace.draws])
    started = torch.stack(trace.started)
    results = []
    for row, prompt in enumerate(prompts):
        steps = started[:, row].nonzero().view(-1)[:max_new_tokens]
        new = tokens[steps, row].tolist()
        length = new.index(eod) + 1 if eod in new else len(new)
        steps = steps[:length]
        results.append(Generated(
            prompt=list(prompt), tokens=new[:length],
            logprobs=logprobs[steps, row].tolist(),
            full_logprobs=full_logprobs[steps, row].tolist(),
            finished=length > 0 and new[length - 1] == eod,
        ))
    return results
