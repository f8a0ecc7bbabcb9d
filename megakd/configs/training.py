"""Batch, optimizer and schedule of a training run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megakd.configs.fields import flag

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


@dataclass
class TrainingConfig:
    """Batch sizes, iterations, Adam and the LR schedule (Megatron-LM's flags)."""

    micro_batch_size: int = flag(1, name="--micro-batch-size", low=1,
                                 help="samples per microbatch")
    global_batch_size: Optional[int] = flag(None, name="--global-batch-size", low=1,
                                            default_text="mbs x DP",
                                            help="samples per iteration")
    train_iters: Optional[int] = flag(None, name="--train-iters", low=1, required=True,
                                      help="iterations")
    lr: Optional[float] = flag(None, name="--lr", low=0.0, required=True,
                               help="peak learning rate")
    min_lr: float = flag(0.0, name="--min-lr", low=0.0, help="final learning rate")
    lr_decay_style: str = flag("cosine", name="--lr-decay-style", choices=LR_DECAY_STYLES,
                               help="LR decay after warm-up")
    lr_warmup_iters: int = flag(0, name="--lr-warmup-iters", low=0,
                                help="warm-up iterations (counted in samples internally, as "
                                     "Megatron-LM)")
    lr_decay_iters: Optional[int] = flag(None, name="--lr-decay-iters", low=1,
                                         default_text="train iters",
                                         help="iterations of the LR decay")
    weight_decay: float = flag(0.01, name="--weight-decay", low=0.0,
                               help="AdamW weight decay")
    adam_beta1: float = flag(0.9, name="--adam-beta1", low=0.0, high=1.0,
                             high_inclusive=False, help="Adam beta1")
    adam_beta2: float = flag(0.999, name="--adam-beta2", low=0.0, high=1.0,
                             high_inclusive=False, help="Adam beta2")
    adam_eps: float = flag(1e-8, name="--adam-eps", low=0.0, low_inclusive=False,
                           help="Adam epsilon")
    clip_grad: float = flag(1.0, name="--clip-grad", low=0.0,
                            help="gradient-norm clipping (0 disables)")
    bf16: bool = flag(False, name="--bf16",
                      help="bf16 models; fp32 main weights and gradient reduction")
    seed: int = flag(1234, name="--seed", low=0,
                     help="seed for weights, data order and dropout")
    log_interval: int = flag(100, name="--log-interval", low=1,
                             help="iterations between log lines")
    check_for_nan_in_loss_and_grad: bool = flag(
        True, name="--no-check-for-nan-in-loss-and-grad", inverted=True,
        help="do not check the losses and the gradient norm for NaN/inf every iteration "
             "(default: check, and stop at the first non-finite value, before the optimizer "
             "step and without saving)")
    skip_nonfinite_iterations: bool = flag(
        False, name="--skip-nonfinite-iterations",
        help="instead of stopping, skip the optimizer step of an iteration whose loss or "
             "gradient is non-finite (counted in 'number of skipped iterations')")
    max_consecutive_skipped_iterations: int = flag(
        3, name="--max-consecutive-skipped-iterations", low=1,
        help="with --skip-nonfinite-iterations: stop after this many skipped iterations in "
             "a row")
    max_skipped_iterations: int = flag(
        20, name="--max-skipped-iterations", low=1,
        help="with --skip-nonfinite-iterations: stop after this many skipped iterations in "
             "all")

    @property
    def decay_iters(self) -> int:
        """Iterations the LR decays over: ``--lr-decay-iters``, else ``--train-iters``."""
        return self.lr_decay_iters or self.train_iters

    @property
    def train_samples(self) -> int:
        """Samples the whole run reads: ``--train-iters`` x ``--global-batch-size``."""
        return self.train_iters * self.global_batch_size
