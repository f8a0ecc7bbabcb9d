"""One writer per checkpoint root: ``ROOT/megakd_save.lock``.

A job that saves into ``--save ROOT`` owns the root while it lives: rank 0 creates the lock
file (host, pid, job id, start time, heartbeat) before training and refreshes its heartbeat
every ``REFRESH_SECONDS``; a second live job that would save into the same root is refused,
naming the root and the owner. Loading never looks at the lock. A lock whose owner is gone
(killed, crashed, a node lost) is taken over:

* an owner on this host is gone when its pid no longer exists (immediately known);
* an owner on another host is gone when its heartbeat has not moved for ``STALE_SECONDS``
  (measured on this host's clock, so clock skew between hosts does not matter).

The lock is written atomically (temp file + rename). Two jobs taking over the same stale lock
at once both rename; each then re-reads the file, and the one that does not find itself there
backs off. A job whose lock was taken over (it stalled longer than ``STALE_SECONDS``) finds
out at its next heartbeat or save and stops saving.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from megakd.formats.checkpoints import CheckpointError
from megakd.formats.fsutil import process_alive, write_text_atomic

LOCK_FILENAME = "megakd_save.lock"
REFRESH_SECONDS = 10.0
STALE_SECONDS = 60.0
_JOB_VARIABLES = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "JOB_ID", "PBS_JOBID")


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    job: str  # the scheduler's job id when there is one
    started: float  # wall-clock time the lock was taken
    heartbeat: int = 0  # bumped at every refresh

    @property
    def identity(self) -> tuple:
        return (self.host, self.pid, self.started)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = f", job {self.job}" if self.job else ""
        return f"host {self.host}, pid {self.pid}{job}, started {started}"


def this_process(started: Optional[float] = None) -> LockOwner:
    job = next((os.environ[name] for name in _JOB_VARIABLES if os.environ.get(name)), "")
    return LockOwner(socket.gethostname(), os.getpid(), job,
                     time.time() if started is None else started)


def lock_path(root: str) -> str:
    return os.path.join(root, LOCK_FILENAME)


def read_owner(root: str) -> Optional[LockOwner]:
    """The root's current owner, or None (no lock, or an unreadable one: treated as none)."""
    try:
        with open(lock_path(root)) as handle:
            return LockOwner(**json.load(handle))
    except (OSError, ValueError, TypeError):
        return None


def local_owner_alive(owner: LockOwner) -> Optional[bool]:
    """Whether an owner on this host still runs; None when it is on another host."""
    if owner.host != socket.gethostname():
        return None
    return owner.pid == os.getpid() or process_alive(owner.pid)


def live_foreign_owner(root: str) -> Optional[LockOwner]:
    """The owner of ``root`` when it is another process known to be alive (on this host)."""
    owner = read_owner(root)
    if owner is None or owner.pid == os.getpid() and owner.host == socket.gethostname():
        return None
    return owner if local_owner_alive(owner) else None


def owned_elsewhere(root: str, owner: LockOwner, flag: str = "--save") -> CheckpointError:
    """The refusal of a job that would save into a root another live job owns."""
    return CheckpointError(f"{flag} {root}: saved into by another live job "
                           f"({owner.describe()}); one writer per checkpoint root: use another "
                           "--save directory, or stop that job")


class RootLock:
    """This job's ownership of a checkpoint root (used by rank 0 only)."""

    def __init__(self, root: str, flag: str = "--save") -> None:
        self.root, self.flag = root, flag
        self.owner: Optional[LockOwner] = None


    def acquire(self, log: Callable[[str], None] = print) -> None:
        """Take the root, waiting (at most ``STALE_SECONDS``) to tell whether an owner on
        another host is gone. Raises CheckpointError when a live job owns it."""
        os.makedirs(self.root, exist_ok=True)
        mine = this_process()
        while True:
            owner = read_owner(self.root)
            if owner is not None and not self._gone(owner, log):
                raise owned_elsewhere(self.root, owner, self.flag)
            write_text_atomic(lock_path(self.root), json.dumps(asdict(mine)))
            time.sleep(0.2)  # a job taking over the same stale lock renames at about now
            current = read_owner(self.root)
            if current is not None and current.identity == mine.identity:
                self.owner = mine
                return
            # another job renamed after us: the next round tells whether it lives

    def _gone(self, owner: LockOwner, log: Callable[[str], None]) -> bool:
        local = local_owner_alive(owner)
        if local is not None:
            same_process = owner.host == socket.gethostname() and owner.pid == os.getpid()
            return same_process or not local  # an earlier run of this process, or dead
        log(f"megakd: {self.flag} {self.root} is locked by {owner.describe()}; watching its "
            f"heartbeat for up to {STALE_SECONDS:.0f} s to tell whether that job still runs")
        deadline = time.monotonic() + STALE_SECONDS
        while time.monotonic() < deadline:
            time.sleep(min(2.0, REFRESH_SECONDS / 2))
            current = read_owner(self.root)
            if current is None:
                return True
            if current.identity != owner.identity or current.heartbeat != owner.heartbeat:
                return False  # refreshed, or taken by another live job
        return True

    def refresh(self) -> None:
        """Bump the heartbeat (the watchdog thread calls this every ``REFRESH_SECONDS``)."""
        if self.owner is None:
            return
        current = read_owner(self.root)
        if current is not None and current.identity != self.owner.identity:
            return  # lost: check_owned reports it at the next save
        self.owner = LockOwner(**{**asdict(self.owner), "heartbeat": self.owner.heartbeat + 1})
        write_text_atomic(lock_path(self.root), json.dumps(asdict(self.owner)))

    def check_owned(self) -> None:
        """Refuse to save (CheckpointError) when another job has taken the root over."""
        current = read_owner(self.root)
        if self.owner is not None and current is not None and \
                current.identity != self.owner.identity:
            raise CheckpointError(f"{self.flag} {self.root}: this job lost the root to "
                                  f"{current.describe()} (it stalled longer than "
                                  f"{STALE_SECONDS:.0f} s); not saving")

    def release(self) -> None:
        current = read_owner(self.root)
        if self.owner is not None and current is not None and \
                current.identity == self.owner.identity:
            os.remove(lock_path(self.root))
        self.owner = None
