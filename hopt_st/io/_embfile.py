"""Per-sample embedding files in HEST's layout: the format HEST's benchmark writes and reads, and hopt_st's own.

HEST (github.com/mahmoodlab/HEST ``src/hest/bench/benchmark.py`` ``embed_tiles`` / ``save_hdf5``, commit
``afd42c3``) writes ``<embed_dataroot>/<task>/<encoder>/<sample_id>.h5`` with the datasets

``embeddings``
    (N, D), the encoder's output dtype (float32).
``barcodes``
    (N, 1) fixed-length bytes, the patch file's barcodes in patch order.
``coords``
    (N, 2) int, the patch file's top-left corners.

and no attributes; its benchmark reads every dataset back (``read_assets_from_h5``) and ignores attributes.
hopt_st writes exactly these datasets, plus provenance attributes on the file root (``hopt_st_fingerprint``:
what the embeddings were computed from; model, weights, patch file, version) and a 512-byte HDF5 user block
(invisible to HDF5 readers, HEST's included) that names the file as hopt_st's even when a crash or a full disk
has truncated the rest. A file without that mark is someone else's: it is read as it is and never replaced.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .._files import atomic_path
from .._patchset import decode_barcodes

logger = logging.getLogger(__name__)

#: root attribute holding the fingerprint of what an hopt_st embedding file was computed from
FINGERPRINT_ATTR = "hopt_st_fingerprint"
_USERBLOCK = 512
_MAGIC = b"hopt_st embeddings file\n"


@dataclass
class EmbeddingFile:
    """What an embedding file holds: ``embeddings`` (N, D) in their stored dtype, ``barcodes`` (N,) str,
    ``coords`` (N, 2) or ``None``, and the root attributes."""

    embeddings: np.ndarray
    barcodes: np.ndarray
    coords: np.ndarray | None
    attrs: dict = field(default_factory=dict)


def written_by_hopt_st(path: str | os.PathLike) -> dict | None:
    """The mark hopt_st leaves in the user block of its embedding files (``{"fingerprint": ...}``), or ``None``
    for a file hopt_st did not write. Reads the first 512 bytes only, so it works on truncated files."""
    try:
        with open(path, "rb") as f:
            head = f.read(_USERBLOCK)
    except OSError:
        return None
    if not head.startswith(_MAGIC):
        return None
    body = head[len(_MAGIC) :].rstrip(b"\0 \n")
    try:
        mark = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return mark if isinstance(mark, dict) else {}


def write_embeddings_h5(
    path: str | os.PathLike,
    embeddings: np.ndarray,
    barcodes,
    coords: np.ndarray | None = None,
    *,
    fingerprint: str,
    attrs: dict | None = None,
) -> Path:
    """Write one sample's embeddings in HEST's embedding-file layout (see the module docstring), atomically.

    Parameters
    ----------
    path
        Output ``.h5``; written under a temporary name in the same folder, fsynced, then renamed.
    embeddings
        (N, D) array, stored in its own dtype.
    barcodes
        N spot barcodes, stored as (N, 1) fixed-length bytes.
    coords
        (N, 2) patch corners, stored as int64; zeros when ``None``.
    fingerprint
        What the embeddings were computed from (stored as ``attrs["hopt_st_fingerprint"]`` and in the user block).
    attrs
        More provenance attributes for the file root (str, numbers).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    embeddings = np.asarray(embeddings)
    n = embeddings.shape[0]
    encoded = [str(b).encode() for b in np.asarray(barcodes).reshape(-1)]
    if len(encoded) != n:
        raise ValueError(f"{len(encoded)} barcodes for {n} embeddings; they must match row by row ({path}).")
    bc = np.array(encoded, dtype=f"S{max([1] + [len(b) for b in encoded])}").reshape(n, 1)
    coords = (
        np.zeros((n, 2), np.int64) if coords is None else np.asarray(coords).astype(np.int64).reshape(n, 2)
    )
    mark = _MAGIC + json.dumps({"fingerprint": fingerprint}).encode()
    if len(mark) > _USERBLOCK:
        raise ValueError(f"fingerprint too long for the {_USERBLOCK}-byte user block: {fingerprint!r}.")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=_USERBLOCK) as f:
            for key, val in (("embeddings", embeddings), ("barcodes", bc), ("coords", coords)):
                f.create_dataset(key, data=val, chunks=True if n else None, maxshape=(None,) + val.shape[1:])
            f.attrs[FINGERPRINT_ATTR] = fingerprint
            for key, val in (attrs or {}).items():
                f.attrs[key] = "" if val is None else val
        with open(tmp, "r+b") as raw:
            raw.write(mark.ljust(_USERBLOCK, b"\0"))
    return Path(path)


def read_embeddings_h5(path: str | os.PathLike) -> EmbeddingFile:
    """Read an embedding file (HEST's or hopt_st's), checking its layout.

    Raises
    ------
    ValueError
        Naming the file, when it cannot be read (truncated, not HDF5) or lacks HEST's datasets / shapes.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("embeddings", "barcodes") if k not in f]
            if missing:
                raise ValueError(
                    f"embedding file {str(path)!r} has no {missing} dataset(s) (it has {list(f.keys())}); HEST's "
                    "embedding files hold 'embeddings' (N, D), 'barcodes' (N, 1) and 'coords' (N, 2)."
                )
            X = f["embeddings"][:]
            bc_raw = f["barcodes"][:]
            coords = f["coords"][:] if "coords" in f else None
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except ValueError:
        raise
    except (OSError, KeyError, RuntimeError) as err:
        raise ValueError(
            f"embedding file {str(path)!r} cannot be read ({err}); it may be truncated or not HDF5. "
            "Re-create it (delete it to let hopt_st recompute it) or point embeddings_dir elsewhere."
        ) from err
    if X.ndim != 2 or X.dtype.kind != "f":
        raise ValueError(
            f"embedding file {str(path)!r}: 'embeddings' must be a 2-D float array, got {X.dtype} {X.shape}."
        )
    barcodes = decode_barcodes(bc_raw) if len(bc_raw) else np.array([], dtype=str)
    if len(barcodes) != X.shape[0]:
        raise ValueError(
            f"embedding file {str(path)!r}: {len(barcodes)} barcodes for {X.shape[0]} embeddings; they must "
            "match row by row."
        )
    return EmbeddingFile(X, barcodes, coords, attrs)
