"""Open a plain H&E slide (no spatial assay) as a SpatialData with its pixel size recorded.

The pixel size comes from ``image_mpp=`` when given, else from the file: Aperio's ``MPP =`` in the SVS
ImageDescription, the ``{"mpp": ...}`` JSON that :func:`hopt_st.datasets.write_pyramidal_tiff` (tifffile)
writes, OME-XML ``PhysicalSizeX``, or the TIFF resolution tags (per cm / inch / mm / µm). None found is an
error: a guessed pixel size would cut patches at the wrong physical size.
"""

from __future__ import annotations

import json
import logging
import re
from os import PathLike
from pathlib import Path

import numpy as np
import tifffile
from spatialdata import SpatialData

from .._constants import UNS_KEY
from ._coords import add_micrometers
from ._image_file import file_mpp, is_tiff, read_image_file
from ._mpp import UnknownPixelSizeError, check_mpp, set_image_mpp

logger = logging.getLogger(__name__)

#: µm per resolution unit of the TIFF ResolutionUnit tag (1 = none: no physical size)
_UM_PER_UNIT = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}
#: resolution tags coarser than this many µm/px are image-editor defaults (72 or 96 dpi), not a scan
_MAX_TAG_MPP = 20.0
_SVS_MPP = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
_OME_SIZE = re.compile(r'PhysicalSize([XY])="([0-9.eE+-]+)"')
_OME_UNIT = re.compile(r'PhysicalSizeXUnit="([^"]+)"')
_OME_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}


def _svs_mpp(description: str) -> float | None:
    if not description.startswith("Aperio"):
        return None
    m = _SVS_MPP.search(description)
    return float(m.group(1)) if m else None


def _json_mpp(description: str) -> float | None:
    """``{"mpp": x}`` in a tifffile JSON ImageDescription (what write_pyramidal_tiff writes)."""
    if not description.startswith("{"):
        return None
    try:
        meta = json.loads(description)
    except ValueError:
        return None
    value = meta.get("mpp") if isinstance(meta, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _ome_mpp(ome: str | None) -> float | None:
    if not ome:
        return None
    sizes = dict(_OME_SIZE.findall(ome))
    if "X" not in sizes:
        return None
    unit = _OME_UNIT.search(ome)
    factor = _OME_UM.get(unit.group(1) if unit else "µm")
    return None if factor is None else float(sizes["X"]) * factor


def _tag_mpp(page: tifffile.TiffPage) -> float | None:
    """µm/px from XResolution/YResolution; ``None`` without a physical unit or for screen-dpi defaults."""
    unit = int(page.resolutionunit)
    if unit not in _UM_PER_UNIT:
        return None
    rx, ry = page.resolution
    if not (rx > 0 and ry > 0):
        return None
    mx, my = _UM_PER_UNIT[unit] / rx, _UM_PER_UNIT[unit] / ry
    if abs(mx / my - 1) > 0.01:
        logger.warning("The TIFF's pixels are not square (%.4g x %.4g µm); using their mean.", mx, my)
    mpp = 0.5 * (mx + my)
    return mpp if mpp <= _MAX_TAG_MPP else None


def tiff_mpp(path: str | PathLike) -> tuple[float | None, str]:
    """µm per level-0 pixel recorded in a TIFF, and where it was found (``(None, "")`` when nowhere)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        description = page.description or ""
        candidates = (
            ("the SVS ImageDescription (MPP =)", lambda: _svs_mpp(description)),
            ("the ImageDescription's JSON 'mpp'", lambda: _json_mpp(description)),
            ("the OME-XML PhysicalSizeX", lambda: _ome_mpp(tif.ome_metadata)),
            ("the TIFF resolution tags", lambda: _tag_mpp(page)),
        )
        for where, read in candidates:
            value = read()
            if value is not None and np.isfinite(value) and value > 0:
                return float(value), where
    return None, ""


def read_slide(path: str | PathLike, *, image_mpp: float | None = None, image_key: str = "he") -> SpatialData:
    """Open an H&E slide or scan (pyramidal TIFF, SVS, NDPI, JPEG, PNG; OpenSlide formats with the
    ``slides`` extra) without spots or counts; TIFFs and OpenSlide formats lazily.

    Parameters
    ----------
    path
        A TIFF / BigTIFF (``.tif``, ``.tiff``, ``.svs``, ``.ndpi``, ...), pyramidal or not (pixels are not read
        here); an image Pillow decodes (JPEG, PNG, ...: read into memory, 8-bit or 16-bit RGB); with
        ``pip install "hopt-st[slides]"`` the formats OpenSlide reads (``.mrxs``, ``.vms``, ...). Grayscale
        images and images under 16 px a side are refused with the reason.
    image_mpp
        µm per pixel of the slide's full resolution; overrides what the file records.
    image_key
        Name of the image element.

    Returns
    -------
    SpatialData
        Image ``image_key`` (multiscale when the file is pyramidal), its level 0 in ``"global"`` (pixels) and
        ``"micrometers"``, and
        ``sdata.attrs["hopt_st"] = {"image_mpp": {image_key: mpp}, "slide": str(path), "mpp_source": ...}``
        where :func:`hopt_st.io.get_image_mpp` finds the pixel size until a table records it
        (:func:`hopt_st.pp.tile_grid` copies it into the grid table).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        Not a readable RGB image (the message says why), or no pixel size in the file and no ``image_mpp``
        (the message says how to pass it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"slide {str(path)!r} does not exist.")
    # the pixel size first: a slide refused for lack of one leaves no file open
    image = None
    if image_mpp is not None:
        mpp, source = check_mpp(image_mpp, "image_mpp"), "image_mpp argument"
    else:
        if not is_tiff(path):
            image = read_image_file(path)  # an unreadable / grayscale / tiny file: its own error first
            found, where = file_mpp(path)
        else:
            try:
                found, where = tiff_mpp(path)
            except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError):
                read_image_file(path)  # raises the reader's error, which names the file and the fix
                raise
        if found is None:
            records = (
                "no SVS 'MPP =', no 'mpp' metadata, no OME PhysicalSizeX, no resolution tags in cm/inch"
                if is_tiff(path)
                else f"a {path.suffix or 'plain'} image records no scan pixel size"
            )
            raise UnknownPixelSizeError(
                f"The pixel size of slide {str(path)!r} is unknown: the file records none ({records}). Pass "
                "image_mpp=<µm per full-resolution pixel> (e.g. 0.25 for a 40x scan, 0.5 for 20x; a Visium "
                "scan: 65 / spot_diameter_fullres)."
            )
        mpp, source = check_mpp(found, f"{path} ({where})"), where
    if image is None:  # not read above (a TIFF, or image_mpp given)
        image = read_image_file(path)  # lazy for TIFF / OpenSlide; ValueError naming the file and the reason
    sdata = SpatialData(images={image_key: image})
    add_micrometers(sdata, image_key, mpp)
    set_image_mpp(sdata, {image_key: mpp})
    sdata.attrs[UNS_KEY].update(slide=str(path), mpp_source=source)
    logger.info("read_slide %s: %.4g µm/px (from %s)", path.name, mpp, source)
    return sdata
