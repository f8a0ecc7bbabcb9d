"""Batch generation over a prompts file (``tools/generate.py``): answers from any megakd
checkpoint at any TP/PP/DP layout, written as chat JSONL.

Prompts are numbered in file order and cut into parts of ``--prompts-per-part``; part ``k``
is generated in one call with the seed of (``--seed``, ``k``) and written by its model
replica (DP rank ``k mod DP``) to ``OUTPUT/parts/part_%06d.jsonl`` atomically (temp file,
fsync, rename). A rerun skips the parts already written and redoes the others with the same
seeds, so an interrupted run completed later writes the same bytes as an uninterrupted one,
at any data-parallel size. When every part is there, rank 0 concatenates them into
``OUTPUT/generated.jsonl``. Each record is ``{"messages": prompt + [assistant: answer],
"reference": the original answer or null, "finished": stopped at the end-of-document token,
"prompt_index": i}``, directly trainable with ``--dataset-format chat`` (sequence-level KD).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

import torch

from megakd.configs import ConfigError, GenerateRunConfig
from megakd.data import build_tokenizer_and_vocabulary
from megakd.data.chat_format import ChatKeys, Message, iter_conversations
from megakd.data.chat_template import split_prompt, tokenize_prompt
from megakd.formats.checkpoints import load_model_weights
from megakd.formats.fsutil import write_text_atomic
from megakd.generation.generator import Generator
from megakd.generation.rng import sampling_seed
from megakd.models import build_teacher

PARTS_DIRNAME = "parts"
OUTPUT_FILENAME = "generated.jsonl"


@dataclass
class Prompt:
    messages: List[Message]  # the conversation up to the answer
    reference: Optional[str]  # the original answer, when the file has one
    ids: List[int]


def read_prompts(config: GenerateRunConfig, tokenizer) -> List[Prompt]:
    """Every prompt of ``--prompts``, tokenized as training tokenizes it; a prompt that leaves
    no room for an answer in ``--seq-length`` is refused (ConfigError naming its line)."""
    data = config.data
    keys = ChatKeys(data.messages_key, data.prompt_key, data.response_key)
    prompts = []
    for line, messages in enumerate(iter_conversations(config.batch.prompts, keys,
                                                       prompts_only=True), start=1):
        context, reference = split_prompt(messages)
        ids = tokenize_prompt(tokenizer, context)
        if len(ids) >= data.seq_length:
            raise ConfigError(f"--prompts {config.batch.prompts}:{line}: the prompt has "
                              f"{len(ids)} tokens, no room for an answer in --seq-length "
                              f"{data.seq_length}")
        prompts.append(Prompt(context, reference, ids))
    if not prompts:
        raise ConfigError(f"--prompts {config.batch.prompts}: no prompts")
    return prompts


def part_path(output: str, part: int) -> str:
    return os.path.join(output, PARTS_DIRNAME, f"part_{part:06d}.jsonl")


def _records(prompts: List[Prompt], first_index: int, answers, tokenizer) -> str:
    lines = []
    for offset, (prompt, answer) in enumerate(zip(prompts, answers)):
        text = tokenizer.detokenize([t for t in answer.tokens if t != tokenizer.eod])
        lines.append(json.dumps({
            "messages": prompt.messages + [{"role": "assistant", "content": text.strip()}],
            "reference": prompt.reference, "finished": answer.finished,
            "prompt_index": first_index + offset}, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def generate_parts(config: GenerateRunConfig, generator: Generator, tokenizer,
                   prompts: List[Prompt], dp_rank: int, dp_size: int, is_writer: bool,
                   done: List[int], log: Callable[[str], None]) -> Tuple[int, float]:
    """Generate this replica's missing parts; returns (new tokens, seconds)."""
    per_part = config.batch.prompts_per_part
    parts = range((len(prompts) + per_part - 1) // per_part)
    mine = [part for part in parts if part % dp_size == dp_rank and part not in set(done)]
    tokens, start = 0, time.perf_counter()
    for count, part in enumerate(mine, start=1):
        chunk = prompts[part * per_part:(part + 1) * per_part]
        room = config.data.seq_length - max(len(p.ids) for p in chunk)
        sampling = replace(config.generation,
                           max_new_tokens=min(config.generation.max_new_tokens, room))
        answers = generator.generate([p.ids for p in chunk], sampling,
                                     sampling_seed(config.training.seed, part, 0))
        tokens += sum(len(a.tokens) for a in answers)
        if is_writer:
            write_text_atomic(part_path(config.batch.output, part),
                              _records(chunk, part * per_part, answers, tokenizer))
        if is_writer and dp_rank == 0:
            elapsed = time.perf_counter() - start
            rate = tokens / elapsed if elapsed > 0 else 0.0
            eta = elapsed / count * (len(mine) - count)
            log(f"generate: part {part} done | {count}/{len(mine)} parts of DP rank 0 | "
                f"{rate * dp_size:.1f} tokens/s (all {dp_size} DP ranks) | elapsed "
                f"{elapsed:.0f} s | ETA {eta:.0f} s")
    return tokens, time.perf_counter() - start


def finished_parts(output: str, count: int) -> List[int]:
    """Parts already written under their final name (a ``.tmp`` is an interrupted write)."""
    return [part for part in range(count) if os.path.isfile(part_path(output, part))]


def merge_parts(output: str, count: int) -> str:
    """Concatenate every part, in order, into ``generated.jsonl`` (atomically)."""
    texts = []
    for part in range(count):
        with open(part_path(output, part), encoding="utf-8") as handle:
            texts.append(handle.read())
    path = os.path.join(output, OUTPUT_FILENAME)
    write_text_atomic(path, "".join(texts))
    return path


def part_count(prompts: List[Prompt], per_part: int) -> int:
    return (len(prompts) + per_part - 1) // per_part


def broadcast_object(value):
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def run_batch_generation(config: GenerateRunConfig, device: torch.device,
                         log: Callable[[str], None] = print) -> Optional[str]:
    """Collective over all ranks of the initialised process groups: generate every missing
    part and merge them. Returns the output file on rank 0 (None elsewhere)."""
    from megatron.core import parallel_state

    tokenizer, vocab = build_tokenizer_and_vocabulary(
        config.data, config.parallel.tensor_model_parallel_size)
    prompts = read_prompts(config, tokenizer)
    count = part_count(prompts, config.batch.prompts_per_part)
    if torch.distributed.get_rank() == 0:
        os.makedirs(os.path.join(config.batch.output, PARTS_DIRNAME), exist_ok=True)
    done = broadcast_object(finished_parts(config.batch.output, count)
                            if torch.distributed.get_rank() == 0 else None)
    chunks = build_teacher(config.model, config.parallel, vocab.padded,
                           config.data.max_position_embeddings, bf16=config.training.bf16,
                           device=device, attention_backend=config.runtime.attention_backend)
    load_model_weights(chunks, config.checkpoint.load, flag="--load")
    generator = Generator(chunks, vocab.valid, tokenizer.eod, config.data.seq_length,
                          max_batch_size=config.batch.prompts_per_part)
    is_writer = (parallel_state.get_tensor_model_parallel_rank() == 0
                 and parallel_state.get_pipeline_model_parallel_rank() == 0)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    tokens, seconds = generate_parts(config, generator, tokenizer, prompts, dp_rank, dp_size,
                                     is_writer, done, log)
    totals = torch.tensor([tokens, seconds], dtype=torch.float64)
    # every TP/PP rank of a replica counts the same tokens: sum over DP replicas only
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    if torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
        return None
    path = merge_parts(config.batch.output, count)
    torch.distributed.barrier()
    log(f"generate: {len(prompts)} prompts, {count} parts ({len(done)} already done); "
        f"{int(totals[0])} new tokens this run; wrote {path}")
    return path
