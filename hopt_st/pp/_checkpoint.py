"""The checkpoint store of :func:`hopt_st.pp.embed`: finished batches on disk, so a killed run resumes.

A checkpoint directory holds ``manifest.json`` (the run's fingerprint, number of patches and embedding
dimension) and one ``emb_<first index>.npz`` (``idx``, ``emb``) per finished batch. Every file is written under
a temporary name, flushed to disk and renamed, so a crash never leaves a partial batch under its final name.
Batch files are only ever reused under a manifest of the same run (its fingerprint includes the raw pixels of
32 evenly spaced windows and the image file's size and modification time, see :meth:`hopt_st.pp.Patches.fingerprint`), and one process at a time uses a directory: it holds
an exclusive lock on ``.lock`` (released when the run ends or the process dies); a second process waits up to
:data:`LOCK_TIMEOUT_S` seconds, then fails with ``TimeoutError``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from .._atomic import TMP_SUFFIX, atomic_write_bytes
from .._errors import CorruptFileError
from .._lock import FileLock

logger = logging.getLogger(__name__)

_BATCH_FILE = re.compile(r"^emb_(\d{9})\.npz$")
MANIFEST = "manifest.json"
LOCK = ".lock"
#: how long a second process waits for a checkpoint directory in use before giving up
LOCK_TIMEOUT_S = 10.0
_START_OVER = "delete the checkpoint_dir (or pass a new one) to start over"


def _DirLock(path: Path, timeout: float) -> FileLock:  # noqa: N802 - the checkpoint directory's lock
    """An exclusive lock on a checkpoint directory's lock file (:class:`hopt_st._lock.FileLock`)."""
    return FileLock(
        path,
        timeout,
        lambda holder: (
            f"checkpoint_dir {str(path.parent)!r} is in use by {holder} (lock file {str(path)!r}; waited "
            f"{timeout:g} s). Wait for that run to finish, or use another checkpoint_dir."
        ),
    )


def _read_manifest(path: Path) -> dict:
    try:
        old = json.loads(path.read_bytes())
        if not isinstance(old, dict) or not {"fingerprint", "n", "dim"} <= set(old):
            raise ValueError("not a manifest")
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFileError(
            path, f"checkpoint manifest {str(path)!r} is corrupt ({e}): {_START_OVER}."
        ) from None
    return old


class CheckpointStore:
    """Finished batches of one embedding run in ``directory``; a context manager holding its lock.

    Parameters
    ----------
    directory
        The checkpoint directory (created).
    fingerprint
        Identity of the run (model, weights, precision, patches); a directory of another run is refused.
    n
        Number of patches.
    dim
        Embedding dimension.
    info
        Human-readable description of the run, stored in the manifest and shown when refusing.
    lock_timeout
        Seconds to wait for a directory another process is using; default :data:`LOCK_TIMEOUT_S`.

    Raises
    ------
    ValueError
        The directory belongs to another run, or holds batch files without a manifest.
    CorruptFileError
        The manifest cannot be read.
    TimeoutError
        Another process still uses the directory after ``lock_timeout`` seconds.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        fingerprint: str,
        n: int,
        dim: int,
        info: dict,
        *,
        lock_timeout: float | None = None,
    ):
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise NotADirectoryError(f"checkpoint_dir {str(self.dir)!r} is a file, not a folder.")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = _DirLock(self.dir / LOCK, LOCK_TIMEOUT_S if lock_timeout is None else lock_timeout)
        self._lock.acquire()
        try:
            self._open(fingerprint, n, dim, info)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, fingerprint: str, n: int, dim: int, info: dict) -> None:
        manifest = self.dir / MANIFEST
        for tmp in self.dir.glob(f"*{TMP_SUFFIX}"):  # left by a killed run (we hold the lock: none is live)
            tmp.unlink(missing_ok=True)
        if manifest.exists():
            old = _read_manifest(manifest)
            if old.get("fingerprint") != fingerprint or old.get("n") != n or old.get("dim") != dim:
                raise ValueError(
                    f"checkpoint_dir {str(self.dir)!r} belongs to another run (model, weights, patch size, µm/px, "
                    f"precision, spots or image pixels differ: it has {old.get('info')}, this run is {info}). Use "
                    "a new checkpoint_dir, or delete that one to start over."
                )
            return
        batches = [f.name for f in self.dir.iterdir() if _BATCH_FILE.match(f.name)]
        if batches:
            raise ValueError(
                f"checkpoint_dir {str(self.dir)!r} holds {len(batches)} batch files (e.g. {batches[0]!r}) but no "
                f"{MANIFEST}, so nothing tells which run they belong to and they are not reused: {_START_OVER}."
            )
        manifest_data = {"fingerprint": fingerprint, "n": n, "dim": dim, "info": info}
        atomic_write_bytes(manifest, json.dumps(manifest_data).encode(), what="checkpoint manifest")

    def close(self) -> None:
        """Release the directory's lock (finished batches stay on disk)."""
        self._lock.release()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load(self, out: np.ndarray, done: np.ndarray) -> int:
        """Fill ``out`` rows (and ``done``) from the finished batches; returns the number of batch files."""
        n_files = 0
        for f in sorted(self.dir.iterdir()):
            if not _BATCH_FILE.match(f.name):
                continue
            try:
                with (
                    open(f, "rb") as fh,
                    np.load(fh, allow_pickle=False) as z,
                ):  # closed even if np.load fails
                    idx, emb = np.asarray(z["idx"]), np.asarray(z["emb"])
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                raise CorruptFileError.from_error(
                    f,
                    e,
                    what="checkpoint batch file",
                    fix="delete it and run again (only that batch is recomputed).",
                ) from None
            if (
                idx.ndim != 1
                or idx.dtype.kind not in "iu"
                or emb.shape != (len(idx), out.shape[1])
                or (len(idx) and (idx.min() < 0 or idx.max() >= len(out)))
                or not np.isfinite(emb).all()
            ):
                raise CorruptFileError(
                    f,
                    f"checkpoint file {str(f)!r} does not fit this run (indices, shape or NaN values): delete it.",
                )
            out[idx] = emb
            done[idx] = True
            n_files += 1
        return n_files

    def save(self, idx: np.ndarray, emb: np.ndarray) -> None:
        """Persist one finished batch atomically."""
        buf = io.BytesIO()
        np.savez(buf, idx=idx, emb=emb)
        atomic_write_bytes(self.dir / f"emb_{int(idx[0]):09d}.npz", buf.getvalue(), what="checkpoint batch")
