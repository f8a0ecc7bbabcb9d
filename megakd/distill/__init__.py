"""Where teacher and student meet: teacher sources, the KD+CE loss, the iteration step, and
the builders (tokenizer, datasets, frozen teacher) that training and the precompute share."""

from megakd.distill.builders import build_datasets, build_loaded_teacher
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
    "CachedTeacher",
    "DistillationLoss",
    "DistillationStep",
    "GlobalTokenCounts",
    "LiveTeacher",
    "StudentDataMicrobatches",
    "TeacherOutput",
    "TeacherSource",
    "build_datasets",
    "build_loaded_teacher",
    "build_teacher_source",
    "count_global_tokens",
    "reduce_reported",
    "resolve_teacher_window",
    "teacher_output_bytes",
]
