"""HuggingFace <-> megakd checkpoints (megatron distributed checkpoints), one declarative
mapping per model family (``llama``, ``mistral``, ``qwen2``, ``qwen3``).

Entry points: :func:`megakd.convert.hf_to_megakd.convert_hf_to_megakd`,
:func:`megakd.convert.megakd_to_hf.convert_megakd_to_hf` (and the ``tools/convert_*.py``
wrappers). Details: docs/conversion.md.
"""

from megakd.convert import llama, mistral, qwen2, qwen3
from megakd.convert.family import ModelFamily

FAMILIES = {family.name: family for family in
            (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY)}


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file, flag or config field."""


class VerificationError(ConversionError):
    """``--verify`` found logits further apart than the tolerance (nothing was written)."""


def family_by_name(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ConversionError(f"--model-family {name!r} is not supported; supported: "
                              f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def family_for_model_type(model_type: str, source: str) -> ModelFamily:
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    raise ConversionError(f"{source}: model_type {model_type!r} is not supported; supported: "
                          f"{', '.join(sorted(f.model_type for f in FAMILIES.values()))}")


__all__ = ["FAMILIES", "ConversionError", "ModelFamily", "VerificationError", "family_by_name", "family_for_model_type"]
