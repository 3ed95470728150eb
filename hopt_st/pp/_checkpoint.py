"""The checkpoint store of :func:`hopt_st.pp.embed`: finished batches on disk, so a killed run resumes.

A checkpoint directory holds ``manifest.json`` (the run's fingerprint, number of patches and embedding
dimension) and one ``emb_<first index>.npz`` (``idx``, ``emb``) per finished batch. Every file is written under
a temporary name, flushed to disk and renamed, so a crash never leaves a partial batch under its final name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

_BATCH_FILE = re.compile(r"^emb_(\d{9})\.npz$")
MANIFEST = "manifest.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointStore:
    """Finished batches of one embedding run in ``directory``.

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
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str, n: int, dim: int, info: dict):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / MANIFEST
        if manifest.exists():
            old = json.loads(manifest.read_text())
            if old.get("fingerprint") != fingerprint or old.get("n") != n or old.get("dim") != dim:
                raise ValueError(
                    f"checkpoint_dir {str(self.dir)!r} belongs to another run (model, weights, patch size, µm/px, "
                    f"precision or spots differ: it has {old.get('info')}, this run is {info}). Use a new "
                    "checkpoint_dir, or delete that one to start over."
                )
        else:
            manifest_data = {"fingerprint": fingerprint, "n": n, "dim": dim, "info": info}
            atomic_write_bytes(manifest, json.dumps(manifest_data).encode())
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)

    def load(self, out: np.ndarray, done: np.ndarray) -> int:
        """Fill ``out`` rows (and ``done``) from the finished batches; returns the number of batch files."""
        n_files = 0
        for f in sorted(self.dir.iterdir()):
            if not _BATCH_FILE.match(f.name):
                continue
            with np.load(f) as z:
                idx, emb = z["idx"], z["emb"]
            if emb.shape != (len(idx), out.shape[1]) or (
                len(idx) and (idx.min() < 0 or idx.max() >= len(out))
            ):
                raise ValueError(
                    f"checkpoint file {str(f)!r} does not fit this run; delete the checkpoint_dir."
                )
            out[idx] = emb
            done[idx] = True
            n_files += 1
        return n_files

    def save(self, idx: np.ndarray, emb: np.ndarray) -> None:
        """Persist one finished batch atomically."""
        path = self.dir / f"emb_{int(idx[0]):09d}.npz"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, idx=idx, emb=emb)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
