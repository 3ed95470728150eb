"""Fast, memory-bounded reading of many small windows from one level of a (dask-backed) image.

Per-window dask slicing pays graph construction and scheduling for every patch. Instead, windows are
served from whole storage chunks: the chunks a batch of windows touches are looked up in a bounded LRU cache
of decoded chunks, the missing ones are computed in **one** dask call per batch (or read directly from the
underlying numpy / zarr array when the dask graph is a plain ``from_array``), converted once to uint8 RGB,
and the windows are pasted together from them. Neighbouring spots share chunks, so when windows come in
spatial order (``Patches.read_order``: Morton order, whatever the order of the table) each JPEG tile of a slide
is decoded about once.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import numpy as np

from ..io._tiff import TiffLevel

logger = logging.getLogger(__name__)

#: virtual chunk size used when the image is a plain numpy array
_NUMPY_CHUNK = 512
#: uint16 images whose first chunk reaches no higher than this are ambiguous (10/12-bit data?) and refused
_MAX_12BIT = 4095
#: decoded chunks are cached up to this many bytes by default (shared by all threads of one reader)
DEFAULT_CACHE_BYTES = 512 * 2**20
#: smallest cache a reader is given when the budget is split between processes (~ a few rows of tiles)
MIN_CACHE_BYTES = 48 * 2**20


def _chunk_bounds(sizes) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])


def _direct_source(arr, dims: tuple[str, ...]):
    """The array-like behind a dask array built by ``da.from_array``/``da.from_zarr`` (optionally transposed).

    Returns ``(source, source_dims)`` or ``(None, None)`` when the graph does anything else (rechunks,
    arithmetic, ...), in which case chunks are computed through dask.
    """
    try:
        layers = dict(arr.dask.layers)
    except AttributeError:
        return None, None
    originals = [n for n in layers if n.startswith("original-")]
    others = [n for n in layers if not n.startswith("original-")]
    if not originals:
        return _in_memory_source(arr, dims, layers)
    if len(originals) != 1 or not 1 <= len(others) <= 2:
        return None, None
    if not all(n.startswith(("from-zarr-", "array-", "from-array-", "transpose-")) for n in others):
        return None, None
    if sum(n.startswith("transpose-") for n in others) != len(others) - 1:
        return None, None
    try:
        src = next(iter(dict(layers[originals[0]]).values()))
    except Exception:  # noqa: BLE001 - unexpected layer layout: no fast path
        return None, None
    shape = tuple(getattr(src, "shape", ()))
    if not hasattr(src, "__getitem__") or len(shape) != len(dims):
        return None, None
    if shape == tuple(arr.shape) and len(others) == 1:
        return src, dims
    if dims == ("c", "y", "x") and shape == (arr.shape[1], arr.shape[2], arr.shape[0]):
        return src, ("y", "x", "c")
    return None, None


def _in_memory_source(arr, dims: tuple[str, ...], layers: dict):
    """The numpy array behind a one-chunk ``da.from_array(numpy_array)`` (dask keeps numpy arrays in the graph,
    with no ``original-`` layer), optionally transposed: ``(array, its dims)`` or ``(None, None)``."""
    arrays = [n for n in layers if n.startswith("array-")]
    others = [n for n in layers if n not in arrays]
    if len(arrays) != 1 or len(others) > 1 or any(not n.startswith("transpose-") for n in others):
        return None, None
    values = list(dict(layers[arrays[0]]).values())
    if len(values) != 1 or not isinstance(values[0], np.ndarray):
        return None, None
    src, shape = values[0], tuple(values[0].shape)
    if shape == tuple(arr.shape) and not others:
        return src, dims
    if others and dims == ("c", "y", "x") and shape == (arr.shape[1], arr.shape[2], arr.shape[0]):
        return src, ("y", "x", "c")
    return None, None


def _source_file(array) -> str | None:
    """The file a level's array is read from (a TIFF, or a .zarr store), when known."""
    if isinstance(array, TiffLevel):
        return array.path
    store = getattr(array, "store", None)
    try:
        if hasattr(store, "root"):
            return str(store.root)
        if hasattr(store, "_data"):  # tifffile's ZarrTiffStore
            series = store._data[0] if isinstance(store._data, (list, tuple)) else store._data
            return str(series.parent.filehandle.path)
    except (AttributeError, IndexError, TypeError):
        return None
    return None


class LevelReader:
    """Reads uint8 RGB windows from one image level (``xarray.DataArray``).

    Parameters
    ----------
    level
        DataArray with dims ``(c, y, x)``, ``(y, x, c)`` or ``(y, x)``; dtype uint8, uint16 or float in
        [0, 1]; 1 (grey), 3 (RGB) or 4 (RGBA) channels.
    name
        Element name, for error messages.
    cache_bytes
        Budget of the decoded-chunk cache.
    """

    def __init__(self, level, name: str = "image", cache_bytes: int = DEFAULT_CACHE_BYTES):
        dims = tuple(level.dims)
        if dims not in (("c", "y", "x"), ("y", "x", "c"), ("y", "x")):
            raise ValueError(
                f"image {name!r} has dims {dims}; patches need ('c', 'y', 'x') (spatialdata) or ('y', 'x', 'c'). "
                "Parse 2-D images with spatialdata.models.Image2DModel.parse(..., dims=...)."
            )
        self.name, self.dims = name, dims
        data = level.data
        self.dtype = np.dtype(data.dtype)
        if not (self.dtype in (np.uint8, np.uint16) or self.dtype.kind == "f"):
            raise TypeError(
                f"image {name!r} has dtype {self.dtype}; supported are uint8, uint16 and float in [0, 1]. "
                "Convert it, e.g. to uint8 RGB, before cutting patches."
            )
        n_c = 1 if dims == ("y", "x") else int(level.sizes["c"])
        if n_c not in (1, 3, 4):
            hint = ""
            if int(level.sizes["y"]) in (1, 3, 4) and n_c > 4:
                hint = (
                    f" Its sizes {dict(level.sizes)} look like (c, y, x) data labelled (y, x, c): parse the array "
                    "with dims=('c', 'y', 'x')."
                )
            raise ValueError(
                f"image {name!r} has {n_c} channels; patches need 1 (grey, replicated), 3 (RGB) or 4 (RGBA, "
                f"alpha dropped). Select the RGB channels first.{hint}"
            )
        self.n_channels = n_c
        self.height, self.width = int(level.sizes["y"]), int(level.sizes["x"])
        self._data = data
        self._is_dask = hasattr(data, "dask")
        if self._is_dask:
            ch = dict(zip(dims, data.chunks))
            self._ybounds = _chunk_bounds(ch["y"])
            self._xbounds = _chunk_bounds(ch["x"])
            self._direct, self._direct_dims = _direct_source(data, dims)
            native = getattr(self._direct, "chunks", None)
            if (
                self._direct is not None
                and isinstance(native, tuple)
                and all(isinstance(c, int) for c in native)
            ):
                # the storage's own chunks (e.g. TIFF tiles), usually finer than the dask chunks: cache those
                nat = dict(zip(self._direct_dims, native))
                self._ybounds = np.unique(np.r_[np.arange(0, self.height, max(nat["y"], 64)), self.height])
                self._xbounds = np.unique(np.r_[np.arange(0, self.width, max(nat["x"], 64)), self.width])
        else:
            self._ybounds = np.unique(np.r_[np.arange(0, self.height, _NUMPY_CHUNK), self.height])
            self._xbounds = np.unique(np.r_[np.arange(0, self.width, _NUMPY_CHUNK), self.width])
            self._direct, self._direct_dims = data, dims
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_bytes)
        self._lock = threading.Lock()
        self._inflight: dict[tuple[int, int], threading.Event] = {}
        self._u16_scale: int | None = None  # 1: 8-bit values stored as uint16, 257: true 16-bit
        self._u16_lock = threading.Lock()

    def set_cache_bytes(self, n: int) -> None:
        """Change the budget of the decoded-chunk cache (evicting the oldest chunks beyond it)."""
        with self._lock:
            self._cache_limit = int(n)
            self._evict()

    def _evict(self) -> None:  # with the lock held
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes

    def __getstate__(self):  # picklable for torch DataLoader worker processes: cache and locks stay behind
        state = self.__dict__.copy()
        state.update(_cache=OrderedDict(), _cache_bytes=0, _lock=None, _inflight={}, _u16_lock=None)
        if state["_direct"] is not None:  # read directly: the dask graph is not needed (nor always picklable)
            state["_data"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._u16_lock = threading.Lock()

    # -- chunks -------------------------------------------------------------------------------------
    def _slicer(self, iy: int, ix: int, dims: tuple[str, ...]) -> tuple:
        ys = slice(int(self._ybounds[iy]), int(self._ybounds[iy + 1]))
        xs = slice(int(self._xbounds[ix]), int(self._xbounds[ix + 1]))
        if dims == ("c", "y", "x"):
            return (slice(None), ys, xs)
        if dims == ("y", "x", "c"):
            return (ys, xs, slice(None))
        return (ys, xs)

    def _to_rgb8(self, block: np.ndarray, dims: tuple[str, ...]) -> np.ndarray:
        block = np.asarray(block)
        if dims == ("c", "y", "x"):
            block = np.moveaxis(block, 0, -1)
        elif dims == ("y", "x"):
            block = block[..., None]
        if self.n_channels == 4:
            block = block[..., :3]
        if self.dtype == np.uint16:
            block = self._uint16_to_uint8(block)
        elif self.dtype.kind == "f":
            lo, hi = (float(block.min()), float(block.max())) if block.size else (0.0, 1.0)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo >= -1e-6 and hi <= 1 + 1e-6):
                raise ValueError(
                    f"image {self.name!r} is float with values in [{lo:g}, {hi:g}]; float images must lie in "
                    "[0, 1]. Rescale it (or convert to uint8) before cutting patches."
                )
            block = np.floor(np.clip(block, 0, 1) * 255 + 0.5).astype(np.uint8)
        else:
            block = block.astype(np.uint8, copy=False)
        if self.n_channels == 1:
            block = np.repeat(block, 3, axis=-1)
        return np.ascontiguousarray(block)

    def _uint16_to_uint8(self, block: np.ndarray) -> np.ndarray:
        """uint16 -> uint8: 16-bit values are divided by 257; an image holding 8-bit values (max <= 255) is
        taken as is. Decided on the first chunk with any non-zero pixel; a first chunk reaching only 256..4095
        (10- or 12-bit data?) and a later chunk contradicting the decision raise: never a silent division of
        8/12-bit values by 257, which turns the image black."""
        hi = int(block.max()) if block.size else 0
        with self._u16_lock:
            if self._u16_scale is None and 255 < hi <= _MAX_12BIT:
                raise ValueError(
                    f"image {self.name!r} is uint16 with values up to {hi} where tissue is read first: 10- or "
                    "12-bit data, or a very dark 16-bit image? The value range is ambiguous. Convert the image to "
                    "uint8 RGB before cutting patches."
                )
            if self._u16_scale is None and hi > 0:
                self._u16_scale = 1 if hi <= 255 else 257
                if self._u16_scale == 1:
                    logger.info(
                        "image %r is uint16 holding 8-bit values (max %d): read as uint8.", self.name, hi
                    )
            scale = self._u16_scale
        if scale == 1 and hi > 255:
            raise ValueError(
                f"image {self.name!r} is uint16 and its first chunks hold 8-bit values (max <= 255), but another "
                f"chunk reaches {hi}: the value range is ambiguous. Convert the image to uint8 RGB (dividing by "
                "257 if it is 16-bit) before cutting patches."
            )
        if scale in (None, 1):
            return block.astype(np.uint8)
        return ((block.astype(np.uint32) + 128) // 257).astype(np.uint8)

    def _fetch(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        """Decoded uint8 RGB chunks for ``keys``: from the cache, else read once (concurrent readers of the
        same chunk wait for the first one instead of decoding it again)."""
        out: dict[tuple[int, int], np.ndarray] = {}
        mine, theirs = [], []
        with self._lock:
            for k in keys:
                v = self._cache.get(k)
                if v is not None:  # a hit: most recently used now
                    self._cache.move_to_end(k)
                    out[k] = v
                elif k in self._inflight:
                    theirs.append((k, self._inflight[k]))
                else:
                    self._inflight[k] = threading.Event()
                    mine.append(k)
        if mine:
            try:
                try:
                    if self._direct is not None:
                        dims = self._direct_dims
                        blocks = [self._direct[self._slicer(*k, dims)] for k in mine]
                    else:
                        import dask

                        dims = self.dims
                        # dask.get: the synchronous scheduler as a function (named, dask imports
                        # distributed in every reader process to look for a client)
                        blocks = dask.compute(
                            *[self._data[self._slicer(*k, dims)] for k in mine], scheduler=dask.get
                        )
                except Exception as e:  # noqa: BLE001 - decoders raise their own types (Jpeg8Error, ...)
                    raise self._read_error(mine[0], e) from e
                rgbs = [self._to_rgb8(b, dims) for b in blocks]
                with self._lock:
                    for k, rgb in zip(mine, rgbs):
                        out[k] = rgb
                        self._cache[k] = rgb
                        self._cache_bytes += rgb.nbytes
                    self._evict()
            finally:
                with self._lock:
                    for k in mine:
                        self._inflight.pop(k).set()
        for k, ev in theirs:
            ev.wait()
            with self._lock:
                v = self._cache.get(k)
            if v is None:  # producer failed, or already evicted: read it here (raises the same error)
                v = self._fetch([k])[k]
            out[k] = v
        return out

    def _read_error(self, key: tuple[int, int], e: BaseException) -> ValueError:
        from .._errors import CorruptFileError

        ys, xs = self._slicer(*key, ("y", "x"))
        where = f"pixels y {ys.start}:{ys.stop}, x {xs.start}:{xs.stop} of image {self.name!r}"
        path = _source_file(self._direct)
        msg = (
            f"reading {where}{f' from {path!r}' if path else ''} failed ({type(e).__name__}: {e}): the file is "
            "truncated or corrupt. Download or copy it again (or re-export it)."
        )
        return CorruptFileError(path, msg) if path else ValueError(msg)

    # -- windows ------------------------------------------------------------------------------------
    def _chunk_range(self, bounds: np.ndarray, lo: int, hi: int) -> range:
        a = int(np.searchsorted(bounds, lo, side="right")) - 1
        b = int(np.searchsorted(bounds, hi, side="left"))
        return range(max(a, 0), min(b, len(bounds) - 1))

    def _numpy_windows(self, src: np.ndarray, boxes, size, fill, out):
        """Windows of an 8-bit RGB(A) image held in memory: views of it (no chunk cache, no copy) when inside,
        pasted on ``fill`` where they cross its border."""
        sy, sx = size
        wins = [] if out is None else out
        for k, (y0, x0) in enumerate(boxes):
            y0, x0 = int(y0), int(x0)
            ya, yb = max(y0, 0), min(y0 + sy, self.height)
            xa, xb = max(x0, 0), min(x0 + sx, self.width)
            if ya == y0 and xa == x0 and yb == y0 + sy and xb == x0 + sx:
                view = src[ya:yb, xa:xb, :3]
                if out is None:
                    wins.append(view)
                else:
                    out[k] = view
                continue
            win = np.empty((sy, sx, 3), dtype=np.uint8) if out is None else out[k]
            win[...] = fill
            if ya < yb and xa < xb:
                win[ya - y0 : yb - y0, xa - x0 : xb - x0] = src[ya:yb, xa:xb, :3]
            if out is None:
                wins.append(win)
        return wins

    def read_windows(
        self, boxes: np.ndarray, size: tuple[int, int], fill: np.ndarray, out: np.ndarray | None = None
    ) -> list[np.ndarray] | np.ndarray:
        """Read ``(sy, sx, 3)`` uint8 windows with top-left corners ``boxes`` (y0, x0); outside = ``fill``.

        Returns a list of windows, or fills and returns ``out`` (``(len(boxes), sy, sx, 3)`` uint8) when given.
        """
        sy, sx = size
        src = self._direct
        if (
            isinstance(src, np.ndarray)
            and self._direct_dims == ("y", "x", "c")
            and src.dtype == np.uint8
            and src.shape[-1] in (3, 4)
        ):
            return self._numpy_windows(src, boxes, size, fill, out)
        spans = []
        needed: set[tuple[int, int]] = set()
        for y0, x0 in boxes:
            y0, x0 = int(y0), int(x0)
            ya, yb = max(y0, 0), min(y0 + sy, self.height)
            xa, xb = max(x0, 0), min(x0 + sx, self.width)
            if ya >= yb or xa >= xb:
                spans.append(None)
                continue
            rys, rxs = self._chunk_range(self._ybounds, ya, yb), self._chunk_range(self._xbounds, xa, xb)
            spans.append((y0, x0, ya, yb, xa, xb, rys, rxs))
            needed.update((iy, ix) for iy in rys for ix in rxs)
        chunks = self._fetch(sorted(needed))
        wins = [] if out is None else out
        for k, span in enumerate(spans):
            win = np.empty((sy, sx, 3), dtype=np.uint8) if out is None else out[k]
            if out is None:
                wins.append(win)
            if span is None:
                win[...] = fill
                continue
            y0, x0, ya, yb, xa, xb, rys, rxs = span
            if ya > y0 or yb < y0 + sy or xa > x0 or xb < x0 + sx:
                win[...] = fill
            for iy in rys:
                cy0, cy1 = int(self._ybounds[iy]), int(self._ybounds[iy + 1])
                ty0, ty1 = max(ya, cy0), min(yb, cy1)
                for ix in rxs:
                    cx0, cx1 = int(self._xbounds[ix]), int(self._xbounds[ix + 1])
                    tx0, tx1 = max(xa, cx0), min(xb, cx1)
                    win[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0] = chunks[(iy, ix)][
                        ty0 - cy0 : ty1 - cy0, tx0 - cx0 : tx1 - cx0
                    ]
        return wins
