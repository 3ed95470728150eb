"""HEST's patch ``.h5`` conventions: where the ``coords`` of a HEST patch ``.h5`` file sit relative to the spot.

HEST writes, for a spot centred at ``c`` (full-resolution / level-0 pixels, ``(x, y)`` order as in
``adata.obsm["spatial"]``) and a patch that covers ``patch_size_src`` level-0 pixels
(``patch_size_src = target_patch_size * target_pixel_size / wsi_pixel_size``, a float)::

    coords = int(c - patch_size_src // 2)          # top-left (x, y), level-0 px, truncated to int

(``HESTData.dump_patches`` in github.com/mahmoodlab/HEST ``src/hest/HESTData.py``; the patcher reads the
region at that top-left corner, ``WSIPatcher.get_tile`` returns "pixel x/y of top-left corner (before
rescaling)" in ``src/hest/wsi.py``). So the corner is offset by ``floor(patch_size_src / 2)``, not by
``patch_size_src / 2``, and the centre is recovered as ``coords + floor(patch_size_src / 2)`` (exact for
integer spot centres, otherwise up to 1 px below the true centre because of the truncation).
"""

from __future__ import annotations

import h5py
import numpy as np

# attributes that, in HEST-style files, record the patch side in level-0 px (or the downsample factor)
PATCH_SIZE_SRC_ATTRS = ("patch_size_src", "patch_size_level0")


def hest_half(patch_size_src: float) -> float:
    """HEST's corner-to-centre offset ``patch_size_src // 2`` (level-0 px)."""
    if not np.isfinite(patch_size_src) or patch_size_src <= 0:
        raise ValueError(
            f"patch_size_src must be a positive number of level-0 pixels, got {patch_size_src!r}."
        )
    return float(np.floor(float(patch_size_src) / 2.0))


def hest_topleft(centers: np.ndarray, patch_size_src: float) -> np.ndarray:
    """``(n, 2)`` int64 top-left (x, y) corners exactly as HEST computes them from spot centres."""
    tl = np.asarray(centers, dtype=np.float64) - hest_half(patch_size_src)
    return np.trunc(tl).astype(np.int64)


def hest_centers(coords: np.ndarray, patch_size_src: float) -> np.ndarray:
    """``(n, 2)`` float64 spot centres implied by HEST ``coords`` (inverse of :func:`hest_topleft`)."""
    return np.asarray(coords, dtype=np.float64) + hest_half(patch_size_src)


def h5_attr(f: h5py.File, names: tuple[str, ...]):
    """The first of ``names`` found in the attributes of ``coords``, then ``img``, then the file; else ``None``."""
    for obj in (f.get("coords"), f.get("img"), f):
        if obj is None:
            continue
        for name in names:
            if name in obj.attrs:
                return obj.attrs[name]
    return None


def recorded_patch_size_src(f: h5py.File, patch_size: int) -> float | None:
    """The patch side in level-0 px that a patch file records (directly or as a downsample); else ``None``."""
    src = h5_attr(f, PATCH_SIZE_SRC_ATTRS)
    if src is None:
        down = h5_attr(f, ("downsample",))
        if down is None:
            return None
        return patch_size * float(np.ravel(down)[0])
    return float(np.ravel(src)[0])


def decode_barcodes(raw) -> np.ndarray:
    """Barcodes of a patch file's ``barcode`` dataset ((N,) or (N, 1), bytes or str) as an array of str."""
    raw = np.asarray(raw)
    raw = raw.reshape(len(raw), -1)[:, 0]
    return np.array([b.decode() if isinstance(b, bytes) else str(b) for b in raw])
