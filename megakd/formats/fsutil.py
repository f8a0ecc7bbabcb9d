"""Filesystem helpers for crash-safe writes (checkpoints, teacher-cache shards, locks), and
whether a process of this host runs (lock owners, vanished ranks)."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename into it) to disk, so a crash after a
    ``os.replace`` cannot lose the new name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via ``path.tmp`` + fsync + rename: all or nothing."""
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".tmp", path)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, dead but not yet reaped by its
    parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True
