"""HEST patch files (.h5): write :class:`~hopt_st.pp.Patches`, read them back (and HEST's own files).

Layout (as written by HEST's patching and read by the HEST-Benchmark)::

    img      (n, P, P, 3) uint8     the patches
    coords   (n, 2) int             top-left corner (x, y) of each patch in full-resolution (level-0) pixels,
                                    int(centre - patch_size_src // 2) as HEST computes it (see _hest_coords)
    barcode  (n, 1) bytes           spot barcode

hopt_st also writes ``centers`` ((n, 2) float64, exact spot centres) and the attributes
``patch_size`` (P), ``patch_size_src`` (patch side in full-resolution pixels), ``pixel_size`` (µm per patch
pixel), ``downsample`` (``patch_size_src / patch_size``) and ``level0_pixel_size`` (µm per full-resolution
pixel) on ``coords``, ``img`` and the file root. HEST readers ignore what they do not know. HEST's own files carry
none of these (its patcher stores only ``img.attrs["patch_size_target"]``, as far as public code shows); when
reading a file without them, ``patch_size_src`` defaults to ``P`` (with a logged note) and the pixel size to
0.5 µm (HEST's), and centres are ``coords + patch_size_src // 2``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import h5py
import numpy as np

from ..pp._patches import Patches
from ._hest_coords import decode_barcodes, h5_attr, hest_centers, recorded_patch_size_src

logger = logging.getLogger(__name__)

_HEST_MPP = 0.5


def write_patches_h5(
    patches: Patches, path, *, overwrite: bool = False, num_workers: int | None = None
) -> None:
    """Write ``patches`` to ``path`` in HEST's patch format (see module docstring)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    n, p = len(patches), patches.patch_size
    attrs = {
        "patch_size": p,
        "patch_size_src": float(patches.patch_size_src),
        "pixel_size": float(patches.mpp),
        "downsample": float(patches.patch_size_src / p),
        "level0_pixel_size": float(patches.mpp * p / patches.patch_size_src),
    }
    tmp = path.with_name(path.name + ".part")
    encoded = [b.encode() for b in patches.barcodes]
    width = max([1] + [len(b) for b in encoded])
    barcodes = np.array(encoded, dtype=f"S{width}")
    with h5py.File(tmp, "w") as f:
        img = f.create_dataset("img", shape=(n, p, p, 3), dtype=np.uint8, chunks=(1, p, p, 3) if n else None)
        coords = f.create_dataset("coords", data=patches.coords)
        f.create_dataset("barcode", data=barcodes.reshape(-1, 1))
        f.create_dataset("centers", data=patches.centers)
        for obj in (f, img, coords):
            obj.attrs.update(attrs)
        for idx, batch in patches.iter_batches(256, num_workers=num_workers):
            img[int(idx[0]) : int(idx[-1]) + 1] = batch
    os.replace(tmp, path)
    logger.info("Wrote %d patches to %s.", n, path)


class _H5Patches(Patches):
    """Patches read lazily from a HEST patch .h5 file."""

    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file: h5py.File | None = None
        self._pid = None

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def _read(self, idx: np.ndarray) -> np.ndarray:
        if len(idx) == 0:
            return np.empty((0, self.patch_size, self.patch_size, 3), dtype=np.uint8)
        order = np.argsort(idx, kind="stable")
        uniq, inverse = np.unique(idx[order], return_inverse=True)
        with self._lock:
            ds = self._handle()[self._img_key]
            if len(uniq) == uniq[-1] - uniq[0] + 1:
                data = ds[int(uniq[0]) : int(uniq[-1]) + 1]
            else:
                data = ds[uniq]
        out = np.empty((len(idx), self.patch_size, self.patch_size, 3), dtype=np.uint8)
        out[order] = data[inverse]
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def read_patches(path) -> Patches:
    """Open a HEST patch .h5 file (HEST's own or written by :meth:`Patches.to_h5`) as lazy :class:`Patches`.

    Parameters
    ----------
    path
        The .h5 file with datasets ``img`` (n, P, P, 3) uint8, ``coords`` (n, 2) top-left (x, y) in
        full-resolution pixels and ``barcode``.

    Returns
    -------
    Patches
        Same interface as :func:`hopt_st.pp.patches`' result; ``centers`` are HEST's
        ``coords + patch_size_src // 2`` unless the file stores exact ``centers``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"patch file {path} not found.")
    with h5py.File(path, "r") as f:
        img_key = next((k for k in ("img", "imgs", "images") if k in f), None)
        if img_key is None or "coords" not in f:
            raise ValueError(
                f"{path} is not a HEST patch file: it needs datasets 'img' and 'coords' (it has {list(f.keys())})."
            )
        ds = f[img_key]
        if ds.ndim != 4 or ds.shape[1] != ds.shape[2] or ds.shape[3] != 3 or ds.dtype != np.uint8:
            raise ValueError(
                f"{path}: dataset {img_key!r} has shape {ds.shape} and dtype {ds.dtype}; expected (n, P, P, 3) uint8."
            )
        n, p = ds.shape[0], ds.shape[1]
        coords = np.asarray(f["coords"][:], dtype=np.float64).reshape(n, -1)[:, :2]
        bkey = next((k for k in ("barcode", "barcodes") if k in f), None)
        if bkey is None:
            barcodes = np.array([str(i) for i in range(n)])
            logger.info("%s has no 'barcode' dataset; patches are named by row number.", path)
        else:
            barcodes = decode_barcodes(f[bkey][:])
        src = recorded_patch_size_src(f, p)
        if src is None:
            src = float(p)
            logger.info("%s records no patch_size_src/downsample; assuming patches at full resolution.", path)
        mpp = h5_attr(f, ("pixel_size", "dst_pixel_size", "target_pixel_size"))
        mpp = _HEST_MPP if mpp is None else float(np.ravel(mpp)[0])
        centers = (
            np.asarray(f["centers"][:], dtype=np.float64) if "centers" in f else hest_centers(coords, src)
        )
    p_obj = _H5Patches(path, barcodes=barcodes, centers=centers, patch_size=p, mpp=mpp, patch_size_src=src)
    p_obj._img_key = img_key
    return p_obj
