"""Spot-centred H&E patches at a true physical pixel size: :func:`patches` and the :class:`Patches` sequence."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from spatialdata import SpatialData

from ..io._elements import get_spot_table, resolve_image_key, resolve_table_name, spot_centers
from ..io._mpp import _check_mpp, get_image_mpp
from ._geometry import (
    apply_affine,
    choose_level,
    fraction_inside,
    image_levels,
    level_shape,
    patch_boxes,
    spots_to_image_matrix,
    units_per_image_px,
)
from ._image_reader import LevelReader
from ._resample import resize

logger = logging.getLogger(__name__)

OBS_FRACTION_KEY = "patch_fraction_inside"


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class Patches:
    """A lazy, indexable sequence of uint8 ``(patch_size, patch_size, 3)`` RGB patches, one per spot.

    Nothing is read until patches are asked for. Works as a map-style ``torch.utils.data.Dataset``
    (``len`` and integer indexing), but :meth:`iter_batches` is much faster: it reads whole batches in
    parallel threads with bounded prefetch.

    Attributes
    ----------
    barcodes : numpy.ndarray of str
        Spot ids (table ``obs_names``), in patch order.
    centers : numpy.ndarray
        ``(n, 2)`` float (x, y) spot centres in full-resolution pixels.
    patch_size : int
        Side of every patch in pixels.
    mpp : float
        µm per pixel of the patches.
    patch_size_src : float
        Side of every patch in full-resolution pixels.
    """

    def __init__(self, barcodes, centers, patch_size: int, mpp: float, patch_size_src: float):
        self.barcodes = np.asarray(barcodes).astype(str)
        self.centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        self.patch_size = int(patch_size)
        self.mpp = float(mpp)
        self.patch_size_src = float(patch_size_src)
        if len(self.barcodes) != len(self.centers):
            raise ValueError(f"{len(self.barcodes)} barcodes but {len(self.centers)} centres.")

    # -- to be provided by subclasses ---------------------------------------------------------------
    def _read(self, idx: np.ndarray) -> np.ndarray:
        """``(len(idx), P, P, 3)`` uint8 patches for valid, non-negative indices ``idx``."""
        raise NotImplementedError

    # -- sequence interface -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.barcodes)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, patch_size={self.patch_size}, mpp={self.mpp:g}, "
            f"patch_size_src={self.patch_size_src:.1f} full-res px)"
        )

    def _indices(self, key) -> np.ndarray:
        n = len(self)
        if isinstance(key, slice):
            return np.arange(n, dtype=np.int64)[key]
        idx = np.asarray(key)
        if idx.size == 0:
            return np.empty(0, dtype=np.int64)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {n} patches.")
            return np.flatnonzero(idx).astype(np.int64)
        if idx.dtype.kind not in "iu":
            raise IndexError(
                f"patches are indexed by int, slice, int array or boolean mask, not {idx.dtype}."
            )
        idx = idx.astype(np.int64).ravel()
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"patch index out of range for {n} patches.")
        return np.where(idx < 0, idx + n, idx)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._read(self._indices([int(key)]))[0]
        return self._read(self._indices(key))

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, batch in self.iter_batches(64):
            yield from batch

    def iter_batches(
        self, batch_size: int = 64, *, indices=None, num_workers: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(idx, batch)`` in order: ``idx`` int64 ``(B,)``, ``batch`` uint8 ``(B, P, P, 3)``.

        Parameters
        ----------
        batch_size
            Patches per batch.
        indices
            Which patches (int array, slice or boolean mask); all by default.
        num_workers
            Reading threads; at most ``2 * num_workers`` batches are in flight (memory bounded).
            ``None``: ``min(8, cpu count)``; ``0`` or ``1``: read in the calling thread.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        idx = self._indices(slice(None) if indices is None else indices)
        chunks = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        nw = _default_workers() if num_workers is None else int(num_workers)
        if nw <= 1 or len(chunks) <= 1:
            for c in chunks:
                yield c, self._read(c)
            return
        pool = ThreadPoolExecutor(max_workers=nw, thread_name_prefix="hopt_st-patches")
        pending: deque = deque()
        it = iter(chunks)
        try:
            for c in it:
                pending.append((c, pool.submit(self._read, c)))
                if len(pending) >= 2 * nw:
                    break
            while pending:
                c, fut = pending.popleft()
                batch = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self._read, nxt)))
                yield c, batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def to_numpy(self, *, num_workers: int | None = None) -> np.ndarray:
        """All patches as one ``(n, P, P, 3)`` uint8 array."""
        out = np.empty((len(self), self.patch_size, self.patch_size, 3), dtype=np.uint8)
        for idx, batch in self.iter_batches(128, num_workers=num_workers):
            out[idx] = batch
        return out

    @property
    def coords(self) -> np.ndarray:
        """``(n, 2)`` int64 top-left (x, y) corners in full-resolution pixels, computed as HEST does
        (``int(center - patch_size_src // 2)``, see :mod:`hopt_st.io._hest_coords`)."""
        from ..io._hest_coords import hest_topleft

        return hest_topleft(self.centers, self.patch_size_src)

    def to_h5(self, path, *, overwrite: bool = False, num_workers: int | None = None) -> None:
        """Write the patches in HEST's patch .h5 format (``img``, ``coords``, ``barcode``); see
        :func:`hopt_st.io.read_patches`."""
        from ..io._patches_h5 import write_patches_h5

        write_patches_h5(self, path, overwrite=overwrite, num_workers=num_workers)


class _SlidePatches(Patches):
    """Patches cut from one level of an image element (built by :func:`patches`)."""

    def __init__(self, reader: LevelReader, boxes, size, fill, **kwargs):
        super().__init__(**kwargs)
        self._reader = reader
        self._boxes = np.asarray(boxes, dtype=np.int64)
        self._size = tuple(size)
        self._fill = np.asarray(fill, dtype=np.uint8)
        self.level_mpp: float | None = None

    def _read(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), self.patch_size, self.patch_size, 3), dtype=np.uint8)
        # at most 256 windows at a time: bounds the raw windows held besides the output
        for start in range(0, len(idx), 256):
            part = idx[start : start + 256]
            wins = self._reader.read_windows(self._boxes[part], self._size, self._fill)
            for j, w in enumerate(wins):
                out[start + j] = resize(w, self.patch_size)
        return out


def _check_fill(fill) -> np.ndarray:
    f = np.asarray(fill)
    if f.shape not in ((), (3,)) or f.dtype.kind not in "iu" or (f < 0).any() or (f > 255).any():
        raise ValueError(f"fill must be an int in 0..255 or 3 such ints (RGB), got {fill!r}.")
    return np.broadcast_to(f, (3,)).astype(np.uint8)


def patches(
    sdata: SpatialData,
    *,
    table_name: str | None = None,
    image_key: str | None = None,
    patch_size: int = 224,
    target_mpp: float = 0.5,
    image_mpp: float | None = None,
    fill=255,
    outside: str = "raise",
) -> Patches:
    """Spot-centred patches of ``patch_size`` pixels at ``target_mpp`` µm per pixel.

    Spot centres come from the shapes element the table annotates, in table row order, and are mapped into
    the image's level-0 pixel grid through the elements' spatialdata transformations (a coordinate system
    both share; ``"global"`` preferred). The coarsest pyramid level whose pixels are still at least as fine
    as ``target_mpp`` is read, the window of ``patch_size * target_mpp / level_mpp`` level pixels nearest
    to each centre is cut and resampled to ``patch_size`` with antialiasing (area filter; linear when
    enlarging, which is logged as one warning because the image is coarser than the target).

    Records ``table.obs["patch_fraction_inside"]`` (fraction of each patch's area inside the image; the
    column is rewritten on each call). Parts outside the image are filled with ``fill``.

    Parameters
    ----------
    sdata
        SpatialData with an image, a shapes element of spots and a table annotating it.
    table_name
        Spot table; ``None`` picks the only table (or ``"table"``).
    image_key
        Image element; ``None`` picks the largest.
    patch_size
        Side of the patches in pixels.
    target_mpp
        µm per patch pixel (0.5 for H-optimus-1 and the HEST-Benchmark).
    image_mpp
        µm per level-0 pixel of the image; ``None`` reads ``table.uns["hopt_st"]["image_mpp"]``.
    fill
        uint8 value (or RGB triple) for pixels outside the image; 255 = white glass.
    outside
        Spots whose patch lies entirely outside the image: ``"raise"`` (error listing them), ``"drop"``
        (left out of the returned patches) or ``"keep"`` (patches of pure ``fill``).

    Returns
    -------
    Patches
        Lazy sequence of uint8 ``(patch_size, patch_size, 3)`` patches in table row order.

    Raises
    ------
    ValueError
        Bad arguments, unsupported images (dims, channels), spots entirely outside with ``outside="raise"``.
    TypeError
        Unsupported image dtype.
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}.")
    target_mpp = _check_mpp(target_mpp, "target_mpp")
    fill_rgb = _check_fill(fill)
    if outside not in ("raise", "drop", "keep"):
        raise ValueError(f"outside must be 'raise', 'drop' or 'keep', got {outside!r}.")
    table_name = resolve_table_name(sdata, table_name)
    table, shapes_key = get_spot_table(sdata, table_name)
    image_key = resolve_image_key(sdata, image_key)
    mpp0 = get_image_mpp(sdata, image_key=image_key, table_name=table_name, image_mpp=image_mpp)

    xy = spot_centers(sdata, table_name)
    m = spots_to_image_matrix(sdata, shapes_key, image_key)
    px = apply_affine(m, xy)
    levels = image_levels(sdata.images[image_key])
    shapes = [level_shape(lv) for lv in levels]
    choice = choose_level(shapes, mpp0, target_mpp)
    if choice.upsampling:
        logger.warning(
            "Image %r has %.3g µm/px at full resolution, coarser than the target %.3g µm/px: patches are "
            "upsampled %.2fx and carry less detail than the model expects.",
            image_key,
            mpp0,
            target_mpp,
            mpp0 / target_mpp,
        )
    side0 = patch_size * target_mpp / mpp0  # patch side in level-0 pixels
    boxes, size = patch_boxes(px, choice.downsample, side0)
    frac = fraction_inside(boxes, size, shapes[choice.level])
    table.obs[OBS_FRACTION_KEY] = frac

    keep = np.ones(len(frac), dtype=bool)
    out_idx = np.flatnonzero(frac <= 0)
    if out_idx.size:
        names = table.obs_names[out_idx[:10]].tolist()
        if outside == "raise":
            raise ValueError(
                f"{out_idx.size} of {len(frac)} spots of table {table_name!r} lie entirely outside image "
                f"{image_key!r} ({shapes[0][1]} x {shapes[0][0]} px) once mapped through the transformations "
                f"(first: {names}{'...' if out_idx.size > 10 else ''}). Check the image/shapes transformations "
                "and the pixel size, or pass outside='drop' or outside='keep'."
            )
        logger.warning(
            "%d spots lie entirely outside image %r (first: %s); outside=%r.",
            out_idx.size,
            image_key,
            names,
            outside,
        )
        if outside == "drop":
            keep[out_idx] = False
    partial = int(((frac > 0) & (frac < 1)).sum())
    if partial:
        logger.info("%d patches are partly outside image %r and padded with %s.", partial, image_key, fill)

    units = units_per_image_px(m)  # spots' units (full-res px) per level-0 image pixel
    reader = LevelReader(levels[choice.level], name=image_key)
    logger.info(
        "Cutting %d patches of %d px at %.3g µm/px from level %d of %r (%.3g µm/px, windows of %dx%d px).",
        int(keep.sum()),
        patch_size,
        target_mpp,
        choice.level,
        image_key,
        choice.mpp,
        size[1],
        size[0],
    )
    p = _SlidePatches(
        reader,
        boxes[keep],
        size,
        fill_rgb,
        barcodes=table.obs_names.to_numpy()[keep],
        centers=xy[keep],
        patch_size=patch_size,
        mpp=target_mpp,
        patch_size_src=side0 * units,
    )
    p.level_mpp = choice.mpp
    return p
