"""Where teacher and student meet: teacher sources, the KD+CE loss, the iteration step, and
the builders (tokenizer, datasets, frozen teacher) that training and the precompute share."""

from megakd.distill.builders import (
    Vocabulary,
    build_datasets,
    build_loaded_teacher,
    build_tokenizer_and_vocabulary,
)
from megakd.distill.loss import DistillationLoss, GlobalTokenCounts, count_global_tokens
from megakd.distill.step import DistillationStep, reduce_reported
from megakd.distill.teachers import (
    CachedTeacher,
    LiveTeacher,
    TeacherOutput,
    TeacherSource,
    build_teacher_source,
)

__all__ = [
    "CachedTeacher",
    "DistillationLoss",
    "DistillationStep",
    "GlobalTokenCounts",
    "LiveTeacher",
    "TeacherOutput",
    "TeacherSource",
    "Vocabulary",
    "build_datasets",
    "build_loaded_teacher",
    "build_teacher_source",
    "build_tokenizer_and_vocabulary",
    "count_global_tokens",
    "reduce_reported",
]
