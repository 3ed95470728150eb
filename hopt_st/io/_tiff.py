"""Lazy (pyramidal) TIFF -> spatialdata image, and a memory-bounded pyramidal TIFF writer.

Reading never decodes pixels: each pyramid level is opened with ``tifffile``'s zarr interface and
wrapped in a dask array whose chunks are whole multiples of the TIFF tiles.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
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


def _downsample2(a: np.ndarray) -> np.ndarray:
    """2x2 mean (odd trailing row/column dropped)."""
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    b = a[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).astype(np.uint16).sum(axis=(1, 3))
    return ((b + 2) // 4).astype(np.uint8)


def write_pyramidal_tiff(
    path: str | Path,
    image: np.ndarray | None = None,
    *,
    shape: tuple[int, int] | None = None,
    tile_fn: Callable[[int, int, int, int], np.ndarray] | None = None,
    mpp: float | None = None,
    tile: int = 256,
    n_levels: int | None = None,
    compression: str = "jpeg",
    min_side: int = 512,
) -> Path:
    """Write an RGB uint8 image as a tiled pyramidal BigTIFF (reduced levels as sub-IFDs), memory-bounded.

    Parameters
    ----------
    path
        Output file.
    image
        ``(y, x, 3)`` uint8 array, or ``None`` with ``shape`` and ``tile_fn``.
    shape
        ``(height, width)`` of level 0 when ``tile_fn`` is used.
    tile_fn
        ``tile_fn(y0, x0, h, w) -> (h, w, 3) uint8``: pixels of a level-0 window, called one band of
        ``tile`` rows at a time. Coarser levels are built from temporary memory-mapped files next to
        ``path``, so memory stays bounded by a few bands whatever the slide size.
    mpp
        µm per pixel, written as the TIFF resolution (pixels per cm).
    tile
        Tile side in px (multiple of 16).
    n_levels
        Number of levels; default halves until a side is below ``min_side``.
    compression
        ``"jpeg"`` or ``"zlib"``.
    min_side
        Smallest level side when ``n_levels`` is None.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    if tile % 16:
        raise ValueError(f"tile = {tile}: TIFF tiles must be a multiple of 16 px.")
    if image is not None:
        if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (y, x, 3) uint8; got {image.shape} {image.dtype}.")
        height, width = image.shape[:2]

        def tile_fn(y0, x0, h, w):
            return image[y0 : y0 + h, x0 : x0 + w, :3]

    elif shape is None or tile_fn is None:
        raise ValueError("write_pyramidal_tiff needs either image= or both shape= and tile_fn=.")
    else:
        height, width = (int(v) for v in shape)
    if n_levels is None:
        n_levels, side = 1, min(height, width)
        while side // 2 >= min_side:
            n_levels += 1
            side //= 2
    shapes = [(height, width)]
    for _ in range(1, n_levels):
        h, w = shapes[-1]
        shapes.append((h // 2, w // 2))
    if min(shapes[-1]) < 1:
        raise ValueError(f"n_levels = {n_levels} is too many for a {width} x {height} px image.")

    tmp = [path.with_name(f".{path.name}.level{i}.tmp") for i in range(n_levels)]
    memmaps: list[np.memmap | None] = [None] * n_levels

    def source_band(level: int, y0: int, h: int) -> np.ndarray:
        if level == 0:
            b = np.asarray(tile_fn(y0, 0, h, width))
            if b.shape != (h, width, 3) and b.shape[:2] == (h, width):
                b = b[..., :3]
            if b.shape != (h, width, 3):
                raise ValueError(f"tile_fn returned {b.shape}, expected {(h, width, 3)}.")
            return np.ascontiguousarray(b, dtype=np.uint8)
        return np.asarray(memmaps[level][y0 : y0 + h])

    def tiles(level: int) -> Iterator[np.ndarray]:
        lh, lw = shapes[level]
        nxt = None
        if level + 1 < n_levels:
            nh, nw = shapes[level + 1]
            nxt = np.memmap(tmp[level + 1], dtype=np.uint8, mode="w+", shape=(nh, nw, 3))
            memmaps[level + 1] = nxt
        for y0 in range(0, lh, tile):
            h = min(tile, lh - y0)
            band = source_band(level, y0, h)
            if nxt is not None and h >= 2:
                small = _downsample2(band)
                ny0 = y0 // 2
                n = min(small.shape[0], nxt.shape[0] - ny0)
                nxt[ny0 : ny0 + n] = small[:n, : nxt.shape[1]]
            for x0 in range(0, lw, tile):
                t = np.zeros((tile, tile, 3), np.uint8)
                part = band[:, x0 : x0 + tile]
                t[: part.shape[0], : part.shape[1]] = part
                yield t
        if nxt is not None:
            nxt.flush()
        if level >= 1 and memmaps[level] is not None:
            memmaps[level]._mmap.close()
            memmaps[level] = None
            tmp[level].unlink(missing_ok=True)

    kwargs: dict = {"compression": compression}
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": 90}
    elif compression == "zlib":
        kwargs["compressionargs"] = {"level": 1}  # fast; still lossless
    try:
        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            for level, (lh, lw) in enumerate(shapes):
                opts = dict(shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb", **kwargs)
                if mpp:
                    opts["resolution"] = (1e4 / mpp / 2**level, 1e4 / mpp / 2**level)
                    opts["resolutionunit"] = "CENTIMETER"
                if level == 0:
                    if n_levels > 1:
                        opts["subifds"] = n_levels - 1
                    if mpp:
                        opts["metadata"] = {"mpp": float(mpp)}
                else:
                    opts["subfiletype"] = 1
                tw.write(tiles(level), **opts)
    finally:
        for i, m in enumerate(memmaps):
            if m is not None:
                m._mmap.close()
            tmp[i].unlink(missing_ok=True)
    return path
