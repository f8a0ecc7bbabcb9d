"""Helper processes of a rank die with the rank.

megatron-core's checkpoint writer (``dist_checkpointing``'s ``FileSystemWriterAsync``) keeps a
``multiprocessing`` manager server (a spawned process, ~300 MB) for the life of the rank, to
collect write results. A rank killed with SIGKILL (the OOM killer, a node agent, ``kill -9``)
runs no finalizer, so that server would outlive it, orphaned, forever. :func:`start` hands
megatron a results queue served by a manager that this module starts itself, with the Linux
parent-death signal set, so the server dies with its rank. This pre-seeds megatron-core's
module-level queue (it creates one only when none exists); it changes no megatron code path.
The server is forked, as megatron-core forks its own write workers: a spawned one re-imports
the tool's main module, megatron-core included (3 s at every run's first save), only to
serve a queue of small write results (no tensors cross it).
:func:`kill_children` ends every child process at once (the watchdog calls it before a rank
exits on a vanished launcher or peer).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.managers
import signal
import sys

import psutil
from megatron.core.dist_checkpointing.strategies import filesystem_async

_PR_SET_PDEATHSIG = 1
_manager = None


def die_with_parent() -> None:
    """Linux: this process receives SIGKILL when its parent dies (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass


def _serve_queue_init() -> None:
    """In the forked manager server: die with the rank, and drop the rank's SIGTERM handler
    (a forked child inherits it) so that a terminate ends the server."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()


def start() -> None:
    """Serve megatron-core's checkpoint-write results queue from a manager that dies with this
    rank. Idempotent; called before a rank's first checkpoint save, so runs that never save
    start no helper process."""
    global _manager
    if _manager is not None or filesystem_async._results_queue is not None:
        return
    manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context("fork"))
    manager.start(initializer=_serve_queue_init)
    _manager = manager
    filesystem_async._results_queue = manager.Queue()


def kill_children() -> None:
    """SIGKILL every descendant of this process (best effort)."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:  # the process table is unreadable: nothing more to do
        return
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
