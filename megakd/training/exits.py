"""When to stop early: ``--exit-interval``, ``--exit-duration-in-mins``, ``--exit-signal-handler``.

Every rank must take the same decision at the same iteration (the decision is followed by a
collective checkpoint save), so conditions that can differ between ranks (a SIGTERM reaching
one rank first, one rank's clock crossing the time limit) are combined with one small
all-reduce (MAX) per iteration, and only when such a condition is configured.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Iterator, Optional

import torch

from megakd.configs import CheckpointConfig

EXIT_INTERVAL = "exit interval"
EXIT_DURATION = "exit duration"
EXIT_SIGNAL = "SIGTERM"


def process_start_time() -> float:
    """Wall-clock time this process started (SLURM's time limit counts from then)."""
    import psutil

    return psutil.Process().create_time()


class ExitConditions:
    """Decides, identically on every rank, whether training saves and stops after an iteration."""

    def __init__(self, config: CheckpointConfig, device: torch.device,
                 start_time: Optional[float] = None) -> None:
        self.interval = config.exit_interval
        self.duration_s = (None if config.exit_duration_in_mins is None
                           else config.exit_duration_in_mins * 60.0)
        self.handle_signal = config.exit_signal_handler
        self.device = device
        self.start_time = process_start_time() if start_time is None else start_time
        self.signal_received = False

    def _on_signal(self, signum, frame) -> None:
        self.signal_received = True

    @contextlib.contextmanager
    def installed(self) -> Iterator["ExitConditions"]:
        """Catch SIGTERM (with ``--exit-signal-handler``) for the duration of the block."""
        if not self.handle_signal:
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    def check(self, iteration: int) -> Optional[str]:
        """Why to stop after ``iteration`` (the same on every rank), or None. Collective when
        ``--exit-signal-handler`` or ``--exit-duration-in-mins`` is set."""
        if self.handle_signal or self.duration_s is not None:
            over_time = (self.duration_s is not None
                         and time.time() - self.start_time > self.duration_s)
            flags = torch.tensor([int(self.signal_received), int(over_time)],
                                 dtype=torch.int32, device=self.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            if flags[0].item():
                return EXIT_SIGNAL
            if flags[1].item():
                return EXIT_DURATION
        if self.interval is not None and iteration % self.interval == 0:
            return EXIT_INTERVAL
        return None
