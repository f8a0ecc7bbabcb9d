"""Where teacher and student meet: the teacher pass, the KD+CE loss, the iteration step."""

from megakd.distill.loss import DistillationLoss, GlobalTokenCounts, count_global_tokens
from megakd.distill.step import DistillationStep, reduce_reported
from megakd.distill.teacher import TeacherRunner

__all__ = [
    "DistillationLoss",
    "DistillationStep",
    "GlobalTokenCounts",
    "TeacherRunner",
    "count_global_tokens",
    "reduce_reported",
]
