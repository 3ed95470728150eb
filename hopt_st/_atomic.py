"""Atomic file (and folder) writes: a temporary name in the same folder, fsync, then ``os.replace``.

A reader never sees a half-written file under its final name, and a failed write leaves the previous file
(if any) exactly as it was. Temporary names start with a dot and end in ``.tmp``
(``.<name>.<random>.tmp``), so globbing for ``*.h5`` or ``*.csv`` never picks them up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (folders where the file system allows it)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        with contextlib.suppress(OSError):
            _fsync(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder path next to ``path`` (not created); when the block ends without error, what
    was written there is flushed to disk and replaces ``path``.

    An existing ``path`` (folder or file) is first moved aside and deleted only once the new folder is in place,
    so a failure at any point leaves either the old ``path`` or the new one, never a mix. On error the
    temporary folder is removed and ``path`` is left untouched.
    """
    path = Path(path)
    token = uuid.uuid4().hex[:12]
    tmp = path.with_name(f".{path.name}.{token}.tmp")
    old = path.with_name(f".{path.name}.{token}.old.tmp")
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists() or path.is_symlink():
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
        with contextlib.suppress(OSError):
            _fsync(path.parent)
    finally:
        _remove(tmp)
