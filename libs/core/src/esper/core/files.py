"""Durable file writes shared by every store that must survive a `kill -9` (ARCHITECTURE §7).

A reader sees the old file or the new one, never a torn mix: the bytes go to a temp file in the same
directory (unique per process and thread), are fsynced, renamed over the target, and the directory is
fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

__all__ = ["fsync_dir", "write_bytes_atomic"]


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
