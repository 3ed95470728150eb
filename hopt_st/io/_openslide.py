"""Whole-slide formats only OpenSlide reads (MIRAX, Hamamatsu VMS, Sakura, DICOM WSI, ...), lazily.

Optional: ``pip install "hopt-st[slides]"`` brings ``openslide-python`` and ``openslide-bin`` (OpenSlide's C
library as a wheel, no system package needed). Each pyramid level is an :class:`OpenSlideLevel`, an
array-like that reads regions with ``OpenSlide.read_region`` on request; it holds the path, the level and its
size (read once, when the slide is opened to list its levels), so it pickles to worker processes, and each
process opens the slide itself.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from .._errors import CorruptFileError
from ._image_file import MIN_SIDE, SLIDES_EXTRA, check_size

_CHUNK = 2048  # px per side of a dask chunk


def _openslide(path: Path):
    try:
        import openslide
    except ImportError as e:  # the module, or its C library (openslide-bin)
        raise ValueError(
            f"slide {str(path)!r}: reading {path.suffix or 'this'} slides needs OpenSlide, which is not installed ({e}). Install the optional "
            f"extra: {SLIDES_EXTRA} (openslide-python + openslide-bin, no system library needed), or convert "
            "the slide to a pyramidal TIFF (e.g. `vips tiffsave in.mrxs out.tif --tile --pyramid --bigtiff`)."
        ) from None
    return openslide


def _open(path: Path):
    openslide = _openslide(path)
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as e:
        raise ValueError(
            f"slide {str(path)!r}: OpenSlide does not read this format ({e}). Convert it to a pyramidal TIFF "
            "(e.g. `vips tiffsave in out.tif --tile --pyramid --bigtiff`)."
        ) from None
    except openslide.OpenSlideError as e:
        raise CorruptFileError.from_error(path, e, what="slide", fix="Download or copy it again.") from e


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """``(h, w, 3)`` uint8: an ``(h, w, 4)`` RGBA region (straight alpha, as ``OpenSlide.read_region`` gives it)
    over white glass. Transparent pixels lie outside the scanned area (OpenSlide's convention), and partly
    transparent ones, e.g. where a MIRAX slide's camera images are blended, mix with it in proportion."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() == 255:
        return rgb.copy()
    a = alpha.astype(np.uint32)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


class OpenSlideLevel:
    """One OpenSlide level as a lazy ``(y, x, 3)`` uint8 array-like, its alpha composited on white
    (:func:`composite_on_white`).

    Parameters
    ----------
    path
        The slide.
    level
        Its pyramid level.
    dimensions
        ``(width, height)`` of the level, px (``OpenSlide.level_dimensions[level]``).
    downsample
        Level-0 pixels per pixel of the level (``OpenSlide.level_downsamples[level]``).
    """

    def __init__(self, path: str | os.PathLike, level: int, dimensions: tuple[int, int], downsample: float):
        self.path, self.level = str(Path(path).resolve()), int(level)
        w, h = dimensions
        self.downsample = float(downsample)
        self.shape, self.dtype, self.ndim = (int(h), int(w), 3), np.dtype(np.uint8), 3
        self._slide, self._pid = None, None
        self._lock, self._open_lock = threading.Lock(), threading.Lock()

    def _get(self):
        if self._slide is None or self._pid != os.getpid():
            with self._open_lock:
                if self._slide is None or self._pid != os.getpid():
                    self._slide, self._pid = _open(Path(self.path)), os.getpid()
        return self._slide

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        (y0, y1, sy), (x0, x1, sx) = (k.indices(n) for k, n in zip(key[:2], self.shape[:2]))
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)[::sy, ::sx][..., key[2]]
        # read_region takes level-0 coordinates for the top-left corner and a size in this level's pixels
        loc = (round(x0 * self.downsample), round(y0 * self.downsample))
        slide = self._get()
        with self._lock:  # one OpenSlide handle per process, used by one thread at a time
            rgba = np.asarray(slide.read_region(loc, self.level, (x1 - x0, y1 - y0)))
        return composite_on_white(rgba)[::sy, ::sx][..., key[2]]

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_slide=None, _pid=None, _lock=None, _open_lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock, self._open_lock = threading.Lock(), threading.Lock()

    def __dask_tokenize__(self):
        st = os.stat(self.path)
        return ("hopt_st.OpenSlideLevel", self.path, self.level, st.st_size, st.st_mtime_ns)


def read_openslide_image(path: str | os.PathLike):
    """A slide OpenSlide reads as a (multiscale) ``Image2DModel`` element, lazily."""
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    from ._tiff import multiscale_image

    path = Path(path)
    slide = _open(path)
    try:
        sizes = list(zip(slide.level_dimensions, slide.level_downsamples))
    finally:
        slide.close()
    levels = [OpenSlideLevel(path, i, dims, ds) for i, (dims, ds) in enumerate(sizes)]
    check_size(path, *levels[0].shape[:2])
    arrays = [
        da.from_array(lv, chunks=(_CHUNK, _CHUNK, 3), asarray=True).transpose(2, 0, 1)
        for lv in levels
        if min(lv.shape[:2]) >= MIN_SIDE
    ]
    if len(arrays) == 1:
        return Image2DModel.parse(
            arrays[0], dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations={"global": Identity()}
        )
    return multiscale_image(arrays)


def openslide_mpp(path: str | os.PathLike) -> tuple[float | None, str]:
    """µm per level-0 pixel from OpenSlide's ``openslide.mpp-x`` / ``-y`` properties."""
    path = Path(path)
    openslide = _openslide(path)
    slide = _open(path)
    try:
        props = slide.properties
        values = [
            props.get(getattr(openslide, name, "")) for name in ("PROPERTY_NAME_MPP_X", "PROPERTY_NAME_MPP_Y")
        ]
    finally:
        slide.close()
    try:
        mpps = [float(v) for v in values if v is not None]
    except ValueError:
        return None, ""
    mpps = [m for m in mpps if np.isfinite(m) and m > 0]
    return (float(np.mean(mpps)), "OpenSlide's openslide.mpp-x") if mpps else (None, "")
