"""HuggingFace <-> megakd checkpoints (megatron distributed checkpoints), one declarative
mapping per model family (``llama``, ``mistral``, ``qwen2``, ``qwen3``, and the
mixture-of-experts ``qwen3_moe`` and ``mixtral``).

Entry points: :func:`megakd.convert.hf_to_megakd.convert_hf_to_megakd`,
:func:`megakd.convert.megakd_to_hf.convert_megakd_to_hf` (and the ``tools/convert_*.py``
wrappers). Details: docs/conversion.md.
"""

from megakd.convert.errors import ConversionError, VerificationError
from megakd.convert.families import FAMILIES, family_by_name, family_for_model_type
from megakd.convert.family import ModelFamily

__all__ = ["FAMILIES", "ConversionError", "ModelFamily", "VerificationError", "family_by_name",
           "family_for_model_type"]
