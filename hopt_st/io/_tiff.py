"""Lazy (pyramidal) TIFF -> spatialdata image.

Reading never decodes pixels: each pyramid level is opened with ``tifffile``'s zarr interface and
wrapped in a dask array whose chunks are whole multiples of the TIFF tiles. The writer of such files (for
synthetic slides) is :func:`hopt_st.datasets.write_pyramidal_tiff`.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile
import xarray as xr
import zarr
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, Scale

from .._errors import CorruptFileError

logger = logging.getLogger(__name__)

_TARGET_CHUNK = 2048  # px per side of a dask chunk (rounded down to whole tiles)
#: pyramid check: windows (level px) compared per level, their side, the grid of cell means compared, and the
#: mean absolute difference of those cell means (0-255) above which a level is not a downsample of level 0
_CHECK_WINDOWS = ((0.5, 0.5), (0.3, 0.3), (0.7, 0.7), (0.3, 0.7), (0.7, 0.3))
_CHECK_SIDE, _CHECK_CELLS, _CHECK_MAX_DIFF = 256, 16, 20.0


def _check_complete(tif: tifffile.TiffFile, path: Path) -> None:
    """Refuse a truncated TIFF (tiles ending past the end of the file) before any pixel is read."""
    size = path.stat().st_size
    for i, level in enumerate(tif.series[0].levels):
        for page in level.pages:
            if page is None:
                continue
            offsets = getattr(page, "dataoffsets", None)
            counts = getattr(page, "databytecounts", None)
            if not offsets or not counts or len(offsets) != len(counts) or not any(counts):
                raise CorruptFileError(
                    path,
                    f"TIFF {str(path)!r} is corrupt or truncated: pyramid level {i} has no tile offsets / byte "
                    "counts (its tags were cut off). Download or copy it again.",
                )
            end = max(int(o) + int(c) for o, c in zip(offsets, counts))
            if end > size:
                raise CorruptFileError(
                    path,
                    f"TIFF {str(path)!r} is truncated: the tiles of pyramid level {i} end at byte {end} but the "
                    f"file has {size} bytes. Download or copy it again.",
                )


def _level_arrays(path: Path) -> list[zarr.Array]:
    """One zarr array per pyramid level (full resolution first), all lazy."""
    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:  # noqa: BLE001 - TiffFileError, struct.error, ... on a cut or garbled header
        raise CorruptFileError(
            path,
            f"Cannot read the TIFF {str(path)!r} ({type(e).__name__}: {e}): the file is corrupt or not a TIFF. "
            "Download it again or re-export it as a pyramidal tiled TIFF (e.g. `vips tiffsave in out.tif "
            "--tile --pyramid --bigtiff --compression jpeg`).",
        ) from e
    # the levels read lazily through this handle: close the file once the last of them is gone
    weakref.finalize(tif, tif.filehandle.close)
    try:
        if not tif.series:
            raise ValueError("no image series")
        _check_complete(tif, path)
        series = tif.series[0]
        n_levels = len(series.levels)
        levels = [zarr.open(tif.aszarr(series=0, level=i), mode="r") for i in range(n_levels)]
        if n_levels == 1 and len(tif.series) > 1:
            # pyramids stored as further series of decreasing size (some writers do this)
            base = levels[0].shape
            for s in range(1, len(tif.series)):
                shp = tif.series[s].shape
                if len(shp) == len(base) and shp[0] < base[0] and shp[1] < base[1] and shp[2:] == base[2:]:
                    if shp[0] < levels[-1].shape[0]:
                        levels.append(zarr.open(tif.aszarr(series=s, level=0), mode="r"))
        for arr in levels:  # decode one tile per level: a garbled file fails here, not when embedding
            if arr.ndim >= 2 and arr.shape[0] and arr.shape[1]:
                np.asarray(arr[-1:, -1:])
    except CorruptFileError:
        tif.close()
        raise
    except Exception as e:  # noqa: BLE001 - tifffile / imagecodecs raise their own types (Jpeg8Error, ...)
        tif.close()
        raise CorruptFileError.from_error(path, e, what="TIFF", fix="Download it again.") from e
    return levels


def _cell_means(a: np.ndarray, cells: int) -> np.ndarray:
    """``(cells, cells, c)`` means of a ``(c, h, w)`` window over a regular grid (integer boundaries)."""
    ys = np.linspace(0, a.shape[1], cells + 1).astype(int)
    xs = np.linspace(0, a.shape[2], cells + 1).astype(int)
    s = np.add.reduceat(np.add.reduceat(a.astype(np.float64), ys[:-1], axis=1), xs[:-1], axis=2)
    area = np.outer(np.diff(ys), np.diff(xs))
    return (s / np.maximum(area, 1)).transpose(1, 2, 0)


def _level_difference(ref: da.Array, level: da.Array) -> float:
    """Largest mean |difference| of cell means between ``level`` and the same region of ``ref`` (a finer level
    that ``level`` should be a downsample of), over a few windows."""
    (_, hr, wr), (_, h, w) = ref.shape, level.shape
    side = min(_CHECK_SIDE, h, w)
    cells = min(_CHECK_CELLS, side)
    worst = 0.0
    for fy, fx in _CHECK_WINDOWS:
        y0, x0 = int((h - side) * fy), int((w - side) * fx)
        ry0, ry1 = round(y0 * hr / h), round((y0 + side) * hr / h)
        rx0, rx1 = round(x0 * wr / w), round((x0 + side) * wr / w)
        a, b = da.compute(level[:, y0 : y0 + side, x0 : x0 + side], ref[:, ry0:ry1, rx0:rx1])
        worst = max(worst, float(np.abs(_cell_means(a, cells) - _cell_means(b, cells)).mean()))
    return worst


def _consistent_levels(arrays: list[da.Array], path: Path) -> list[da.Array]:
    """The levels that are downsamples of level 0 (each checked against the last one kept, on a few windows);
    another level is ignored with a warning."""
    keep = [arrays[0]]
    for i, a in enumerate(arrays[1:], start=1):
        if not (a.shape[1] < keep[-1].shape[1] and a.shape[2] < keep[-1].shape[2] and min(a.shape[1:]) >= 16):
            continue  # not coarser, or degenerate
        try:
            diff = _level_difference(keep[-1], a)
        except Exception as e:  # noqa: BLE001 - decoders raise their own types (Jpeg8Error, ...)
            raise CorruptFileError.from_error(path, e, what="TIFF", fix="Download it again.") from e
        if diff > _CHECK_MAX_DIFF:
            logger.warning(
                "TIFF %s: pyramid level %d (%d x %d px) is not a downsample of level 0 (mean difference %.0f of "
                "255 on sampled windows): it is ignored, and patches are cut from the levels that agree.",
                path,
                i,
                a.shape[2],
                a.shape[1],
                diff,
            )
            continue
        keep.append(a)
    return keep


def _to_cyx(arr: zarr.Array, path: Path, level: int) -> da.Array:
    shape = arr.shape
    if len(shape) == 2:
        raise ValueError(
            f"TIFF {str(path)!r} level {level} is single-channel {shape}: an RGB H&E image (y, x, 3) is needed."
        )
    if len(shape) != 3 or shape[-1] not in (3, 4):
        raise ValueError(
            f"TIFF {str(path)!r} level {level} has shape {shape}; expected (y, x, 3) RGB or (y, x, 4) RGBA."
        )
    if arr.dtype != np.uint8:
        raise ValueError(
            f"TIFF {str(path)!r} has dtype {arr.dtype}; expected uint8 RGB. Convert it to 8-bit RGB first."
        )
    ty, tx = arr.chunks[0], arr.chunks[1]
    cy = max(ty, (_TARGET_CHUNK // ty) * ty) if ty < shape[0] else shape[0]
    cx = max(tx, (_TARGET_CHUNK // tx) * tx) if tx < shape[1] else shape[1]
    # strips: one chunk per strip row band of roughly _TARGET_CHUNK rows
    d = da.from_zarr(arr, chunks=(cy, cx, shape[2]))
    d = d.transpose(2, 0, 1)
    if shape[2] == 4:
        d = d[:3]
    return d


def read_tiff_image(path: str | Path) -> xr.DataArray | xr.DataTree:
    """Open an RGB TIFF lazily as a spatialdata image element (multiscale if the file is pyramidal).

    Parameters
    ----------
    path
        A TIFF/BigTIFF, pyramidal (sub-IFDs or further series) or not.

    Returns
    -------
    DataArray or DataTree
        ``Image2DModel`` element with dims (c, y, x), uint8, dask-backed; level 0 maps to ``"global"`` by
        ``Identity()``, coarser levels by their ``Scale``. A level whose pixels do not agree with a downsample of
        level 0 (checked on a few windows) is left out with a warning.

    Raises
    ------
    CorruptFileError
        The file is truncated (tiles past its end) or a tile cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TIFF {str(path)!r} does not exist.")
    levels = _level_arrays(path)
    arrays = [_to_cyx(a, path, i) for i, a in enumerate(levels)]
    # keep levels that really are coarser, not degenerate, and downsamples of level 0
    keep = _consistent_levels(arrays, path)
    if len(keep) == 1:
        h, w = keep[0].shape[1:]
        if max(h, w) > 8192:
            logger.warning(
                "TIFF %s is not pyramidal (%d x %d px): it is read lazily at full resolution only; for fast "
                "overviews convert it to a pyramidal TIFF.",
                path,
                w,
                h,
            )
        return Image2DModel.parse(
            keep[0], dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations={"global": Identity()}
        )
    return multiscale_image(keep)


def multiscale_image(levels: list[da.Array]) -> xr.DataTree:
    """A multiscale ``Image2DModel`` element from (c, y, x) RGB levels, finest first.

    Level 0 maps to ``"global"`` by ``Identity()``, each coarser level by the ``Scale`` of its size ratio.
    """
    h0, w0 = levels[0].shape[1:]
    tree = {}
    for i, a in enumerate(levels):
        h, w = a.shape[1:]
        sy, sx = h0 / h, w0 / w
        t = Identity() if i == 0 else Scale([sy, sx], axes=("y", "x"))
        el = Image2DModel.parse(
            a, dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations={"global": t}
        )
        tree[f"scale{i}"] = xr.Dataset({"image": el})
    dt = xr.DataTree.from_dict(tree)
    Image2DModel().validate(dt)
    return dt
