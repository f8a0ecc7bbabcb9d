"""The supported HuggingFace families, by ``--model-family`` name and by ``model_type``."""

from megakd.convert import llama, mistral, mixtral, qwen2, qwen3, qwen3_moe
from megakd.convert.errors import ConversionError
from megakd.convert.family import ModelFamily

FAMILIES = {family.name: family for family in
            (llama.FAMILY, mistral.FAMILY, mixtral.FAMILY, qwen2.FAMILY, qwen3.FAMILY,
             qwen3_moe.FAMILY)}


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
