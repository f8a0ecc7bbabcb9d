"""Configs: plain typed dataclasses, one per concern, each field declaring its Megatron flag.

The bottom layer of megakd: nothing here imports another megakd package. Command lines
(:mod:`.cli`), bounds (:func:`.fields.check_bounds`) and the rules between flags (:mod:`.rules`)
are derived from the declarations; :mod:`megakd.preflight` assembles them per tool.
"""

from megakd.configs.checkpoint import CheckpointConfig
from megakd.configs.data import DataConfig, pad_vocab_size, parse_blend, parse_split
from megakd.configs import rules
from megakd.configs.fields import (
    BAD_INPUT_STATUS,
    ConfigError,
    Flag,
    check_bounds,
    field_flag,
    flag,
)
from megakd.configs.generation import BatchGenerationConfig, GenerationConfig
from megakd.configs.kd import TOPK_DTYPE_NAMES, KDConfig
from megakd.configs.model import ModelArchConfig
from megakd.configs.parallel import ParallelConfig
from megakd.configs.precision import TeacherFP8Config
from megakd.configs.prune import LAYER_IMPORTANCE, PruneConfig, PruneRunConfig
from megakd.configs.student_data import StudentDataConfig
from megakd.configs.run import (
    ATTENTION_BACKENDS,
    EvalConfig,
    GenerateRunConfig,
    KDRunConfig,
    LoggingConfig,
    PrecomputeConfig,
    PrecomputeRunConfig,
    RuntimeConfig,
    as_dict,
)
from megakd.configs.training import TrainingConfig

__all__ = [
    "ATTENTION_BACKENDS",
    "BAD_INPUT_STATUS",
    "BatchGenerationConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "Flag",
    "GenerateRunConfig",
    "GenerationConfig",
    "KDConfig",
    "KDRunConfig",
    "LAYER_IMPORTANCE",
    "LoggingConfig",
    "ModelArchConfig",
    "ParallelConfig",
    "PrecomputeConfig",
    "PrecomputeRunConfig",
    "PruneConfig",
    "PruneRunConfig",
    "RuntimeConfig",
    "StudentDataConfig",
    "TeacherFP8Config",
    "TOPK_DTYPE_NAMES",
    "TrainingConfig",
    "as_dict",
    "check_bounds",
    "field_flag",
    "flag",
    "pad_vocab_size",
    "rules",
    "parse_blend",
    "parse_split",
]
