"""Open an H&E image file of any format hopt_st reads, as a spatialdata image element.

One reader for every place a scan is given by path (``read_slide``, ``hopt-st predict SLIDE``,
``embed(image=...)``, ``hopt-st embed --image``, cohort rows), so an image one of them takes opens in all of
them. The format is told from the file's first bytes, not its name:

- TIFF / BigTIFF (SVS, NDPI and other TIFF-based scans): lazily, pyramid kept (:mod:`hopt_st.io._tiff`);
- formats only OpenSlide reads (MIRAX ``.mrxs``, Hamamatsu ``.vms``/``.vmu``, Sakura ``.svslide``, DICOM WSI,
  ...): lazily through the optional ``openslide`` extra (:mod:`hopt_st.io._openslide`);
- anything Pillow decodes (JPEG, PNG, BMP, WebP, ...): read whole into memory.

Images that hold no usable H&E are refused with the reason: one channel (grayscale; H&E models need the
stains' colours), a side shorter than :data:`MIN_SIDE` px, a file no reader decodes.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np

from .._errors import CorruptFileError

logger = logging.getLogger(__name__)

#: shortest side (px) of an image that can hold tissue worth cutting a patch from
MIN_SIDE = 16
#: extra that brings OpenSlide (and its C library, as a wheel)
SLIDES_EXTRA = 'pip install "hopt-st[slides]"'
#: formats that neither tifffile nor Pillow read, and OpenSlide does
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide", ".dcm", ".czi", ".bif")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Pillow modes that hold colour (converted to RGB); every other mode is one channel
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"}


def is_tiff(path: Path) -> bool:
    """Whether the file starts like a TIFF or BigTIFF (whatever its name says)."""
    with open(path, "rb") as f:
        return f.read(4) in _TIFF_MAGIC


def grayscale_message(path, detail: str) -> str:
    """The refusal of a one-channel image: what it is, why, and how to get an RGB scan."""
    return (
        f"image {os.fspath(path)!r} is grayscale ({detail}): H&E models need the stains' colours, and a "
        "grayscale copy would give embeddings unlike any H&E. Use the scanner's colour (RGB) export of the "
        "slide; if the scan really is colour-less, convert it knowingly, e.g. "
        "`PIL.Image.open(p).convert('RGB').save('rgb.png')`."
    )


def check_size(path, height: int, width: int) -> None:
    """Refuse an image too small to hold tissue (e.g. a 1 x 1 px placeholder)."""
    if min(height, width) < MIN_SIDE:
        raise ValueError(
            f"image {os.fspath(path)!r} is {width} x {height} px: too small to hold tissue (a side under "
            f"{MIN_SIDE} px; a placeholder or a thumbnail?). Give the full-resolution H&E scan."
        )


def _too_many_pixels(path: Path, declared: str, limit) -> ValueError:
    return ValueError(
        f"image {str(path)!r} declares {declared}, more than Pillow's decompression-bomb limit of "
        f"{(limit or 0) / 1e6:.0f} Mpx for an image decoded whole. Convert it to a tiled pyramidal TIFF, which is "
        "read lazily (e.g. `vips tiffsave in.jpg out.tif --tile --pyramid --compression jpeg`), or, if you "
        "trust the file, raise PIL.Image.MAX_IMAGE_PIXELS."
    )


def _pillow_rgb(path: Path) -> np.ndarray:
    """A Pillow-readable image as ``(h, w, 3)`` uint8, or a ValueError saying why it holds no H&E.

    Pillow's decompression-bomb guard stays on (rule 8: memory bounded by what is real, not by what a header
    claims): the size the header declares is checked before anything is decoded, and above
    ``PIL.Image.MAX_IMAGE_PIXELS`` (about 89 Mpx by default; raise it for files you trust) the image is refused,
    with how to read it lazily instead.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow warns between its limit and twice it: refused just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:  # Pillow refuses above twice its limit, before we see the size
        size = re.search(r"\((\d+) pixels\)", str(e))
        declared = f"{int(size.group(1)) / 1e6:.0f} Mpx" if size else "too many pixels"
        raise _too_many_pixels(path, declared, Image.MAX_IMAGE_PIXELS) from None
    except UnidentifiedImageError as e:
        suffix = path.suffix.lower()
        hint = (
            f" {suffix} slides need OpenSlide: {SLIDES_EXTRA}."
            if suffix in OPENSLIDE_SUFFIXES
            else " hopt_st reads TIFF/BigTIFF (SVS, NDPI, OME-TIFF), JPEG, PNG and the formats Pillow "
            f"decodes, and with {SLIDES_EXTRA} the OpenSlide formats (MRXS, VMS, SCN, DICOM, ...)."
        )
        raise CorruptFileError(
            path,
            f"image {str(path)!r} is in no format hopt_st reads (not a TIFF, and Pillow cannot identify "
            f"it), or it is corrupt.{hint} Otherwise convert it to a TIFF or PNG.",
        ) from e
    with im:
        w, h = im.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and w * h > limit:
            raise _too_many_pixels(
                path, f"{w} x {h} px ({w * h / 1e6:.0f} Mpx, {3 * w * h / 2**30:.1f} GiB decoded)", limit
            )
        check_size(path, im.height, im.width)
        if im.mode not in _COLOUR_MODES:
            raise ValueError(grayscale_message(path, f"Pillow mode {im.mode!r}, one channel"))
        try:
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            return np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:  # truncated / garbled data
            raise CorruptFileError.from_error(path, e, what="image", fix="Download or copy it again.") from e


def read_image_file(path: str | os.PathLike):
    """The H&E image in ``path`` as an ``Image2DModel`` element (c, y, x), uint8 RGB, level 0 in ``"global"``.

    Parameters
    ----------
    path
        A TIFF-based scan (read lazily, pyramid kept), an OpenSlide format (with the ``slides`` extra), or an
        image Pillow decodes (JPEG, PNG, ...; read into memory).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        Grayscale, smaller than :data:`MIN_SIDE` px, not 8-bit RGB (TIFF), an OpenSlide format without the
        extra installed; :class:`~hopt_st.io.CorruptFileError` when no reader decodes it.
    """
    from spatialdata.transformations import Identity

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"image {str(path)!r} does not exist{' (a folder)' if path.is_dir() else ''}."
        )
    if is_tiff(path):
        from ._tiff import read_tiff_image

        return read_tiff_image(path)
    if path.suffix.lower() in OPENSLIDE_SUFFIXES:
        from ._openslide import read_openslide_image

        return read_openslide_image(path)
    from ._anndata import _image_element

    return _image_element(_pillow_rgb(path), {"global": Identity()})


def file_mpp(path: str | os.PathLike) -> tuple[float | None, str]:
    """µm per level-0 pixel recorded in an image file, and where (``(None, "")`` when nowhere).

    TIFFs: see :func:`hopt_st.io._slide.tiff_mpp`; OpenSlide formats: ``openslide.mpp-x``; JPEG / PNG record
    no scan pixel size (their dpi is a printing hint), so ``None``.
    """
    path = Path(path)
    if is_tiff(path):
        from ._slide import tiff_mpp

        return tiff_mpp(path)
    if path.suffix.lower() in OPENSLIDE_SUFFIXES:
        from ._openslide import openslide_mpp

        return openslide_mpp(path)
    return None, ""
