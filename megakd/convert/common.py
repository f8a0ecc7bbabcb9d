"""Shared by both converters: dtypes, the single-rank megatron runtime, the megatron model at
TP=1/PP=1, staging directories, tokenizer files."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from typing import Iterator, List

import torch

from megakd.configs import ModelArchConfig, ParallelConfig
from megakd.convert.errors import ConversionError
from megakd.models import build_gpt_chunks
from megakd.runtime import initialize
from megakd.runtime.launcher import set_single_process_env

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
HF_DTYPES = {short: long for long, short in HF_DTYPE_NAMES.items()}
# Files copied to/from ROOT/tokenizer (whichever exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
TOKENIZER_DIRNAME = "tokenizer"


def single_rank_runtime() -> None:
    """megatron-core's groups at TP=1/PP=1 for this one process (gloo on CPU); reuses a
    running single-process group (tests), refuses to run under a multi-rank launcher."""
    from megatron.core import parallel_state

    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != 1:
        raise ConversionError("the converters run as one process (do not launch them with "
                              "torchrun/srun on several ranks)")
    set_single_process_env(overwrite=False)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    initialize(device="cpu", seed=0)


def build_tp1_model(arch: ModelArchConfig, padded_vocab_size: int, dtype: torch.dtype
                    ) -> torch.nn.Module:
    """One uninitialised megatron ``GPTModel`` (local spec, megatron's own attention) at
    TP=1/PP=1 in ``dtype``: the converters fill it or load into it."""
    (model,) = build_gpt_chunks(arch, ParallelConfig(), padded_vocab_size, 4096,
                                attention_backend="unfused", params_dtype=dtype,
                                perform_initialization=False)
    return model.eval()


def check_output_free(output: str, flag: str = "--output") -> None:
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ConversionError(f"{flag} {output} already exists and is not empty; nothing "
                              "was written")


@contextlib.contextmanager
def staged_output(output: str) -> Iterator[str]:
    """A sibling staging directory renamed to ``output`` when the block succeeds, removed
    when it fails, so ``output`` is either complete or absent."""
    staging = output.rstrip("/") + ".converting"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(output):
        os.rmdir(output)  # empty (check_output_free)
    os.replace(staging, output)


def copy_tokenizer_files(source: str, destination: str) -> List[str]:
    """Copy the tokenizer (and generation config) files found in ``source``."""
    found = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(source, name))]
    if found:
        os.makedirs(destination, exist_ok=True)
    for name in found:
        shutil.copy2(os.path.join(source, name), os.path.join(destination, name))
    return found
