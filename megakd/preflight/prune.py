"""``tools/prune.py``'s command line (:data:`PRUNE`) and its checks, all before any process
group starts: the checkpoint to prune exists and stores its architecture, the targets fit it
(no larger than the source, heads a multiple of its query groups and of TP, layers in range),
the layout loads it, the calibration data and tokenizer are readable, ``--save`` is free."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

from megakd.configs import (
    CheckpointConfig,
    DataConfig,
    ParallelConfig,
    PruneConfig,
    PruneRunConfig,
    RuntimeConfig,
    TrainingConfig,
    rules,
)
from megakd.configs.cli import Section
from megakd.configs.prune import prune_rules
from megakd.formats.checkpoints import holds_checkpoint
from megakd.formats.model_metadata import arch_from_metadata
from megakd.preflight import checks
from megakd.preflight.archs import stored_model_metadata
from megakd.preflight.commandline import (
    MODEL_SHAPE_FIELDS, Tool, layout_rules, parse_tool, raise_errors)

_TARGETS = ("target_num_layers", "target_hidden_size", "target_ffn_hidden_size",
            "target_num_attention_heads")
# The data flags that pick calibration samples; the vocabulary width is the checkpoint's.
_CALIBRATION_DATA = (
    "mock_data", "data_path", "split", "data_cache_path", "dataset_format", "messages_key",
    "prompt_key", "response_key", "pack_sequences", "tokenizer_type", "tokenizer_model",
    "vocab_size")

PRUNE = Tool(
    prog="prune.py",
    description="Prune a trained or converted model in width (attention heads, MLP neurons, "
                "hidden channels) and depth (layers) by activation importance on calibration "
                "data (Minitron), at any TP/PP layout; writes the smaller model as a release "
                "checkpoint, loadable at any layout as a student's --pretrained-checkpoint "
                "(docs/pruning.md).",
    models=("student",),
    sections=(
        Section("model", CheckpointConfig, fields=("load", "save"), required=("load", "save"),
                helps=(("load", "the model to prune: a checkpoint root or directory (its "
                                "architecture comes from its megakd_model.json)"),
                       ("save", "checkpoint root to write the pruned model to (release/ and "
                                "its tracker); must be new or empty"))),
        Section("model", DataConfig, fields=MODEL_SHAPE_FIELDS),
        Section("targets (unset: keep that size)", PruneConfig, fields=_TARGETS),
        Section("importance", PruneConfig, fields=("calib_batches", "layer_importance")),
        Section("parallelism", ParallelConfig, fields=(
            "tensor_model_parallel_size", "pipeline_model_parallel_size")),
        Section("calibration data", TrainingConfig, fields=("micro_batch_size", "seed", "bf16"),
                helps=(("seed", "seed of the calibration samples' order (the data split)"),
                       ("bf16", "calibrate in bf16 (the pruned weights keep the checkpoint's "
                                "dtype)"))),
        Section("calibration data", DataConfig, fields=_CALIBRATION_DATA),
        Section("runtime", RuntimeConfig, fields=("device", "distributed_timeout_minutes")),
    ),
)


def _load_checks(load: Optional[str]) -> List[str]:
    """``--load`` names a complete checkpoint that stores its architecture."""
    if load is None:
        return []  # "--load is required" comes from the parser's required fields
    errors = checks.checkpoint_checks(CheckpointConfig(load=load))
    if not errors and stored_model_metadata(load, "--load") is None:
        errors.append(f"--load {load}: no megakd_model.json, so the architecture to prune is "
                      "unknown")
    return errors


def _save_checks(save: str, load: str) -> List[str]:
    if os.path.exists(save) and not os.path.isdir(save):
        return [f"--save {save}: exists and is not a directory"]
    if os.path.isdir(save) and (holds_checkpoint(save) or os.listdir(save)):
        return [f"--save {save}: already exists and is not empty (the pruned model needs a new "
                "checkpoint root)"]
    if os.path.abspath(save) == os.path.abspath(load):
        return ["--save must differ from --load"]
    return []


def _stored_rows(load: str) -> int:
    """The padded vocabulary (embedding rows) of the checkpoint to prune."""
    _, padded, _ = arch_from_metadata(stored_model_metadata(load, "--load"), f"--load {load}")
    return padded


def parse_prune_args(argv: Optional[Sequence[str]] = None,
                     world_size: Optional[int] = None) -> PruneRunConfig:
    """``tools/prune.py``'s flags as a validated :class:`PruneRunConfig`: the checkpoint, the
    flag rules and the targets against its architecture, then the data and tokenizer files.
    Raises ConfigError listing every problem, each naming its flag or file."""
    given = PRUNE.parser().parse_args(argv)
    raise_errors(_load_checks(given.load))
    built, model, _ = parse_tool(PRUNE, argv, world_size)
    config = PruneRunConfig(model=model, **{
        name: built[cls] for name, cls in (
            ("parallel", ParallelConfig), ("training", TrainingConfig), ("data", DataConfig),
            ("checkpoint", CheckpointConfig), ("runtime", RuntimeConfig),
            ("prune", PruneConfig))})
    par, data, ckpt = config.parallel, config.data, config.checkpoint
    errors = layout_rules(par, [(model, False)])
    errors += prune_rules(config.prune, model, par)
    errors += rules.data_rules(data, par.tensor_model_parallel_size)
    rows, tp = _stored_rows(ckpt.load), par.tensor_model_parallel_size
    if rows % tp:
        errors.append(f"--load {ckpt.load}: its {rows} embedding rows are not divisible by "
                      f"--tensor-model-parallel-size={tp}")
    errors += _save_checks(ckpt.save, ckpt.load)
    raise_errors(errors)
    errors = checks.environment_checks(config.runtime, None) + checks.data_file_checks(data)
    tokenizer, problems = checks.load_run_tokenizer(data)
    errors += problems
    if tokenizer is not None:
        errors += checks.tokenizer_checks(tokenizer, None, {"--load": ckpt.load})
        if tokenizer.vocab_size > rows:
            errors.append(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the "
                          f"{rows} embedding rows of --load {ckpt.load}")
    raise_errors(errors)
    return config

