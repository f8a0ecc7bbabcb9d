"""Ranks live and end together: with their launcher, with their peers, on one rank's error.

:func:`start` (called by :func:`megakd.runtime.initialize`) runs a daemon thread on every rank
that wakes every ``POLL_SECONDS`` and talks to the rendezvous store (the TCPStore
torch.distributed was started with: torchrun's agent hosts it, or rank 0 without torchrun):

* **launcher death**: under a launcher (torchrun, srun, mpirun) the rank's parent process is
  the launcher; when it is gone (the rank was re-parented), the rank prints one line and exits
  at once, writing nothing further (a SIGKILLed torchrun leaves no orphans training on);
* **peer death**: a peer on this host whose process is gone (its pid, posted in the store,
  no longer runs) is reported within ``POLL_SECONDS``; across hosts every rank increments its
  heartbeat counter in the store and watches its neighbour's (rank + 1): a neighbour silent
  for ``heartbeat_timeout`` seconds (at most the collective timeout) is reported. Every rank
  then exits naming it; a store that stops answering means its host (rank 0, or the launcher)
  is gone;
* **one rank's bad input**: :func:`abort_peers` posts a rank's one-line error; every other rank
  prints the same line and exits with the same status instead of waiting in a collective.
  Every rank counts itself out and waits (bounded) until all have read it, so the store stays
  up and no rank's collective breaks before its watchdog knows why;
* **periodic work**: :func:`every` runs a callback on this thread (rank 0 refreshes the
  checkpoint root's lock with it).

A collective that fails in the main thread because a peer died (gloo: "Connection closed by
peer") becomes a :class:`PeerLostError` naming the rank that vanished (:func:`lost_peer_error`).
Cost: a few small store operations per rank every ``POLL_SECONDS``; nothing on the training
path.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Callable, List, Optional, Tuple

import torch

from megakd.formats.fsutil import process_alive
from megakd.runtime.processes import kill_children

POLL_SECONDS = 1.0
EXIT_WAIT_SECONDS = 10.0  # how long an aborting rank waits for its peers to read the abort
HEARTBEAT_TIMEOUT_SECONDS = 120.0  # a silent neighbour is gone (capped by the collective timeout)
LOST_STATUS = 1  # exit status when the launcher, a peer or the store vanished
_PREFIX = "megakd/watchdog/"
_ABORT, _EXITING = "abort", "exiting"
_program = "megakd"  # the tool's name, prefixed to the error line (set by the tool's entry)
_PEER_LOSS_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


class PeerLostError(RuntimeError):
    """A collective failed because another rank's process is gone."""

    exit_status = LOST_STATUS


def error_line(message: str) -> str:
    return f"{_program}: error: {message}"


class _Watchdog:
    def __init__(self, store, rank: int, world_size: int, parent_pid: Optional[int],
                 heartbeat_timeout: float) -> None:
        self.store = store
        self.rank, self.world_size = rank, world_size
        self.parent_pid = parent_pid  # None: not launched by a launcher, nothing to watch
        self.heartbeat_timeout = heartbeat_timeout
        self.neighbour = (rank + 1) % world_size
        self.neighbour_beats, self.neighbour_seen = -1, time.monotonic()
        self.callbacks: List[List] = []  # [interval, fn, next due]
        self.aborting = False  # this rank posted (or is handling) an abort itself
        self.local_peers: dict = {}  # rank -> pid of the peers on this host (posted in the store)
        self.unposted = [r for r in range(world_size) if r != rank]  # peers not yet looked up
        self.gone: set = set()  # peers known dead: they never count out
        self.leaving = threading.Event()  # this thread is ending the process
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="megakd-watchdog", daemon=True)
        self.store.set(f"info/{rank}", f"{socket.gethostname()}:{os.getpid()}")

    def _run(self) -> None:
        while not self.stopped.wait(POLL_SECONDS):
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self._leave(f"rank {self.rank}: its launcher (pid {self.parent_pid}) is gone; "
                            "exiting without saving")
            try:
                self._poll_store()
            except Exception:  # the store is gone: its host ended
                if self.stopped.is_set():
                    return
                self._leave(f"rank {self.rank}: the rendezvous store stopped answering (its "
                            "host, rank 0 or the launcher, is gone); exiting without saving")
            self._run_callbacks()

    def _poll_store(self) -> None:
        if self.store.check([_ABORT]):
            if not self.aborting:
                self._exit_with_posted_message()
            return
        self.store.add(f"beat/{self.rank}", 1)
        if self.world_size < 2:
            return
        self._check_local_peers()
        beats = self.store.add(f"beat/{self.neighbour}", 0)
        now = time.monotonic()
        if beats != self.neighbour_beats:
            self.neighbour_beats, self.neighbour_seen = beats, now
        elif now - self.neighbour_seen > self.heartbeat_timeout:
            self.abort(error_line(f"rank {self.neighbour} stopped responding (no heartbeat for "
                                  f"{now - self.neighbour_seen:.0f} s); exiting without "
                                  "saving"), LOST_STATUS)
            self._exit_with_posted_message()

    def _posted(self, rank: int) -> Tuple[str, int]:
        """(host, pid) that ``rank`` posted in the store when its watchdog started."""
        host, _, pid = self.store.get(f"info/{rank}").decode().rpartition(":")
        return host, int(pid)

    def _check_local_peers(self) -> None:
        """Abort naming a peer of this host whose process is gone (a few syscalls per poll)."""
        if self.aborting:
            return
        host = socket.gethostname()
        for peer in [r for r in self.unposted if self.store.check([f"info/{r}"])]:
            self.unposted.remove(peer)
            peer_host, pid = self._posted(peer)
            if peer_host == host:
                self.local_peers[peer] = pid
        for peer, pid in self.local_peers.items():
            if not process_alive(pid):
                self.gone.add(peer)
                self.leaving.set()
                self.abort(error_line(f"rank {self.rank}: rank {peer} (pid {pid}) is gone; "
                                      "exiting without saving"), LOST_STATUS)
                self._exit_with_posted_message()

    def _run_callbacks(self) -> None:
        now = time.monotonic()
        for entry in self.callbacks:
            interval, fn, due = entry
            if now >= due:
                entry[2] = now + interval
                try:
                    fn()
                except Exception as error:  # a periodic chore must not kill the rank
                    print(f"megakd: rank {self.rank}: watchdog task failed: {error}",
                          file=sys.stderr, flush=True)

    def _silence_stderr(self) -> None:
        """The main thread may be inside a collective whose peer is leaving: whatever it would
        print from now on (a connection error) is noise after our one line."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())

    def _leave(self, message: str) -> None:
        self.leaving.set()
        print(error_line(message), file=sys.stderr, flush=True)
        self._silence_stderr()
        kill_children()  # helpers (checkpoint writers) must not outlive the rank
        os._exit(LOST_STATUS)

    def _exit_with_posted_message(self) -> None:
        self.leaving.set()
        payload = self.store.get(_ABORT).decode("utf-8", "replace")
        status_text, _, line = payload.partition("\n")
        print(line, file=sys.stderr, flush=True)
        self._silence_stderr()
        self._count_out_and_wait()
        kill_children()
        os._exit(int(status_text))

    def _count_out_and_wait(self) -> None:
        """Say this rank is leaving, then wait (bounded) until every rank has read the abort,
        so that no rank's collective fails before its watchdog has seen why."""
        try:
            self.store.add(_EXITING, 1)
            deadline = time.monotonic() + EXIT_WAIT_SECONDS
            while time.monotonic() < deadline:
                if self.store.add(_EXITING, 0) >= self.world_size - len(self.gone):
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

    def lost_peers(self) -> str:
        """Which ranks are gone, as far as this host can tell (their pids are local)."""
        host, gone, remote = socket.gethostname(), [], 0
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            peer_host, pid = self._posted(rank)
            if peer_host != host:
                remote += 1
            elif not process_alive(pid):
                gone.append(f"rank {rank} (pid {pid})")
        if gone:
            return f"{', '.join(gone)} {'is' if len(gone) == 1 else 'are'} gone"
        return "a rank on another host is gone" if remote else "a peer rank is gone"


_active: Optional[_Watchdog] = None


def start(rank: int, world_size: int, launched: bool, collective_timeout_s: float) -> None:
    """Start this rank's watchdog on the default process group's store (idempotent).
    ``launched``: the rank was started by a launcher whose death must end it."""
    global _active
    if _active is not None:
        return
    from torch.distributed import PrefixStore
    from torch.distributed.distributed_c10d import _get_default_store

    _active = _Watchdog(PrefixStore(_PREFIX, _get_default_store()), rank, world_size,
                        os.getppid() if launched else None,
                        min(HEARTBEAT_TIMEOUT_SECONDS, collective_timeout_s))
    _active.thread.start()


def set_program(name: str) -> None:
    """The tool's name, as it starts every error line (``pretrain_kd.py: error: ...``)."""
    global _program
    _program = name


def every(seconds: float, fn: Callable[[], None]) -> None:
    """Run ``fn`` on the watchdog thread every ``seconds`` (no-op without a watchdog)."""
    if _active is not None:
        _active.callbacks.append([seconds, fn, time.monotonic() + seconds])


def check_launcher() -> None:
    """Raise :class:`PeerLostError` when this rank's launcher is gone (called right before a
    checkpoint is committed, so that no checkpoint appears after the launcher died)."""
    if _active is not None and _active.parent_pid is not None \
            and os.getppid() != _active.parent_pid:
        raise PeerLostError(f"rank {_active.rank}: its launcher (pid {_active.parent_pid}) is "
                            "gone; the checkpoint in progress is not committed")


def abort_peers(message: str, status: int) -> None:
    """End every other rank with this rank's error line and ``status`` (no-op without a
    running watchdog). Returns once the peers have been told (bounded); call it before
    tearing the process groups down."""
    if _active is not None and torch.distributed.is_initialized():
        _active.abort(error_line(message), status)


def lost_peer_error(error: BaseException) -> Optional[PeerLostError]:
    """A :class:`PeerLostError` naming the vanished rank when ``error`` is a collective that
    failed because a peer died; None for any other error."""
    if not isinstance(error, RuntimeError) or isinstance(error, PeerLostError):
        return None
    text = str(error)
    if not (isinstance(error, torch.distributed.DistBackendError)
            or any(sign in text for sign in _PEER_LOSS_SIGNS)):
        return None
    if _active is not None and _active.leaving.is_set():
        # the watchdog thread has seen it and is printing the one line and ending the process
        _active.stopped.wait(EXIT_WAIT_SECONDS + 5.0)
    who = "a peer rank is gone"
    if _active is not None:
        try:
            who = _active.lost_peers()
        except Exception:
            who = "a peer rank is gone (the rendezvous store is gone too)"
    rank = _active.rank if _active is not None else torch.distributed.get_rank()
    return PeerLostError(f"rank {rank}: {who}; a collective failed "
                         f"({text.strip().splitlines()[0][:160]}); exiting without saving")


def stop() -> None:
    global _active
    if _active is not None:
        _active.stopped.set()
        _active = None
