"""What a run loads, where and when it saves, and when it stops early (docs/checkpoints.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megakd.configs.fields import flag


@dataclass
class CheckpointConfig:
    teacher_load: Optional[str] = flag(
        None, name="--teacher-load", metavar="DIR",
        help="teacher weights: a checkpoint root or directory (converted or saved by megakd, "
             "any TP/PP)")
    teacher_cache: Optional[str] = flag(
        None, name="--teacher-cache", metavar="DIR",
        help="read the teacher's top-k from a cache written by tools/precompute_teacher_topk.py "
             "instead of running a teacher (none is built); needs --kd-topk "
             "(docs/teacher_cache.md)")
    load: Optional[str] = flag(
        None, name="--load", metavar="DIR",
        help="resume from a checkpoint root (weights, optimizer, LR schedule, RNG, iteration, "
             "consumed samples) or load weights from one checkpoint directory; release "
             "(converted) checkpoints load weights only; may equal --save before the first save")
    save: Optional[str] = flag(
        None, name="--save", metavar="DIR",
        help="checkpoint root: iter_%07d/ training checkpoints + "
             "latest_checkpointed_iteration.txt, written atomically; saved at the end, every "
             "--save-interval, and on exit")
    save_interval: Optional[int] = flag(None, name="--save-interval", low=1,
                                        help="iterations between checkpoints (needs --save)")
    pretrained_checkpoint: Optional[str] = flag(
        None, name="--pretrained-checkpoint", metavar="DIR",
        help="student weights (e.g. a converted HF model) used while --load holds no "
             "checkpoint yet: the first launch of a resumable job starts from them, later "
             "launches resume from --load")
    finetune: bool = flag(False, name="--finetune",
                          help="load weights only from --load: iteration 0, fresh optimizer "
                               "and schedule")
    no_load_optim: bool = flag(False, name="--no-load-optim",
                               help="do not restore the optimizer state from --load")
    no_load_rng: bool = flag(False, name="--no-load-rng",
                             help="do not restore the RNG states from --load")
    override_opt_param_scheduler: bool = flag(
        False, name="--override-opt_param-scheduler",
        help="on resume, take the LR schedule from the flags, ignoring the checkpoint's")
    use_checkpoint_opt_param_scheduler: bool = flag(
        False, name="--use-checkpoint-opt_param-scheduler",
        help="on resume, take the LR schedule from the checkpoint, ignoring the flags")
    exit_interval: Optional[int] = flag(None, name="--exit-interval", low=1,
                                        help="save and exit after an iteration that is a "
                                             "multiple of this")
    exit_duration_in_mins: Optional[float] = flag(
        None, name="--exit-duration-in-mins", low=0.0, low_inclusive=False,
        help="save and exit after this many minutes since the process started (SLURM time "
             "limits)")
    exit_signal_handler: bool = flag(False, name="--exit-signal-handler",
                                     help="on SIGTERM, all ranks save and exit after the "
                                          "current iteration")
