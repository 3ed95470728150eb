"""Lazy (pyramidal) TIFF -> spatialdata image.

Reading never decodes pixels up front: each pyramid level is a :class:`TiffLevel`, an array-like that decodes
whole TIFF tiles (or strips) straight from the file on request, wrapped in a dask array whose chunks are whole
multiples of the tiles. A ``TiffLevel`` holds only the file's path and which level it is, so it pickles (to
DataLoader / process-pool workers under any start method) and each process opens the file itself; tile bytes
are read with positional reads, so threads and forked processes never share a file offset. The writer of such
files (for synthetic slides) is :func:`hopt_st.datasets.write_pyramidal_tiff`.
"""

from __future__ import annotations

import logging
import os
import threading
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


class TiffLevel:
    """One level of a TIFF as a lazy ``(y, x, 3)`` array-like (RGB; an alpha channel is dropped).

    ``level[ys, xs]`` decodes the tiles (or strips) the window touches with tifffile's own decoder, reading
    their bytes with ``os.pread``; unusual layouts (separate colour planes, multi-page levels, codecs without a
    segment decoder) go through tifffile's zarr store instead. The file is (re)opened lazily in each process,
    so the object is picklable and safe to use after ``fork``; a file changed since it was first opened is
    refused.

    Parameters
    ----------
    path
        The TIFF file.
    series
        Index of the image series.
    level
        Pyramid level within the series (0 = full resolution).
    """

    def __init__(self, path: str | os.PathLike, series: int = 0, level: int = 0):
        self.path = str(Path(path).resolve())
        self.series, self.level = int(series), int(level)
        st = os.stat(self.path)
        self._stamp = (st.st_size, st.st_mtime_ns)
        self._local = None  # per-process state: see _open
        self._pid = None
        self._open_lock = threading.Lock()
        self._io_lock = threading.Lock()
        page, zarr_arr = self._ensure()[1:3]
        shape = tuple(zarr_arr.shape) if zarr_arr is not None else tuple(page.shape)
        self.full_shape = shape
        self.shape = (*shape[:2], min(shape[2], 3)) if len(shape) == 3 else shape
        self.dtype = np.dtype(zarr_arr.dtype if zarr_arr is not None else page.dtype)
        chunks = tuple(zarr_arr.chunks) if zarr_arr is not None else tuple(page.chunks)
        self.chunks = (int(chunks[0]), int(chunks[1]), *self.shape[2:])
        self.ndim = len(self.shape)

    # -- per-process file state ------------------------------------------------------------------
    def _open(self):
        """``(TiffFile, page or None, zarr array or None, fd or None, decode, tiles across)``."""
        st = os.stat(self.path)
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise ValueError(
                f"TIFF {self.path!r} changed on disk since it was opened (size or modification time differ); "
                "read it again."
            )
        tif = tifffile.TiffFile(self.path)
        try:
            series = tif.series[self.series]
            lvl = series.levels[self.level] if self.level < len(series.levels) else None
            if lvl is None:
                raise ValueError(f"series {self.series} has no level {self.level}")
            page = lvl.pages[0] if len(lvl.pages) == 1 else None
            direct = (
                page is not None
                and tuple(page.shape) == tuple(lvl.shape)
                and len(page.shape) == 3
                and page.planarconfig == 1
                and page.imagedepth == 1
                and page.chunked[-1] == 1
            )
            if direct:
                try:  # one segment decodes: the codec is available
                    self._decode_segment(page, page.decode, self._first_segment(page), tif=tif)
                except Exception:  # noqa: BLE001 - anything unusual: tifffile's zarr store instead
                    direct = False
            if direct:
                fd = (
                    os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    if hasattr(os, "pread")
                    else None
                )
                return tif, page, None, fd, page.decode, int(page.chunked[1])
            z = zarr.open(tif.aszarr(series=self.series, level=self.level), mode="r")
            return tif, None, z, None, None, 0
        except BaseException:
            tif.close()
            raise

    def _ensure(self):
        if self._local is None or self._pid != os.getpid():
            with self._open_lock:
                if self._local is None or self._pid != os.getpid():
                    # after a fork the parent's handles are left alone: this process opens its own
                    self._local = self._open()
                    self._pid = os.getpid()
        return self._local

    @staticmethod
    def _first_segment(page) -> int:
        counts = page.databytecounts
        return next((i for i, c in enumerate(counts) if c), 0)

    def _read_bytes(self, tif, fd, offset: int, n: int) -> bytes:
        if fd is not None:
            return os.pread(fd, n, offset)
        with self._io_lock:  # no positional reads (Windows): one shared handle, serialised
            fh = tif.filehandle
            fh.seek(offset)
            return fh.read(n)

    def _decode_segment(self, page, decode, index: int, tif=None, fd=None) -> np.ndarray | None:
        n = int(page.databytecounts[index])
        if not n:
            return None
        data = self._read_bytes(
            tif if tif is not None else self._local[0], fd, int(page.dataoffsets[index]), n
        )
        arr = decode(data, index, jpegtables=page.jpegtables)[0]
        return None if arr is None else arr.reshape(arr.shape[-3:])

    # -- reading ---------------------------------------------------------------------------------
    def _region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` (within bounds), all stored channels."""
        tif, page, z, fd, decode, n_across = self._ensure()
        if z is not None:
            return np.asarray(z[y0:y1, x0:x1])
        out = np.zeros((y1 - y0, x1 - x0, self.full_shape[2]), dtype=self.dtype)
        ty, tx = self.chunks[:2]
        for iy in range(y0 // ty, -(-y1 // ty)):
            for ix in range(x0 // tx, -(-x1 // tx)):
                seg = self._decode_segment(page, decode, iy * n_across + ix, tif, fd)
                if seg is None:  # sparse file: missing tiles are 0
                    continue
                ty0, tx0 = iy * ty, ix * tx
                a, b = max(y0, ty0), min(y1, ty0 + seg.shape[0])
                c, d = max(x0, tx0), min(x1, tx0 + seg.shape[1])
                if a < b and c < d:
                    out[a - y0 : b - y0, c - x0 : d - x0] = seg[a - ty0 : b - ty0, c - tx0 : d - tx0]
        return out

    def __getitem__(self, key) -> np.ndarray:
        """Numpy-style read: ints and slices (positive steps) on y and x, anything numpy takes on channels."""
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        spans, squeeze = [], []
        for k, n in zip(key[:2], self.shape[:2]):
            if isinstance(k, (int, np.integer)):
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {int(k)} is out of bounds for a side of {n} px.")
                k = slice(i, i + 1)
                squeeze.append(True)
            elif isinstance(k, slice):
                squeeze.append(False)
            else:
                raise TypeError(f"TiffLevel takes ints and slices on y and x, not {type(k).__name__}.")
            start, stop, step = k.indices(n)
            if step < 1:
                raise IndexError("TiffLevel takes positive slice steps only.")
            spans.append((start, max(start, stop), step))
        (y0, y1, sy), (x0, x1, sx) = spans
        if y1 > y0 and x1 > x0:
            region = self._region(y0, y1, x0, x1)[::sy, ::sx, : self.shape[2]]
        else:
            region = np.zeros((len(range(y0, y1, sy)), len(range(x0, x1, sx)), self.shape[2]), self.dtype)
        region = region[(slice(None), slice(None), *key[2:])]
        return region[tuple(0 if q else slice(None) for q in squeeze)]

    # -- pickling and dask -----------------------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_local=None, _pid=None, _open_lock=None, _io_lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open_lock = threading.Lock()
        self._io_lock = threading.Lock()

    def __dask_tokenize__(self):
        return ("hopt_st.TiffLevel", self.path, self.series, self.level, self._stamp)

    def __repr__(self) -> str:
        return f"TiffLevel({self.path!r}, series={self.series}, level={self.level}, shape={self.shape})"


def _level_arrays(path: Path) -> list[TiffLevel]:
    """One lazy array per pyramid level (full resolution first)."""
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
        levels = [TiffLevel(path, 0, i) for i in range(n_levels)]
        if n_levels == 1 and len(tif.series) > 1:
            # pyramids stored as further series of decreasing size (some writers do this)
            base = levels[0].full_shape
            for s in range(1, len(tif.series)):
                shp = tif.series[s].shape
                if len(shp) == len(base) and shp[0] < base[0] and shp[1] < base[1] and shp[2:] == base[2:]:
                    if shp[0] < levels[-1].shape[0]:
                        levels.append(TiffLevel(path, s, 0))
    except (ValueError, IndexError, KeyError, OSError, tifffile.TiffFileError) as e:
        raise ValueError(
            f"Cannot read the image data of TIFF {str(path)!r} ({e}): the file is corrupt or truncated. "
            "Download it again."
        ) from e
    finally:
        tif.close()
    return levels


def _to_cyx(arr: TiffLevel, path: Path, level: int) -> da.Array:
    shape = arr.full_shape
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
    d = da.from_array(arr, chunks=(cy, cx, 3))  # an alpha channel is already dropped by TiffLevel
    return d.transpose(2, 0, 1)


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
