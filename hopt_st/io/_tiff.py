"""Lazy (pyramidal) TIFF -> spatialdata image.

Reading never decodes pixels up front: each pyramid level is a :class:`TiffLevel`, an array-like that decodes
whole TIFF tiles (or strips) straight from the file on request, wrapped in a dask array whose chunks are whole
multiples of the tiles. A ``TiffLevel`` holds only the file's path and which level it is, so it pickles (to
DataLoader / process-pool workers under any start method) and each process opens the file itself; tile bytes
are read with positional reads, so threads and forked processes never share a file offset. The writer of such
files (for synthetic slides) is :func:`hopt_st.datasets.write_pyramidal_tiff`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
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


def _check_rgb(series, path: Path) -> None:
    """Refuse a one-channel (grayscale) or tiny TIFF with the reason, before any tile is decoded."""
    from ._image_file import check_size, grayscale_message

    shape, axes = tuple(series.shape), str(getattr(series, "axes", ""))
    if len(shape) == 2 or (len(shape) == 3 and shape[-1] == 1 and axes.endswith("S")):
        raise ValueError(
            grayscale_message(path, f"TIFF of shape {shape}, {series.dtype}, one sample per pixel")
        )
    if len(shape) >= 2:
        yx = (shape[-3], shape[-2]) if len(shape) >= 3 and shape[-1] in (3, 4) else shape[-2:]
        check_size(path, *yx)


def _close_handles(tif: tifffile.TiffFile, fd: int | None) -> None:
    """Close the file handles a :class:`TiffLevel` opened in one process."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    tif.close()


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
        self._closer = None  # closes this process's handles when the level is garbage-collected
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
                    # after a fork this process opens its own handles (and closes its copies of the parent's:
                    # closing a copy leaves the parent's open)
                    if self._closer is not None:
                        self._closer()
                    self._local = self._open()
                    self._pid = os.getpid()
                    self._closer = weakref.finalize(self, _close_handles, self._local[0], self._local[3])
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
        state.update(_local=None, _pid=None, _closer=None, _open_lock=None, _io_lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open_lock = threading.Lock()
        self._io_lock = threading.Lock()

    def __dask_tokenize__(self):
        return ("hopt_st.TiffLevel", self.path, self.series, self.level, self._stamp)

    def __repr__(self) -> str:  # one line
        return f"TiffLevel({self.path!r}, series={self.series}, level={self.level}, shape={self.shape})"


def _level_arrays(path: Path) -> list[TiffLevel]:
    """One lazy array per pyramid level (full resolution first)."""
    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:  # noqa: BLE001 - TiffFileError, struct.error, ... on a cut or garbled header
        raise CorruptFileError(
            path,
            f"Cannot read the TIFF {str(path)!r} ({type(e).__name__}: {e}): the file is corrupt or not a TIFF. "
            "Download it again or re-export it as a pyramidal tiled TIFF (e.g. `vips tiffsave in out.tif "
            "--tile --pyramid --bigtiff --compression jpeg`).",
        ) from e
    try:
        if tif.series:
            _check_rgb(tif.series[0], path)
    except ValueError:
        tif.close()
        raise
    try:  # each TiffLevel opens the file itself (per process): this handle only reads the structure
        if not tif.series:
            raise ValueError("no image series")
        _check_complete(tif, path)
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
        for arr in levels:  # decode one tile per level: a garbled file fails here, not when embedding
            if arr.ndim >= 2 and arr.shape[0] and arr.shape[1]:
                np.asarray(arr[-1:, -1:])
    except CorruptFileError:
        raise
    except Exception as e:  # noqa: BLE001 - tifffile / imagecodecs raise their own types (Jpeg8Error, ...)
        raise CorruptFileError.from_error(path, e, what="TIFF", fix="Download it again.") from e
    finally:
        tif.close()
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
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"TIFF {str(path)!r} has dtype {arr.dtype}; expected 8-bit or 16-bit RGB. Convert it to 8-bit "
            "RGB first (e.g. `vips cast in.tif out.tif uchar`)."
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
