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

logger = logging.getLogger(__name__)

_TARGET_CHUNK = 2048  # px per side of a dask chunk (rounded down to whole tiles)


def _level_arrays(path: Path) -> list[zarr.Array]:
    """One zarr array per pyramid level (full resolution first), all lazy."""
    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as e:
        raise ValueError(
            f"Cannot read the TIFF {str(path)!r} ({type(e).__name__}: {e}): the file is corrupt or not a TIFF. "
            "Download it again or re-export it as a pyramidal tiled TIFF (e.g. `vips tiffsave in out.tif "
            "--tile --pyramid --bigtiff --compression jpeg`)."
        ) from e
    # the levels read lazily through this handle: close the file once the last of them is gone
    weakref.finalize(tif, tif.filehandle.close)
    try:
        if not tif.series:
            raise ValueError("no image series")
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
    except ValueError as e:
        tif.close()
        raise ValueError(
            f"Cannot read the image data of TIFF {str(path)!r} ({e}): the file is corrupt or truncated. "
            "Download it again."
        ) from e
    return levels


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
        ``Identity()``, coarser levels by their ``Scale``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TIFF {str(path)!r} does not exist.")
    levels = _level_arrays(path)
    arrays = [_to_cyx(a, path, i) for i, a in enumerate(levels)]
    # keep levels that really are coarser and not degenerate
    keep = [arrays[0]]
    for a in arrays[1:]:
        if a.shape[1] < keep[-1].shape[1] and a.shape[2] < keep[-1].shape[2] and min(a.shape[1:]) >= 16:
            keep.append(a)
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
    h0, w0 = keep[0].shape[1:]
    tree = {}
    for i, a in enumerate(keep):
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
