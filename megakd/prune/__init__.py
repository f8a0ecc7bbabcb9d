"""Minitron-style pruning of a trained model into a smaller student (docs/pruning.md).

Importance from calibration activations, measured at whatever TP/PP layout the model is loaded
at (:mod:`.statistics`, :mod:`.importance`), a :class:`PruningPlan` of what to keep
(:mod:`.plan`), and the pruned checkpoint written from the source's layout-free tensors
(:mod:`.slicing`, :mod:`.writer`), loadable at any layout. :func:`run_prune` is
``tools/prune.py``'s body.
"""

from megakd.prune.calibration import calibrate, calibration_microbatches, layer_left_out
from megakd.prune.importance import Importance, importance_from, top_heads, top_indices
from megakd.prune.plan import PruningPlan, plan_pruning
from megakd.prune.run import REPORT_FILENAME, measure_importance, run_prune
from megakd.prune.slicing import prune_tensor
from megakd.prune.statistics import LayerStatistics, StatisticsCollector, gather_statistics
from megakd.prune.writer import write_pruned_checkpoint

__all__ = [
    "Importance",
    "LayerStatistics",
    "PruningPlan",
    "REPORT_FILENAME",
    "StatisticsCollector",
    "calibrate",
    "calibration_microbatches",
    "gather_statistics",
    "importance_from",
    "layer_left_out",
    "measure_importance",
    "plan_pruning",
    "prune_tensor",
    "run_prune",
    "top_heads",
    "top_indices",
    "write_pruned_checkpoint",
]
