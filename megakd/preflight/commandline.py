"""Each tool's command line: which config fields it asks for, how the flags become a config,
and which rules and file checks run before any process group starts.

A tool asks only for the flags it uses: ``tools/precompute_teacher_topk.py`` takes the
teacher, the layout, the student run's data, batch and top-k flags, and no student
architecture or optimizer flags. Parsers, the flag tables in the README and docs/flags.md
(:func:`flags_table`) and the validation all come from the same :class:`Section` lists.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

from megakd.configs import (
    BatchGenerationConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    Flag,
    GenerateRunConfig,
    GenerationConfig,
    KDConfig,
    KDRunConfig,
    LoggingConfig,
    ModelArchConfig,
    ParallelConfig,
    PrecomputeConfig,
    PrecomputeRunConfig,
    RuntimeConfig,
    StudentDataConfig,
    TeacherFP8Config,
    TrainingConfig,
    check_bounds,
    rules,
)
from megakd.configs.cli import (
    ExtraFlag,
    Section,
    build_parser,
    explicit_dests,
    flags_markdown,
    missing_required,
    section_options,
    section_values,
)
from megakd.formats.model_metadata import null_tokenizer_vocab_size
from megakd.losses import DIVERGENCES, divergence_parameters
from megakd.preflight import checks
from megakd.preflight.archs import GROUP_QUERY_ATTENTION, resolve_archs, stored_model_metadata
from megakd.runtime.launcher import discover_world_size

MODEL_SHAPE_FIELDS = ("seq_length", "max_position_embeddings")
_TEACHER_DATA = ("teacher_vocab_size",)
# The layout flags of tools that run one model without training it.
_MODEL_PARALLEL = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                   "num_layers_per_virtual_pipeline_stage", "expert_model_parallel_size",
                   "expert_tensor_parallel_size", "moe_token_dispatcher_type")
_DATA = tuple(f.name for f in dataclasses.fields(DataConfig)
              if f.name not in MODEL_SHAPE_FIELDS + _TEACHER_DATA)
_TEACHER_CHECKPOINT = ("teacher_load", "teacher_cache")
_CHECKPOINT = tuple(f.name for f in dataclasses.fields(CheckpointConfig)
                    if f.name not in _TEACHER_CHECKPOINT)
KD = "knowledge distillation"


@dataclass(frozen=True)
class Tool:
    """One tool's command line."""

    prog: str
    description: str
    sections: Tuple[Section, ...]
    # The models the tool builds; an architecture without a flag section comes only from its
    # checkpoint's megakd_model.json.
    models: Tuple[str, ...] = ("student", "teacher")
    divergence_flags: bool = False  # --kd-loss choices and the registry's parameter flags
    # Another tool whose flags are accepted and ignored (the precompute takes a student run's
    # command line whole, but only reads what it uses).
    tolerates: Optional["Tool"] = None

    @property
    def extras(self) -> Tuple[ExtraFlag, ...]:
        if not self.divergence_flags:
            return ()
        return tuple(ExtraFlag(KD, Flag(name=p.flag, help=p.help, low=p.low, high=p.high,
                                        low_inclusive=p.low_inclusive,
                                        high_inclusive=p.high_inclusive),
                               float, p.default) for p in divergence_parameters())

    @property
    def choices(self) -> Dict[str, Tuple[Any, ...]]:
        return {"--kd-loss": tuple(DIVERGENCES)} if self.divergence_flags else {}

    def parser(self) -> argparse.ArgumentParser:
        return build_parser(self.prog, self.description, self.sections, self.extras, self.choices)


PRETRAIN = Tool(
    prog="pretrain_kd.py",
    description="Distill a teacher GPT into a student GPT with megatron-core.",
    divergence_flags=True,
    sections=(
        Section("student model", ModelArchConfig, switches=(GROUP_QUERY_ATTENTION,)),
        Section("student model", DataConfig, fields=MODEL_SHAPE_FIELDS),
        Section("teacher model (unset fields default to the student's)", ModelArchConfig,
                teacher=True),
        Section("teacher model (unset fields default to the student's)", DataConfig,
                fields=_TEACHER_DATA),
        Section("teacher model (unset fields default to the student's)", CheckpointConfig,
                fields=_TEACHER_CHECKPOINT),
        Section("teacher model (unset fields default to the student's)", TeacherFP8Config),
        Section("parallelism", ParallelConfig),
        Section("training", TrainingConfig),
        Section("data", DataConfig, fields=_DATA),
        Section(KD, KDConfig),
        Section("the student's own samples (docs/on_policy.md)", StudentDataConfig),
        Section("generation (student samples, --eval-generate)", GenerationConfig),
        Section("checkpoints", CheckpointConfig, fields=_CHECKPOINT),
        Section("validation and logging", EvalConfig),
        Section("validation and logging", LoggingConfig),
        Section("runtime", RuntimeConfig),
    ),
)

PRECOMPUTE = Tool(
    prog="precompute_teacher_topk.py",
    description="Write the teacher's top-k for a run's train samples to a cache directory. "
                "Give the student run's data, batch and top-k flags (layout and "
                "--micro-batch-size may differ); pretrain_kd.py's other flags are accepted "
                "and ignored.",
    tolerates=PRETRAIN,
    models=("teacher",),
    sections=(
        Section("teacher", CheckpointConfig, fields=_TEACHER_CHECKPOINT,
                required=_TEACHER_CHECKPOINT, helps=(
                    ("teacher_load", "the teacher whose top-k is cached (its architecture "
                                     "comes from its megakd_model.json)"),
                    ("teacher_cache", "cache directory to write; a partial cache there is "
                                      "resumed"))),
        Section("teacher", DataConfig, fields=MODEL_SHAPE_FIELDS),
        Section("teacher", TeacherFP8Config),
        Section("parallelism", ParallelConfig, fields=_MODEL_PARALLEL),
        Section("samples", TrainingConfig, fields=(
            "micro_batch_size", "global_batch_size", "train_iters", "seed", "bf16")),
        Section("data", DataConfig, fields=_DATA),
        Section("top-k", KDConfig, fields=("temperature", "topk", "topk_dtype"),
                required=("topk",)),
        Section("cache", PrecomputeConfig),
        Section("runtime", RuntimeConfig),
    ),
)


GENERATE = Tool(
    prog="generate.py",
    description="Answer every prompt of a chat JSONL file with a model (any megakd checkpoint, "
                "any TP/PP/DP layout), writing chat JSONL: sample inspection and "
                "sequence-level KD data (docs/generation.md).",
    models=("student",),
    sections=(
        Section("model", CheckpointConfig, fields=("load",), required=("load",), helps=(
            ("load", "the model: a checkpoint root or directory (its architecture comes from "
                     "its megakd_model.json)"),)),
        Section("model", DataConfig, fields=MODEL_SHAPE_FIELDS),
        Section("parallelism", ParallelConfig, fields=_MODEL_PARALLEL),
        Section("prompts", BatchGenerationConfig),
        Section("prompts", DataConfig, fields=(
            "messages_key", "prompt_key", "response_key", "tokenizer_type", "tokenizer_model",
            "vocab_size", "make_vocab_size_divisible_by", "padded_vocab_size")),
        Section("generation", GenerationConfig),
        Section("runtime", TrainingConfig, fields=("seed", "bf16")),
        Section("runtime", RuntimeConfig),
    ),
)


# ----------------------------------------------------------------------------------------------
# Flags -> config
# ----------------------------------------------------------------------------------------------


def _values_by_class(tool: Tool, ns: argparse.Namespace) -> Dict[type, Dict[str, Any]]:
    """Flag values of every non-teacher section, merged per config class."""
    values: Dict[type, Dict[str, Any]] = {}
    for section in tool.sections:
        if not section.teacher:
            values.setdefault(section.cls, {}).update(section_values(section, ns))
    return values


def _explicit_fields(tool: Tool, explicit: frozenset) -> Dict[str, Dict[str, Any]]:
    """Fields of the student / teacher architecture given on the command line."""
    out: Dict[str, Dict[str, Any]] = {"student": {}, "teacher": {}}
    for section in tool.sections:
        if section.cls is ModelArchConfig:
            role = "teacher" if section.teacher else "student"
            out[role] = {option.field: None for option in section_options(section)
                         if option.flag.dest in explicit}
    return out


def _architectures(tool: Tool, ns: argparse.Namespace, explicit: frozenset,
                   data: DataConfig, ckpt: CheckpointConfig
                   ) -> Tuple[Optional[ModelArchConfig], Optional[ModelArchConfig]]:
    by_role: Dict[str, Optional[Dict[str, Any]]] = {
        role: ({} if role in tool.models else None) for role in ("student", "teacher")}
    for section in tool.sections:
        if section.cls is ModelArchConfig:
            by_role["teacher" if section.teacher else "student"] = section_values(section, ns)
    given = _explicit_fields(tool, explicit)
    for role, fields in given.items():
        for name in fields:
            fields[name] = by_role[role][name]
    student_checkpoints = [("--load", ckpt.load),
                           ("--pretrained-checkpoint", ckpt.pretrained_checkpoint)]
    teacher_checkpoints = [("--teacher-load", ckpt.teacher_load)]
    if data.tokenizer_type == "NullTokenizer" and data.vocab_size is None:
        data.vocab_size = _stored_vocab_size(student_checkpoints + teacher_checkpoints)
    return resolve_archs(
        by_role["student"], by_role["teacher"], given,
        bool(getattr(ns, GROUP_QUERY_ATTENTION.dest, False)),
        student_checkpoints=student_checkpoints, teacher_checkpoints=teacher_checkpoints,
        vocab_size=data.vocab_size)


def _stored_vocab_size(checkpoints: Sequence[Tuple[str, Optional[str]]]) -> Optional[int]:
    """``--vocab-size`` for the NullTokenizer (``--mock-data``) from the first checkpoint whose
    ``megakd_model.json`` records a vocabulary."""
    for flag, path in checkpoints:
        metadata = stored_model_metadata(path, flag)
        if metadata is not None and null_tokenizer_vocab_size(metadata) is not None:
            return null_tokenizer_vocab_size(metadata)
    return None


def _sections(tool: Tool, ns: argparse.Namespace, world_size: int) -> Dict[type, Any]:
    """Every config section of the tool, with the derived defaults filled in."""
    values = _values_by_class(tool, ns)
    built = {cls: cls(**fields) for cls, fields in values.items()}
    data = built.setdefault(DataConfig, DataConfig())
    if data.max_position_embeddings is None:
        data.max_position_embeddings = data.seq_length
    parallel = built.setdefault(ParallelConfig, ParallelConfig())
    parallel.world_size = world_size
    training = built.setdefault(TrainingConfig, TrainingConfig())
    if training.global_batch_size is None and world_size % parallel.model_parallel_size == 0:
        training.global_batch_size = training.micro_batch_size * parallel.data_parallel_size
    kd = built.setdefault(KDConfig, KDConfig())
    if tool.divergence_flags:
        kd.divergence_params = {p.name: getattr(ns, p.flag.lstrip("-").replace("-", "_"))
                                for p in divergence_parameters()}
    return built


def raise_errors(errors: List[str]) -> None:
    if errors:
        raise ConfigError("; ".join(errors))


def _section_checks(sections: Sequence[Any], kd: Optional[KDConfig] = None,
                    choices: Dict[str, Tuple[Any, ...]] = {}) -> List[str]:
    """Bounds and choices of every field of ``sections`` (model archs included: a teacher
    architecture is named by its ``--teacher-*`` flags), and the divergence parameters."""
    errors: List[str] = []
    for section in sections:
        if isinstance(section, tuple):  # (architecture, is_teacher)
            errors += check_bounds(section[0], teacher=section[1])
        else:
            errors += check_bounds(section)
    if kd is not None:
        kinds = choices.get("--kd-loss", ())
        if kinds and kd.loss not in kinds:
            errors.append(f"--kd-loss must be one of {', '.join(kinds)}, got {kd.loss!r}")
        errors += [problem for p in divergence_parameters()
                   if (problem := p.check(kd.divergence_params.get(p.name, p.default)))]
    return errors


def parse_tool(tool: Tool, argv: Optional[Sequence[str]], world_size: Optional[int]
           ) -> Tuple[Dict[type, Any], Any, Any]:
    """Parse, assemble and bounds-check: (sections by class, student, teacher)."""
    parser = tool.parser()
    if tool.tolerates is None:
        ns = parser.parse_args(argv)
    else:
        ns, rest = parser.parse_known_args(argv)
        _, unknown = tool.tolerates.parser().parse_known_args(rest)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    raise_errors(missing_required(tool.sections, ns))
    world = world_size if world_size is not None else discover_world_size()
    built = _sections(tool, ns, world)
    kd = built[KDConfig] if tool.divergence_flags else None
    raise_errors(_section_checks(built.values(), kd, tool.choices))
    student, teacher = _architectures(tool, ns, explicit_dests(parser, argv), built[DataConfig],
                                      built.get(CheckpointConfig, CheckpointConfig()))
    return built, student, teacher


def layout_rules(par: ParallelConfig, archs: Sequence[Tuple[ModelArchConfig, bool]],
                  seq_length: Optional[int] = None) -> List[str]:
    errors = rules.parallel_rules(par)
    for arch, is_teacher in archs:
        errors += rules.arch_rules(arch, par, teacher=is_teacher)
        if seq_length is not None:
            errors += rules.sliding_window_rules(arch, seq_length, teacher=is_teacher)
    return errors


# ----------------------------------------------------------------------------------------------
# The tools
# ----------------------------------------------------------------------------------------------


def parse_pretrain_args(argv: Optional[Sequence[str]] = None,
                        world_size: Optional[int] = None) -> KDRunConfig:
    """``tools/pretrain_kd.py``'s flags as a validated :class:`KDRunConfig`: flag rules, then
    every file check (data, checkpoints, tokenizer, teacher cache). Raises ConfigError listing
    every problem, each naming its flag or file."""
    built, student, teacher = parse_tool(PRETRAIN, argv, world_size)
    config = KDRunConfig(student=student, teacher=teacher, **{
        name: built[cls] for name, cls in (
            ("parallel", ParallelConfig), ("training", TrainingConfig), ("data", DataConfig),
            ("kd", KDConfig), ("checkpoint", CheckpointConfig), ("runtime", RuntimeConfig),
            ("eval", EvalConfig), ("logging", LoggingConfig),
            ("student_data", StudentDataConfig), ("generation", GenerationConfig),
            ("teacher_fp8", TeacherFP8Config))})
    check_pretrain_config(config)
    raise_errors(checks.teacher_fp8_checks(
        config.teacher_fp8, config.kd.uses_teacher and not config.checkpoint.teacher_cache,
        config.runtime))
    raise_errors(_file_checks(config.data, config.kd, config.checkpoint, config.training,
                        config.runtime, config.logging,
                        generates=config.student_data.enabled or config.eval.generate > 0))
    return config


def check_pretrain_config(config: KDRunConfig) -> None:
    """Every flag-only check of a training run (bounds, choices, the rules between flags), for
    configs built in Python as well as parsed ones; reads no file. Raises ConfigError."""
    par, train, data = config.parallel, config.training, config.data
    sections = [config.parallel, train, data, config.kd, config.checkpoint, config.runtime,
                config.eval, config.logging, config.student_data, config.generation,
                config.teacher_fp8,
                (config.student, False), (config.teacher, True)]
    raise_errors(_section_checks(sections, config.kd, PRETRAIN.choices))
    errors = layout_rules(par, [(config.student, False), (config.teacher, True)],
                           data.seq_length)
    errors += rules.moe_student_rules(config.student, par)
    errors += rules.data_rules(data, par.tensor_model_parallel_size)
    if par.world_size % par.model_parallel_size == 0:
        errors += rules.batch_rules(train, par.data_parallel_size)
        errors += rules.teacher_window_rules(config.kd, train, par)
    errors += rules.schedule_rules(train) + rules.kd_rules(config.kd, data)
    errors += rules.checkpoint_rules(config.checkpoint)
    errors += rules.teacher_cache_rules(config.checkpoint, config.kd, config.eval)
    errors += rules.logging_rules(config.logging)
    errors += rules.student_data_rules(config.student_data, config.kd, data, config.checkpoint,
                                       config.eval)
    errors += rules.intermediate_kd_rules(config.kd, config.student, config.teacher,
                                          config.checkpoint)
    raise_errors(errors)


def parse_precompute_args(argv: Optional[Sequence[str]] = None,
                          world_size: Optional[int] = None) -> PrecomputeRunConfig:
    """``tools/precompute_teacher_topk.py``'s flags as a validated :class:`PrecomputeRunConfig`."""
    built, _, teacher = parse_tool(PRECOMPUTE, argv, world_size)
    config = PrecomputeRunConfig(teacher=teacher, **{
        name: built[cls] for name, cls in (
            ("parallel", ParallelConfig), ("training", TrainingConfig), ("data", DataConfig),
            ("kd", KDConfig), ("checkpoint", CheckpointConfig), ("runtime", RuntimeConfig),
            ("precompute", PrecomputeConfig), ("teacher_fp8", TeacherFP8Config))})
    par, train, data = config.parallel, config.training, config.data
    raise_errors(_section_checks([(teacher, True)]))
    errors = layout_rules(par, [(teacher, True)], data.seq_length)
    errors += rules.data_rules(data, par.tensor_model_parallel_size)
    if par.world_size % par.model_parallel_size == 0:
        errors += rules.batch_rules(train, par.data_parallel_size)
    errors += rules.kd_rules(config.kd, data)
    shard = config.precompute.samples_per_shard
    if shard % train.micro_batch_size:
        errors.append(f"--cache-samples-per-shard={shard} must be a multiple of "
                      f"--micro-batch-size ({train.micro_batch_size})")
    raise_errors(errors)
    raise_errors(checks.teacher_fp8_checks(config.teacher_fp8, True, config.runtime))
    raise_errors(_file_checks(data, config.kd, config.checkpoint, None, config.runtime, None))
    return config


def _file_checks(data: DataConfig, kd: KDConfig, ckpt: CheckpointConfig,
                 training: Optional[TrainingConfig], runtime: RuntimeConfig,
                 logging_config: Optional[LoggingConfig], generates: bool = False) -> List[str]:
    errors = checks.environment_checks(runtime, logging_config)
    errors += checks.data_file_checks(data) + checks.checkpoint_checks(ckpt)
    if training is not None:
        errors += checks.teacher_cache_checks(ckpt, kd, data, training)
    tokenizer, problems = checks.load_run_tokenizer(data)
    errors += problems
    if tokenizer is not None:
        errors += checks.tokenizer_checks(tokenizer, kd, {
            "--teacher-load": ckpt.teacher_load, "--load": ckpt.load,
            "--pretrained-checkpoint": ckpt.pretrained_checkpoint})
        if generates and not errors:
            errors += checks.prompt_room_checks(data, tokenizer)
    return errors


def parse_generate_args(argv: Optional[Sequence[str]] = None,
                        world_size: Optional[int] = None) -> GenerateRunConfig:
    """``tools/generate.py``'s flags as a validated :class:`GenerateRunConfig`."""
    built, model, _ = parse_tool(GENERATE, argv, world_size)
    config = GenerateRunConfig(model=model, **{
        name: built[cls] for name, cls in (
            ("parallel", ParallelConfig), ("training", TrainingConfig), ("data", DataConfig),
            ("checkpoint", CheckpointConfig), ("runtime", RuntimeConfig),
            ("generation", GenerationConfig), ("batch", BatchGenerationConfig))})
    par, data = config.parallel, config.data
    raise_errors(_section_checks([(model, False)]))
    errors = layout_rules(par, [(model, False)], data.seq_length)
    errors += rules.vocab_rules(data, par.tensor_model_parallel_size)
    errors += rules.prompt_rules(data)
    raise_errors(errors)
    errors = checks.environment_checks(config.runtime, None)
    errors += checks.checkpoint_checks(config.checkpoint)
    errors += checks.prompts_file_checks(config.batch.prompts, data)
    errors += checks.output_dir_checks(config.batch.output)
    tokenizer, problems = checks.load_run_tokenizer(data)
    errors += problems
    if tokenizer is not None:
        errors += checks.tokenizer_checks(tokenizer, None, {"--load": config.checkpoint.load})
    raise_errors(errors)
    return config


def flags_table(tool: Tool) -> str:
    """The tool's flags as the markdown table of the README / docs/flags.md."""
    return flags_markdown(tool.sections, tool.extras, tool.choices)
