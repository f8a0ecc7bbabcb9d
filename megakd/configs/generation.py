"""How a model samples new tokens in-process (student samples for on-policy distillation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megakd.configs.fields import flag


@dataclass
class GenerationConfig:
    """Sampling of :class:`megakd.generation.Generator`: temperature, then top-k, then top-p,
    over the tokenizer's vocabulary (padded embedding rows are never sampled)."""

    temperature: float = flag(1.0, name="--gen-temperature", low=0.0, low_inclusive=False,
                              help="softmax temperature of generation")
    top_k: int = flag(0, name="--gen-top-k", low=0,
                      help="sample among the k most likely tokens (0: no top-k filter)")
    top_p: float = flag(1.0, name="--gen-top-p", low=0.0, high=1.0, low_inclusive=False,
                        help="nucleus sampling: the smallest set of tokens whose probability "
                             "reaches p, after top-k (1: no top-p filter)")
    max_new_tokens: int = flag(64, name="--gen-max-new-tokens", low=1,
                               help="new tokens per prompt at most (generation also stops at "
                                    "the end-of-document token)")
    greedy: bool = flag(False, name="--gen-greedy",
                        help="take the most likely token instead of sampling")


@dataclass
class BatchGenerationConfig:
    """``tools/generate.py``: prompts in, answered conversations out (docs/generation.md)."""

    prompts: Optional[str] = flag(None, name="--prompts", metavar="JSONL", required=True,
                                  help="chat JSONL of prompts (the formats training reads; a "
                                       "final assistant answer, if present, is the reference "
                                       "and is replaced)")
    output: Optional[str] = flag(None, name="--output", metavar="DIR", required=True,
                                 help="output directory: parts/ while running, then "
                                      "generated.jsonl; an interrupted run resumes here")
    prompts_per_part: int = flag(64, name="--prompts-per-part", low=1,
                                 help="prompts per output part (the unit of resumption and of "
                                      "one generation call)")
