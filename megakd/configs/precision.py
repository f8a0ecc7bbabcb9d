"""FP8 execution of the frozen teacher (Transformer Engine through megatron-core)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from megakd.configs.fields import flag

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
FP8_AMAX_COMPUTE_ALGOS = ("most_recent", "max")


@dataclass
class TeacherFP8Config:
    """Megatron-LM's ``--fp8-*`` flags, for the teacher (``--teacher-fp8-*``).

    The teacher's forward dominates a step into a much smaller student (2·N_teacher of the
    6·N_student + 2·N_teacher FLOPs per token), and it runs forward-only, so FP8 GEMMs there
    cost no training stability. The fields land on the teacher's ``TransformerConfig``
    (``fp8``, ``fp8_recipe``, ...), whose transformer block enters Transformer Engine's FP8
    autocast itself; this needs the Transformer Engine layer spec, so without a working
    Transformer Engine the run is refused before any work.
    """

    format: Optional[str] = flag(
        None, name="--teacher-fp8-format", choices=FP8_FORMATS, default_text="off",
        help="run the teacher's linear layers in FP8: e4m3, or hybrid (e4m3 forward, e5m2 "
             "gradients: the same as e4m3 for a forward-only teacher); needs Transformer "
             "Engine on a GPU")
    recipe: str = flag("delayed", name="--teacher-fp8-recipe", choices=FP8_RECIPES,
                       help="FP8 scaling: delayed (amax history), tensorwise (current "
                            "scaling), mxfp8 (Blackwell), blockwise")
    margin: int = flag(0, name="--teacher-fp8-margin", low=0,
                       help="scaling-factor margin (power of 2) of the delayed recipe")
    amax_history_len: int = flag(1, name="--teacher-fp8-amax-history-len", low=1,
                                 help="amax history length of the delayed recipe")
    amax_compute_algo: str = flag("most_recent", name="--teacher-fp8-amax-compute-algo",
                                  choices=FP8_AMAX_COMPUTE_ALGOS,
                                  help="amax from the history: most_recent or max")

    @property
    def enabled(self) -> bool:
        return self.format is not None

    def transformer_config_fields(self) -> Dict[str, Any]:
        """megatron-core ``TransformerConfig`` fields (empty when FP8 is off)."""
        if not self.enabled:
            return {}
        return {"fp8": self.format, "fp8_recipe": self.recipe, "fp8_margin": self.margin,
                "fp8_amax_history_len": self.amax_history_len,
                "fp8_amax_compute_algo": self.amax_compute_algo}
