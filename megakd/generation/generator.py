"""In-process generation from a megakd model on its own TP/PP layout.

:class:`Generator` wraps the model chunks of this rank; :meth:`Generator.generate` is called
by every rank of a model replica (the TP x PP group) with the same prompts and seed, and
returns the same :class:`~megakd.generation.outputs.Generated` list on every one of them.
Data-parallel replicas are independent: each passes its own prompts and seed
(:func:`~megakd.generation.rng.sampling_seed`), and nothing crosses the DP group.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence

import torch
from megatron.core.utils import get_model_config, unwrap_model

from megakd.configs import ConfigError, GenerationConfig, check_bounds
from megakd.generation.full_forward import decode_full_forward
from megakd.generation.outputs import DecodeTrace, Generated, assemble
from megakd.generation.rng import preserved_rng_states
from megakd.generation.sampling import Sampler
from megakd.generation.static_engine import decode_with_kv_cache

ENGINES = ("auto", "static", "full-forward")


@contextlib.contextmanager
def _eval_mode(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Every module of ``chunks`` in eval mode inside the block, back to its own mode after."""
    modes = [(module, module.training) for chunk in chunks for module in chunk.modules()]
    for chunk in chunks:
        chunk.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _resolve_engine(engine: str, models: Sequence[torch.nn.Module]) -> str:
    """``static`` (KV cache) where megatron-core's static loop supports the layout, else
    ``full-forward``; a ConfigError when ``static`` is asked for where it cannot run."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    blockers = []
    if len(models) > 1:
        blockers.append("--num-layers-per-virtual-pipeline-stage (virtual pipeline chunks)")
    if get_model_config(models[0]).sequence_parallel:
        blockers.append("--sequence-parallel")
    if engine == "static" and blockers:
        raise ConfigError(f"megatron-core's static inference (KV cache) does not support "
                          f"{' or '.join(blockers)}; generate with engine 'auto' or "
                          "'full-forward' (no KV cache) or drop the flag")
    if engine == "auto":
        return "full-forward" if blockers else "static"
    return engine


class Generator:
    """Samples continuations of token-id prompts from a model, on the model's own layout.

    Args:
        chunks: this rank's GPTModel chunks (one, or one per virtual pipeline stage), as
            megakd builds them; DDP / Float16Module wrappers are looked through.
        vocab_size: the tokenizer's vocabulary size; ids ``>= vocab_size`` are embedding
            padding and are never sampled.
        eod: end-of-document id; a prompt's generation stops after generating it.
        max_sequence_length: the longest sequence the model takes (``--seq-length``); the
            longest prompt plus ``--gen-max-new-tokens`` must fit.
        engine: ``"auto"`` (default): megatron-core's static loop with a KV cache, or the
            full-forward path under virtual pipelining or sequence parallelism, which that
            loop refuses; ``"static"``: the KV cache or a ConfigError; ``"full-forward"``:
            the reference path (no KV cache, any layout).
        max_batch_size: prompts decoded together (the KV cache holds
            ``max_batch_size x (longest prompt + new tokens)`` keys and values per layer).
    """

    def __init__(self, chunks: List[torch.nn.Module], vocab_size: int, eod: int,
                 max_sequence_length: int, *, engine: str = "auto",
                 max_batch_size: int = 64) -> None:
        self.chunks = list(chunks)
        self.models = unwrap_model(self.chunks)
        padded = self.models[-1].vocab_size
        if not 0 < vocab_size <= padded:
            raise ValueError(f"vocab_size {vocab_size} must be in [1, {padded}] (the model's "
                             "padded vocabulary)")
        if not 0 <= eod < vocab_size:
            raise ValueError(f"eod {eod} is not a token id of the vocabulary [0, {vocab_size})")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        self.vocab_size = vocab_size
        self.eod = eod
        self.max_sequence_length = max_sequence_length
        self.max_batch_size = max_batch_size
        self.engine = _resolve_engine(engine, self.models)

    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                 seed: int) -> List[Generated]:
        """One :class:`Generated` per prompt, in order, identical on every rank of the replica.

        ``seed`` determines the samples, given the prompts, the weights and
        ``max_batch_size`` (prompts are decoded in batches sorted by length, and a batch's rows
        share the sampler's stream). The training RNG streams are restored afterwards and the
        chunks return to their modes.
        Raises ConfigError when the config is out of bounds or the longest prompt plus
        ``--gen-max-new-tokens`` exceeds ``--seq-length``.
        """
        checked = self._checked_prompts(prompts, config)
        sampler = Sampler(config, self.vocab_size, seed)
        # Decode prompts of similar length together: both loops feed a batch's longer prompts
        # one token per step after the shortest one.
        order = sorted(range(len(checked)), key=lambda index: len(checked[index]))
        results: List[Optional[Generated]] = [None] * len(checked)
        with preserved_rng_states(), _eval_mode(self.chunks):
            for start in range(0, len(order), self.max_batch_size):
                indices = order[start:start + self.max_batch_size]
                batch = [checked[index] for index in indices]
                trace = self._decode(batch, sampler, config.max_new_tokens)
                for index, result in zip(indices, assemble(batch, trace, config.max_new_tokens,
                                                           self.eod)):
                    results[index] = result
        return results

    def _decode(self, prompts: List[List[int]], sampler: Sampler,
                max_new_tokens: int) -> DecodeTrace:
        if self.engine == "static":
            return decode_with_kv_cache(self.models[0], prompts, sampler, max_new_tokens,
                                        self.eod)
        config = get_model_config(self.models[0])
        multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
        return decode_full_forward(self.models, prompts, sampler, max_new_tokens, self.eod,
                                   sequence_multiple=multiple)

    def _checked_prompts(self, prompts: Sequence[Sequence[int]],
                         config: GenerationConfig) -> List[List[int]]:
        problems = check_bounds(config)
        if problems:
            raise ConfigError("; ".join(problems))
        checked = [[int(token) for token in prompt] for prompt in prompts]
        for index, prompt in enumerate(checked):
            if not prompt:
                raise ValueError(f"prompt {index} is empty (generation needs a first token)")
            if not all(0 <= token < self.vocab_size for token in prompt):
                raise ValueError(f"prompt {index} holds ids outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        longest = max((len(prompt) for prompt in checked), default=0)
        if longest + config.max_new_tokens > self.max_sequence_length:
            raise ConfigError(
                f"--gen-max-new-tokens {config.max_new_tokens} plus the longest prompt "
                f"({longest} tokens) exceeds --seq-length {self.max_sequence_length}: lower "
                "--gen-max-new-tokens or shorten the prompts")
        return checked
