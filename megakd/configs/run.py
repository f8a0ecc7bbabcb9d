"""Validation, logging and runtime settings, and :class:`KDRunConfig`: one whole run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from megakd.configs.checkpoint import CheckpointConfig
from megakd.configs.data import DataConfig
from megakd.configs.fields import flag
from megakd.configs.generation import BatchGenerationConfig, GenerationConfig
from megakd.configs.kd import KDConfig
from megakd.configs.model import ModelArchConfig
from megakd.configs.parallel import ParallelConfig
from megakd.configs.precision import TeacherFP8Config
from megakd.configs.student_data import StudentDataConfig
from megakd.configs.training import TrainingConfig

# --attention-backend: auto = Transformer Engine when it imports on a GPU, else sdpa;
# sdpa / unfused = megatron-core's local spec with megakd's SDPA core attention / megatron's
# DotProductAttention (unfused; `local` is Megatron-LM's name for it).
ATTENTION_BACKENDS = ("auto", "sdpa", "unfused", "local")
DEVICES = ("auto", "cuda", "cpu")


@dataclass
class EvalConfig:
    """Validation on the held-out split."""

    interval: Optional[int] = flag(None, name="--eval-interval", low=1,
                                   help="iterations between validations on the held-out split "
                                        "(teacher baseline first, then every N iterations and "
                                        "at the end); none: no validation")
    iters: int = flag(100, name="--eval-iters", low=1,
                      help="global batches per validation (each validation reads the next "
                           "ones, as Megatron-LM)")
    generate: int = flag(0, name="--eval-generate", low=0,
                         help="each validation also greedy-generates answers to this many "
                              "held-out prompts and reports ROUGE-L and exact match against "
                              "their references (chat data)")


@dataclass
class LoggingConfig:
    """Where metrics go besides stdout, and which timings are reported."""

    tensorboard_dir: Optional[str] = flag(None, name="--tensorboard-dir",
                                          help="write TensorBoard scalars here")
    wandb_project: Optional[str] = flag(None, name="--wandb-project",
                                        help="log the same scalars to this Weights & Biases "
                                             "project (pip install wandb)")
    wandb_exp_name: Optional[str] = flag(None, name="--wandb-exp-name", help="W&B run name")
    wandb_save_dir: Optional[str] = flag(None, name="--wandb-save-dir",
                                         help="local directory for W&B files")
    timing_log_level: int = flag(0, name="--timing-log-level", choices=(0, 1, 2),
                                 help="1 or 2: data, teacher forward, student forward-backward "
                                      "and optimizer times with each log line")
    timing_log_option: str = flag("minmax", name="--timing-log-option",
                                  choices=("max", "minmax", "all"),
                                  help="how timers are reported across ranks")
    log_throughput: bool = flag(False, name="--log-throughput",
                                help="global tokens per second in the log line")


@dataclass
class RuntimeConfig:
    device: str = flag("auto", name="--device", choices=DEVICES,
                       help="cuda, cpu (megatron-core over gloo), or auto (CPU iff no CUDA)")
    attention_backend: str = flag("auto", name="--attention-backend", choices=ATTENTION_BACKENDS,
                                  help="auto: Transformer Engine when it imports on a GPU, else "
                                       "sdpa; sdpa: megatron-core's local spec with PyTorch "
                                       "scaled_dot_product_attention; unfused (or local): "
                                       "megatron-core's DotProductAttention")
    distributed_timeout_minutes: int = flag(10, name="--distributed-timeout-minutes", low=1,
                                            help="collective timeout")


@dataclass
class KDRunConfig:
    """Everything one distillation run needs, as parsed from the command line."""

    student: ModelArchConfig
    teacher: ModelArchConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    student_data: StudentDataConfig = field(default_factory=StudentDataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    teacher_fp8: TeacherFP8Config = field(default_factory=TeacherFP8Config)


def as_dict(config) -> dict:
    """Plain-dict view of any config (for logging, W&B and checkpoint metadata)."""
    return dataclasses.asdict(config)


@dataclass
class PrecomputeConfig:
    """``tools/precompute_teacher_topk.py``'s own settings (docs/teacher_cache.md)."""

    samples_per_shard: int = flag(256, name="--cache-samples-per-shard", low=1,
                                  help="samples per shard file (a multiple of "
                                       "--micro-batch-size)")
    microbatches_per_pass: int = flag(16, name="--cache-microbatches-per-pass", low=1,
                                      help="microbatches per forward-only pipeline pass")


@dataclass
class PrecomputeRunConfig:
    """Everything the teacher-cache precompute needs: the teacher (from ``--teacher-load``),
    the layout, the student run's data, batch and top-k flags, and where to write."""

    teacher: ModelArchConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    teacher_fp8: TeacherFP8Config = field(default_factory=TeacherFP8Config)


@dataclass
class GenerateRunConfig:
    """Everything ``tools/generate.py`` needs: the model (from ``--load``), its layout, the
    tokenizer and sequence length, sampling, and where prompts come from and answers go."""

    model: ModelArchConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)  # --seed, --bf16
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch: BatchGenerationConfig = field(default_factory=BatchGenerationConfig)
