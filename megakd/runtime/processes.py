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

Every process a rank forks (megatron-core's checkpoint write workers, the results server,
data-loader workers) also gets the parent-death signal, through a ``os.register_at_fork`` hook
installed by :func:`forked_children_die_with_rank`: a write worker forked just before its rank
was SIGKILLed otherwise waits forever on a queue lock the dead rank held (seen: 5 in 16 chaos
kills left one). A child whose parent died during the fork itself exits at once. Children
started with ``subprocess`` (fork + exec) are not affected. The signal is tied to the forking
thread: the rank's forks all come from its main thread.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.managers
import os
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


_forking_pid = 0  # the pid of the process that is forking (set by the before-fork hook)
_hook_installed = False


def _note_forking_process() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _die_with_forking_process() -> None:
    die_with_parent()
    if os.getppid() != _forking_pid:  # the parent died before the signal was armed
        os._exit(1)


def forked_children_die_with_rank() -> None:
    """Arm the parent-death signal in every child this process forks from now on
    (idempotent; called when a rank starts)."""
    global _hook_installed
    if not _hook_installed:
        os.register_at_fork(before=_note_forking_process,
                            after_in_child=_die_with_forking_process)
        _hook_installed = True


def _serve_queue_init() -> None:
    """In the forked manager server: drop the rank's SIGTERM handler (a forked child inherits
    it) so that a terminate ends the server, and die with the rank (also where no fork hook
    is installed)."""
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
