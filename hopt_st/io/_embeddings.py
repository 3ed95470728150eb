"""One sample's embeddings on disk, in the layout of HEST-Benchmark's embedding files.

HEST's ``embed_tiles`` (``src/hest/bench/benchmark.py`` in github.com/mahmoodlab/HEST, commit ``afd42c3``)
writes ``<embed_dataroot>/<task>/<encoder>/<sample_id>.h5`` with::

    embeddings   (n, dim) float32    one row per patch, in patch-file order
    barcodes     (n, 1) bytes        spot barcodes (fixed-length ``|S``)
    coords       (n, 2) int64        top-left (x, y) of each patch in full-resolution pixels

and reads it back with ``read_assets_from_h5`` (every dataset) and
``assets['barcodes'].flatten().astype(str)``. hopt_st writes exactly these datasets, so HEST reads its files,
plus ``centers`` ((n, 2) float64 exact spot centres) and two root attributes: ``hopt_st_fingerprint`` (what
the embeddings were computed from: sample, model, weights, patch geometry, precision) and
``hopt_st_provenance`` (JSON), and a 512-byte HDF5 user block (invisible to HDF5 readers, HEST's included) that
names the file as hopt_st's even when it has been truncated (:func:`written_by_hopt_st`). Files are written
atomically (:mod:`hopt_st._atomic`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .._atomic import atomic_path, remove_stale_tmp
from .._h5 import open_h5
from .._patchset import decode_barcodes

logger = logging.getLogger(__name__)

#: root attribute holding the fingerprint of what the embeddings were computed from (marks hopt_st's files)
FINGERPRINT_ATTR = "hopt_st_fingerprint"
#: root attribute holding the provenance as JSON
PROVENANCE_ATTR = "hopt_st_provenance"
_USERBLOCK = 512
_MAGIC = b"hopt_st embeddings file\n"


@dataclass(frozen=True)
class SampleEmbeddings:
    """The content of one embedding file (see :func:`read_embeddings`).

    Attributes
    ----------
    embeddings
        ``(n, dim)``, float32 unless read with another ``dtype``.
    barcodes
        ``(n,)`` str.
    coords
        ``(n, 2)`` int64 top-left patch corners in full-resolution pixels (HEST's convention), or ``None``.
    centers
        ``(n, 2)`` float64 spot centres in full-resolution pixels, or ``None``.
    fingerprint
        hopt_st's fingerprint, ``None`` for a file written by HEST itself.
    provenance
        hopt_st's provenance (empty for a HEST file).
    """

    embeddings: np.ndarray
    barcodes: np.ndarray
    coords: np.ndarray | None = None
    centers: np.ndarray | None = None
    fingerprint: str | None = None
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.barcodes)


def _rows(name: str, value, n: int, path: Path, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.shape != (n, 2):
        raise ValueError(f"{name} for {str(path)!r} must be ({n}, 2); got {arr.shape}.")
    return arr


def write_embeddings(
    path: str | os.PathLike,
    embeddings: np.ndarray,
    barcodes,
    *,
    coords: np.ndarray | None = None,
    centers: np.ndarray | None = None,
    fingerprint: str | None = None,
    provenance: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one sample's embeddings in HEST's embedding-file layout (see the module docstring).

    Parameters
    ----------
    path
        Output ``.h5`` file; its folder is created. Written under a temporary name and renamed when complete.
    embeddings
        ``(n, dim)`` array, stored as float32.
    barcodes
        ``n`` spot barcodes.
    coords
        ``(n, 2)`` top-left (x, y) patch corners in full-resolution pixels, as HEST stores them.
    centers
        ``(n, 2)`` (x, y) spot centres in full-resolution pixels.
    fingerprint
        Identity of the computation (stored as ``attrs["hopt_st_fingerprint"]``).
    provenance
        JSON-serialisable description (stored as ``attrs["hopt_st_provenance"]``).
    overwrite
        Replace an existing file; otherwise refuse.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"embedding file {str(path)!r} already exists: pass overwrite=True to replace it.")
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings for {str(path)!r} must be 2-D (n, dim); got shape {emb.shape}.")
    n = emb.shape[0]
    encoded = [str(b).encode() for b in np.asarray(barcodes).ravel()]
    if len(encoded) != n:
        raise ValueError(f"{len(encoded)} barcodes for {n} embeddings in {str(path)!r}.")
    bc = np.array(encoded, dtype=f"S{max([1] + [len(b) for b in encoded])}").reshape(n, 1)
    datasets = {"embeddings": emb, "barcodes": bc}
    if coords is not None:
        datasets["coords"] = _rows("coords", coords, n, path, np.int64)
    if centers is not None:
        datasets["centers"] = _rows("centers", centers, n, path, np.float64)
    prov = json.dumps(provenance or {}, sort_keys=True, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)  # left by a writer that was killed
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=_USERBLOCK) as f:
            for name, data in datasets.items():
                f.create_dataset(name, data=data)
            if fingerprint is not None:
                f.attrs[FINGERPRINT_ATTR] = str(fingerprint)
            f.attrs[PROVENANCE_ATTR] = prov
        with open(tmp, "r+b") as raw:  # the mark that survives truncation
            raw.write(_MAGIC.ljust(_USERBLOCK, b"\0"))
    logger.debug("wrote %d x %d embeddings to %s", n, emb.shape[1], path)
    return path


def written_by_hopt_st(path: str | os.PathLike) -> bool:
    """Whether hopt_st wrote this embedding file: its user block carries hopt_st's mark. Reads the first bytes
    only, so a truncated or damaged file of hopt_st's is still recognised (and may be recomputed), while a file
    without the mark (HEST's own, or anyone's) must be left as it is."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_MAGIC)) == _MAGIC
    except OSError:
        return False


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {str(path)!r} does not exist.")
    try:
        return open_h5(path)  # refuses data from outside the file (rule 4)
    except OSError as e:
        raise ValueError(f"embedding file {str(path)!r} cannot be read ({e}); delete it to recompute.") from e


def read_fingerprint(path: str | os.PathLike) -> str | None:
    """The ``hopt_st_fingerprint`` attribute of an embedding file (``None`` when it has none), reading nothing else.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file is not a readable HDF5 file.
    """
    with _open(Path(path)) as f:
        fp = f.attrs.get(FINGERPRINT_ATTR)
    return None if fp is None else str(fp)


def read_provenance(path: str | os.PathLike) -> dict:
    """The ``hopt_st_provenance`` attribute of an embedding file (``{}`` when it has none), reading nothing else."""
    with _open(Path(path)) as f:
        prov = f.attrs.get(PROVENANCE_ATTR)
    return {} if prov is None else json.loads(prov)


def read_embeddings(path: str | os.PathLike, *, dtype=np.float32) -> SampleEmbeddings:
    """Read an embedding file written by :func:`write_embeddings` or by HEST-Benchmark.

    Parameters
    ----------
    path
        The ``.h5`` file (datasets ``embeddings``, ``barcodes``; optionally ``coords``, ``centers``).
    dtype
        dtype of the returned embeddings; ``None`` keeps the stored floating dtype (as HEST's benchmark does).

    Returns
    -------
    SampleEmbeddings
        Embeddings as ``dtype``, barcodes as str, and the fingerprint and provenance when hopt_st wrote it.
    """
    path = Path(path)
    with _open(path) as f:
        if "embeddings" not in f or "barcodes" not in f:
            raise ValueError(
                f"{str(path)!r} is not an embedding file: it needs datasets 'embeddings' and 'barcodes' "
                f"(it has {list(f.keys())})."
            )
        try:
            emb = np.asarray(f["embeddings"][:], dtype=dtype)
            barcodes = decode_barcodes(f["barcodes"][:])
            coords = np.asarray(f["coords"][:], dtype=np.int64) if "coords" in f else None
            centers = np.asarray(f["centers"][:], dtype=np.float64) if "centers" in f else None
        except (OSError, KeyError, RuntimeError) as e:  # truncated datasets fail only when read
            raise ValueError(
                f"embedding file {str(path)!r} cannot be read ({e}); delete it to recompute."
            ) from e
        fp = f.attrs.get(FINGERPRINT_ATTR)
        prov = f.attrs.get(PROVENANCE_ATTR)
    if emb.dtype.kind != "f":
        raise ValueError(f"{str(path)!r}: 'embeddings' holds {emb.dtype} values; embeddings are floats.")
    if emb.ndim != 2 or len(emb) != len(barcodes):
        raise ValueError(
            f"{str(path)!r}: 'embeddings' has shape {emb.shape} for {len(barcodes)} barcodes; the file is damaged."
        )
    return SampleEmbeddings(
        embeddings=emb,
        barcodes=barcodes,
        coords=coords,
        centers=centers,
        fingerprint=None if fp is None else str(fp),
        provenance=json.loads(prov) if prov is not None else {},
    )
