"""Atomic file writes: a temporary name in the same folder, fsync, then ``os.replace``.

A reader never sees a half-written file under its final name, and a failed write leaves the previous file
(if any) exactly as it was. Temporary names start with a dot and end in ``.tmp``
(``.<name>.<random>.tmp``), so globbing for ``*.h5`` or ``*.csv`` never picks them up.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def tmp_pattern(path: Path) -> str:
    """Glob pattern of the temporary files :func:`atomic_path` creates for ``path``."""
    return f".{path.name}.*.tmp"


def remove_stale_tmp(path: Path) -> int:
    """Delete temporary files left for ``path`` by a writer that died; returns how many were removed."""
    n = 0
    for tmp in path.parent.glob(tmp_pattern(path)):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            n += 1
    return n


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without error it replaces ``path``.

    The caller writes (and closes) the temporary file inside the block; it is then flushed to disk and
    renamed onto ``path``. On error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
