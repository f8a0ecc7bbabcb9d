"""Ranks end together: an error one rank sees ends every rank with the same message.

Started by :func:`megakd.runtime.initialize` once the default process group exists, a daemon
thread on every rank polls the rendezvous store (the TCPStore torch.distributed was started
with; torchrun's agent hosts it, or rank 0 without torchrun). When a rank hits bad input that
the others cannot see (a damaged cache shard read only by the last pipeline stage, a
checkpoint shard only some ranks read), :func:`abort_peers` posts its one-line message there;
every other rank's watchdog prints the same line and exits with the same status, instead of
waiting in a collective until the timeout. Every rank counts itself out and waits (bounded)
until all have read the abort, so the store stays up (its host may be rank 0) and no rank's
collective breaks before its watchdog knows why. Cost: one small store read per rank every
``POLL_SECONDS``; nothing on the training path.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

import torch

POLL_SECONDS = 1.0
EXIT_WAIT_SECONDS = 10.0  # how long an aborting rank waits for its peers to read the abort
_PREFIX = "megakd/watchdog/"
_ABORT, _EXITING = "abort", "exiting"
_program = "megakd"  # the tool's name, prefixed to the error line (set by the tool's entry)


class _Watchdog:
    def __init__(self, store, rank: int, world_size: int) -> None:
        self.store = store
        self.rank, self.world_size = rank, world_size
        self.aborting = False  # this rank posted (or is handling) an abort itself
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="megakd-watchdog", daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(POLL_SECONDS):
            try:
                posted = self.store.check([_ABORT])
            except Exception:  # the store is gone: its host ended; nothing left to coordinate
                return
            if posted and not self.aborting:
                self._exit_with_posted_message()

    def _exit_with_posted_message(self) -> None:
        payload = self.store.get(_ABORT).decode("utf-8", "replace")
        status_text, _, line = payload.partition("\n")
        print(line, file=sys.stderr, flush=True)
        # The main thread may be inside a collective whose peer is leaving: whatever it would
        # print now (a connection error) is noise after the line above.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())
        self._count_out_and_wait()
        os._exit(int(status_text))

    def _count_out_and_wait(self) -> None:
        """Say this rank is leaving, then wait (bounded) until every rank has read the abort,
        so that no rank's collective fails before its watchdog has seen why."""
        try:
            self.store.add(_EXITING, 1)
            deadline = time.monotonic() + EXIT_WAIT_SECONDS
            while time.monotonic() < deadline:
                if self.store.add(_EXITING, 0) >= self.world_size:
                    break
                time.sleep(0.05)
        except Exception:  # the store went away meanwhile: nobody is left to wait for
            pass

    def abort(self, line: str, status: int) -> None:
        if self.aborting:
            return
        self.aborting = True
        try:
            self.store.compare_set(_ABORT, "", f"{status}\n{line}")  # the first message wins
        except Exception:
            return
        self._count_out_and_wait()


_active: Optional[_Watchdog] = None


def start(rank: int, world_size: int) -> None:
    """Start this rank's watchdog on the default process group's store (idempotent)."""
    global _active
    if _active is not None or world_size < 2:
        return
    from torch.distributed import PrefixStore
    from torch.distributed.distributed_c10d import _get_default_store

    _active = _Watchdog(PrefixStore(_PREFIX, _get_default_store()), rank, world_size)
    _active.thread.start()


def set_program(name: str) -> None:
    """The tool's name, as it starts every error line (``pretrain_kd.py: error: ...``)."""
    global _program
    _program = name


def error_line(message: str) -> str:
    return f"{_program}: error: {message}"


def abort_peers(message: str, status: int) -> None:
    """End every other rank with this rank's error line and ``status`` (no-op without a
    running watchdog). Returns once the peers have been told (the store host waits for them,
    bounded); call it before tearing the process groups down."""
    if _active is not None and torch.distributed.is_initialized():
        _active.abort(error_line(message), status)


def stop() -> None:
    global _active
    if _active is not None:
        _active.stopped.set()
        _active = None
