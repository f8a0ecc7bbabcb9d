"""Student and teacher megatron-core GPTModels for this rank's pipeline stage(s)."""

from megakd.models.builder import (
    build_gpt_chunks,
    build_student,
    build_teacher,
    transformer_config_from_arch,
    transformer_engine_available,
)

__all__ = [
    "build_gpt_chunks",
    "build_student",
    "build_teacher",
    "transformer_config_from_arch",
    "transformer_engine_available",
]
