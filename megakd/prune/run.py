"""``tools/prune.py``'s body: importance on the loaded model, the plan, the pruned checkpoint.

1. The model of ``--load`` is built at the run's TP/PP layout (megatron-core's local spec, whose
   separate norms the hidden-channel statistics hook) and loaded.
2. One calibration pass (:mod:`megakd.prune.calibration`) collects the statistics
   (:mod:`megakd.prune.statistics`), gathered so every rank holds every layer's; with
   ``--layer-importance lm-loss`` one more pass per layer leaves that layer out.
3. Every rank computes the same :class:`~megakd.prune.plan.PruningPlan` from the scores.
4. The model is freed and the pruned checkpoint is written from the source's global tensors
   (:mod:`megakd.prune.writer`): ``--save/release`` with ``megakd_model.json`` (the pruned
   architecture, the source's head dim and query groups, vocabulary and tokenizer identity)
   and ``pruning.json`` (source, targets, calibration, the plan and the scores), plus the
   source root's ``tokenizer/`` files when it has them.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import time
from typing import Callable, Dict, Tuple

import torch

from megakd.configs import ModelArchConfig, PruneRunConfig
from megakd.data import build_gpt_datasets, build_tokenizer
from megakd.formats.checkpoints import (
    STAGING_SUFFIX,
    checkpoint_name,
    load_model_weights,
    resolve_checkpoint_dir,
    write_tracker,
)
from megakd.formats.model_metadata import arch_from_metadata, model_metadata, read_model_metadata
from megakd.models import build_teacher
from megakd.prune.calibration import calibrate, calibration_microbatches, layer_left_out
from megakd.prune.importance import Importance, importance_from
from megakd.prune.plan import PruningPlan, plan_pruning
from megakd.prune.statistics import StatisticsCollector, gather_statistics
from megakd.prune.writer import write_pruned_checkpoint

REPORT_FILENAME = "pruning.json"
TOKENIZER_DIRNAME = "tokenizer"  # a converted checkpoint root's tokenizer files


def _calibration_data(config: PruneRunConfig, device: torch.device):
    from megatron.core import parallel_state

    tokenizer = build_tokenizer(config.data)
    mbs, count = config.training.micro_batch_size, config.prune.calib_batches
    train, _, _ = build_gpt_datasets(config.data, tokenizer, [count * mbs, 0, 0],
                                     config.training.seed)
    batches = calibration_microbatches(train, count, mbs,
                                       parallel_state.get_data_parallel_rank(),
                                       parallel_state.get_data_parallel_world_size(), device)
    return tokenizer, batches


def measure_importance(config: PruneRunConfig, padded_vocab: int, device: torch.device,
                       log: Callable[[str], None]) -> Tuple[Importance, Dict[str, float]]:
    """Collective: the importance of every head, neuron, hidden channel and layer of the
    ``--load`` model, measured at the run's layout; and the calibration figures."""
    tokenizer, batches = _calibration_data(config, device)
    arch, mbs, seq = config.model, config.training.micro_batch_size, config.data.seq_length
    chunks = build_teacher(arch, config.parallel, padded_vocab,
                           config.data.max_position_embeddings, bf16=config.training.bf16,
                           device=device, attention_backend="sdpa")
    load_model_weights(chunks, config.checkpoint.load, flag="--load")
    collector = StatisticsCollector(chunks)
    start = time.perf_counter()
    loss, tokens = calibrate(chunks, batches, seq, mbs, tokenizer.vocab_size, device)
    collector.remove()
    importance = importance_from(gather_statistics(collector.layers, device), arch.head_dim)
    figures = {"lm_loss": loss / max(tokens, 1), "loss_tokens": tokens,
               "seconds_per_pass": time.perf_counter() - start}
    log(f"prune: calibration LM loss {figures['lm_loss']:.4f} over {tokens} tokens "
        f"({config.prune.calib_batches} microbatches of {mbs}; "
        f"{figures['seconds_per_pass']:.1f} s)")
    depth_pruned = (config.prune.target_num_layers or arch.num_layers) < arch.num_layers
    if config.prune.layer_importance == "lm-loss" and depth_pruned:
        for layer in range(arch.num_layers):
            with layer_left_out(chunks, layer):
                left_out, _ = calibrate(chunks, batches, seq, mbs, tokenizer.vocab_size, device)
            importance.layers[layer] = left_out / max(tokens, 1)
            log(f"prune: layer {layer} left out: LM loss {importance.layers[layer]:.4f}")
    del chunks
    gc.collect()
    return importance, figures


def _report(config: PruneRunConfig, plan: PruningPlan, importance: Importance,
            figures: Dict[str, float]) -> dict:
    return {
        "source": os.path.abspath(config.checkpoint.load),
        "source_architecture": dataclasses.asdict(config.model),
        "targets": dataclasses.asdict(config.prune),
        "calibration": {"batches": config.prune.calib_batches,
                        "micro_batch_size": config.training.micro_batch_size,
                        "seq_length": config.data.seq_length, **figures},
        "plan": plan.as_json(),
        "scores": {"layers": {str(k): v for k, v in sorted(importance.layers.items())},
                   "hidden": importance.hidden.tolist(),
                   "heads": {str(k): v.tolist() for k, v in sorted(importance.heads.items())}},
    }


def pruned_metadata(source: dict, pruned: ModelArchConfig, padded_vocab: int) -> dict:
    """``megakd_model.json`` of the pruned model: its architecture, the source's vocabulary
    width and tokenizer, and the source's dtype / HF origin when it records them."""
    metadata = model_metadata(pruned, padded_vocab, source.get("tokenizer"))
    for key in ("dtype", "hf"):
        if key in source:
            metadata[key] = source[key]
    return metadata


def run_prune(config: PruneRunConfig, device: torch.device,
              log: Callable[[str], None] = print) -> PruningPlan:
    """Collective over all ranks of the initialised process groups: prune ``--load`` into
    ``--save`` (a release checkpoint root); rank 0 logs. Returns the plan (the same on every
    rank)."""
    rank = torch.distributed.get_rank()
    log = log if rank == 0 else (lambda line: None)
    source_dir = resolve_checkpoint_dir(config.checkpoint.load, "--load")
    source = read_model_metadata(source_dir)
    _, padded_vocab, _ = arch_from_metadata(source, f"--load {config.checkpoint.load}")
    importance, figures = measure_importance(config, padded_vocab, device, log)
    plan = plan_pruning(importance, config.model, config.prune)
    pruned = config.pruned
    root = config.checkpoint.save
    directory = os.path.join(root, checkpoint_name(None))
    report = json.dumps(_report(config, plan, importance, figures), indent=1)

    def write_report() -> None:  # rank 0, into the staging directory before it is renamed
        with open(os.path.join(directory + STAGING_SUFFIX, REPORT_FILENAME), "w") as handle:
            handle.write(report)

    if rank == 0:
        os.makedirs(root, exist_ok=True)
    start = time.perf_counter()
    read = write_pruned_checkpoint(source_dir, plan, config.model.num_layers, directory,
                                   pruned_metadata(source, pruned, padded_vocab),
                                   before_commit=write_report)
    if rank == 0:
        write_tracker(root, None)
        _copy_tokenizer(config.checkpoint.load, source_dir, root)
        log(f"prune: kept {len(plan.layers)}/{config.model.num_layers} layers "
            f"{plan.layers}, hidden {pruned.hidden_size}/{config.model.hidden_size}, "
            f"FFN {pruned.ffn_hidden_size}/{config.model.ffn_hidden_size}, heads "
            f"{pruned.num_attention_heads}/{config.model.num_attention_heads} "
            f"({pruned.query_groups} query groups, head dim {pruned.head_dim})")
        log(f"prune: wrote {directory} ({read / 2**20:.1f} MiB read by rank 0 of "
            f"{torch.distributed.get_world_size()}; {time.perf_counter() - start:.1f} s)")
    torch.distributed.barrier()
    return plan


def _copy_tokenizer(load: str, source_dir: str, root: str) -> None:
    """The source root's ``tokenizer/`` (a converted checkpoint's HF tokenizer files)."""
    for candidate in (load, os.path.dirname(source_dir.rstrip("/"))):
        tokenizer = os.path.join(candidate, TOKENIZER_DIRNAME)
        if os.path.isdir(tokenizer):
            shutil.copytree(tokenizer, os.path.join(root, TOKENIZER_DIRNAME), dirs_exist_ok=True)
            return
