"""Filesystem helpers for crash-safe writes (checkpoints, teacher-cache shards)."""

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
