"""Where teacher and student meet: teacher sources, the KD+CE loss, the iteration step, and
the builders (tokenizer, datasets, frozen teacher) that training and the precompute share."""

from megakd.distill.builders import build_datasets, build_loaded_teacher
from megakd.distill.hidden import (
    HIDDEN_LOSS_NAME,
    HiddenStateKD,
    build_hidden_kd,
    build_projections,
    transformer_layers,
)
from megakd.distill.hidden_loss import HiddenProjection, is_projection_key
from megakd.distill.loss import DistillationLoss, GlobalTokenCounts, count_global_tokens
from megakd.distill.step import DistillationStep, reduce_reported
from megakd.distill.student_data import StudentDataMicrobatches
from megakd.distill.teachers import (
    CachedTeacher,
    LiveTeacher,
    TeacherOutput,
    TeacherSource,
    build_teacher_source,
)
from megakd.distill.window import resolve_teacher_window, teacher_output_bytes

__all__ = [
    "HIDDEN_LOSS_NAME",
    "CachedTeacher",
    "DistillationLoss",
    "DistillationStep",
    "GlobalTokenCounts",
    "HiddenProjection",
    "HiddenStateKD",
    "LiveTeacher",
    "StudentDataMicrobatches",
    "TeacherOutput",
    "TeacherSource",
    "build_datasets",
    "build_hidden_kd",
    "build_loaded_teacher",
    "build_projections",
    "build_teacher_source",
    "count_global_tokens",
    "is_projection_key",
    "reduce_reported",
    "resolve_teacher_window",
    "teacher_output_bytes",
    "transformer_layers",
]
