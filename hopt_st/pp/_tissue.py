"""Tissue detection on a low-resolution view of an H&E slide: :func:`detect_tissue`.

A pyramid level near ``detection_mpp`` µm/px is read (block-averaged to it when no level is that coarse, at
bounded memory through dask), its saturation is smoothed and thresholded (Otsu on log saturation, never below
``min_saturation`` so that bare glass stays background), small holes are filled and small objects (dust,
debris) removed with scikit-image, and the outline of each remaining piece becomes a polygon (with its holes)
in the image's level-0 pixels, stored as a spatialdata shapes element that can be drawn and edited.
"""

from __future__ import annotations

import copy
import logging
import math

import dask.array as da
import numpy as np
import pandas as pd
import shapely
from geopandas import GeoDataFrame, GeoSeries
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import find_contours, label, regionprops
from spatialdata import SpatialData
from spatialdata.models import ShapesModel
from spatialdata.transformations import get_transformation

from .._docs import inject_docs
from ..io._elements import check_new_element, image_levels, level_shape, resolve_image_key
from ..io._mpp import check_mpp, get_image_mpp

logger = logging.getLogger(__name__)

#: µm per pixel of the view tissue is detected on (a 1.25x overview)
DETECTION_MPP = 8.0
#: saturations below this count as this (log domain)
_SAT_FLOOR = 1e-3
#: background (glass) is taken to be in view when at least this fraction of the view is glass-like
#: (saturation below twice ``min_saturation``); below it, Otsu's method would split the tissue itself
NO_BACKGROUND_FRACTION = 0.01
BACKGROUNDS = ("auto", "present", "absent")


def _choose_level(shapes: list[tuple[int, int]], mpp0: float, detection_mpp: float) -> int:
    """The coarsest level still at least as fine as ``detection_mpp`` (level 0 when none is)."""
    h0, w0 = shapes[0]
    best = 0
    for i, (h, w) in enumerate(shapes):
        if mpp0 * 0.5 * (h0 / h + w0 / w) <= detection_mpp * 1.001:
            best = i
    return best


def _overview(level, factor: int) -> np.ndarray:
    """``(h, w, 3)`` float32 RGB of one level, block-averaged ``factor`` x ``factor`` (trailing edge dropped)."""
    arr = level.transpose("y", "x", "c").data
    arr = arr if isinstance(arr, da.Array) else da.from_array(np.asarray(arr))
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    elif arr.shape[-1] == 1:
        arr = da.repeat(arr, 3, axis=-1)
    if factor > 1:
        h, w = arr.shape[0] // factor * factor, arr.shape[1] // factor * factor
        step = factor * max(1, 2048 // factor)
        arr = arr[:h, :w].rechunk((step, step, -1))
        arr = da.coarsen(np.mean, arr.astype(np.float32), {0: factor, 1: factor})
    rgb = np.asarray(arr.compute(scheduler="threads"), dtype=np.float32)
    if np.dtype(level.dtype) == np.uint16:
        rgb /= 257.0
    elif np.dtype(level.dtype).kind == "f":
        rgb *= 255.0
    return rgb


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] (0 for black)."""
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0).astype(np.float32)


def _clean(mask: np.ndarray, min_object_px: float, max_hole_px: float) -> np.ndarray:
    """Fill holes of at most ``max_hole_px`` pixels, then drop pieces smaller than ``min_object_px``."""
    holes = label(~mask, connectivity=1)
    sizes = np.bincount(holes.ravel())
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill = sizes <= max_hole_px
    fill[0] = False
    fill[border] = False  # background touching the border is not a hole
    mask = mask | fill[holes]
    pieces = label(mask, connectivity=2)
    keep = np.bincount(pieces.ravel()) >= min_object_px
    keep[0] = False
    return keep[pieces]


def _polygons(mask: np.ndarray, scale: tuple[float, float]) -> list[shapely.Polygon]:
    """One polygon (with holes) per 8-connected piece of ``mask``, in level-0 pixels.

    Pixel ``(i, j)`` of the mask covers level-0 ``[j sx, (j + 1) sx) x [i sy, (i + 1) sy)``; outlines follow
    the 0.5 iso-line between pixel centres.
    """
    sy, sx = scale
    out = []
    for region in regionprops(label(mask, connectivity=2)):
        r0, c0, _, _ = region.bbox
        sub = np.pad(region.image, 1).astype(np.float32)
        rings = []
        for contour in find_contours(sub, 0.5):
            xy = np.column_stack([(contour[:, 1] - 1 + c0 + 0.5) * sx, (contour[:, 0] - 1 + r0 + 0.5) * sy])
            if len(xy) >= 4:
                rings.append(shapely.Polygon(xy))
        if not rings:
            continue
        rings.sort(key=lambda p: p.area, reverse=True)  # the outline encloses every hole of its piece
        poly = shapely.Polygon(rings[0].exterior, [r.exterior for r in rings[1:]])
        poly = shapely.make_valid(poly.simplify(0.25 * min(sx, sy)))
        out.extend(g for g in getattr(poly, "geoms", [poly]) if isinstance(g, shapely.Polygon) and g.area > 0)
    return out


def _check_background(
    sat: np.ndarray, threshold: float, min_saturation: float, background: str, key
) -> float:
    """The threshold to use once it is known whether background is in view (see :func:`detect_tissue`):
    ``-1`` (everything is tissue) when none is, the glass level when Otsu's threshold fell inside the tissue."""
    if background == "present":
        return threshold
    glass_level = 2.0 * min_saturation
    glass = float((sat < glass_level).mean())
    if background == "absent":
        return -1.0
    if glass < NO_BACKGROUND_FRACTION:
        logger.warning(
            "detect_tissue: no background in view of image %r (%.2f %% of it is glass-like, saturation < %.3g): "
            "Otsu's threshold (%.3f) would split the tissue itself, so the whole image is taken as tissue. If "
            "there is glass, pass background='present' (and min_saturation) to threshold anyway.",
            key,
            100 * glass,
            glass_level,
            threshold,
        )
        return -1.0
    below = sat[sat <= threshold]
    if below.size and float(np.median(below)) > glass_level:
        logger.warning(
            "detect_tissue: Otsu's threshold %.3f on image %r falls inside the tissue (the pixels below it have a "
            "median saturation of %.3f, not glass-like): only glass-like pixels (saturation < %.3g) are taken as "
            "background. Pass background='present' to keep Otsu's threshold, or background='absent' to take the "
            "whole image as tissue.",
            threshold,
            key,
            float(np.median(below)),
            glass_level,
        )
        return glass_level
    return threshold


@inject_docs()
def detect_tissue(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    key_added: str = "tissue",
    level: int | None = None,
    detection_mpp: float = DETECTION_MPP,
    image_mpp: float | None = None,
    min_saturation: float = 0.05,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float = 10_000.0,
    background: str = "auto",
    overwrite: bool = False,
) -> None:
    """Find the tissue on an H&E slide and store its outline as polygons.

    A low-resolution view is read: pyramid level ``level``, or by default the coarsest level at most
    ``detection_mpp`` µm/px, block-averaged down to about ``detection_mpp`` (a whole-slide image is never
    loaded at full resolution). Its HSV saturation is smoothed (Gaussian, σ = 1 px) and thresholded with
    Otsu's method on its logarithm (glass is a narrow mode of low saturation, tissue a broad one), never
    below ``min_saturation`` (bare glass is grey-white, H&E-stained tissue is pink to
    purple). Holes up to ``max_hole_um2`` are filled and pieces smaller than ``min_object_um2`` (dust,
    debris) dropped; each remaining piece becomes one polygon with its larger holes.

    Tissue detection says when it cannot tell (issue 20, rule 9). With no background in view (less than 1 % of
    the view glass-like, below twice ``min_saturation``: an ROI export, a TMA core, a crop inside the tissue)
    Otsu's method would split the tissue itself, so the whole image is taken as tissue; when Otsu's threshold
    falls inside the tissue (the pixels below it are not glass-like), glass-like pixels only are background.
    Both are logged as warnings saying how to override (``background=``).

    Parameters
    ----------
    sdata
        SpatialData with an H&E image.
    image_key
        {image_key}
    key_added
        Name of the shapes element written.
    level
        Pyramid level to detect on (0 = full resolution), read as it is; default: chosen from
        ``detection_mpp``.
    detection_mpp
        µm per pixel of the view tissue is detected on.
    image_mpp
        {image_mpp}
    min_saturation
        Lowest saturation threshold (0-1): a blank slide yields no tissue instead of thresholded noise.
    min_object_um2
        Pieces of tissue smaller than this (µm²) are dropped.
    max_hole_um2
        Holes in the tissue up to this size (µm²) are filled; larger ones (lumens, tears) stay holes.
    background
        ``"auto"``: decide from the view as described above; ``"present"``: always threshold (Otsu, never
        below ``min_saturation``); ``"absent"``: the whole image is tissue.
    overwrite
        {overwrite}

    Returns
    -------
    ``None``, and sets:

    ``sdata.shapes[key_added]``
        Polygons (one row per piece of tissue, largest first) in the image's level-0 pixels, registered to
        the image's coordinate systems with its level-0 transformations; column ``area_um2``.

    Raises
    ------
    ValueError
        No tissue found (blank or very faint slide; the message gives the threshold used), an existing
        ``key_added`` without ``overwrite``, or an unknown pixel size.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background = {background!r} must be one of {BACKGROUNDS}.")
    image_key = resolve_image_key(sdata, image_key)
    check_new_element(sdata, key_added, "shapes", overwrite)
    detection_mpp = check_mpp(detection_mpp, "detection_mpp")
    mpp0 = get_image_mpp(sdata, image_key=image_key, image_mpp=image_mpp)
    image = sdata.images[image_key]
    levels = image_levels(image)
    shapes = [level_shape(lv) for lv in levels]
    if level is None:
        level = _choose_level(shapes, mpp0, detection_mpp)
        down = 0.5 * (shapes[0][0] / shapes[level][0] + shapes[0][1] / shapes[level][1])
        factor = max(1, int(math.floor(detection_mpp / (mpp0 * down) * 1.001)))
    elif isinstance(level, bool) or not isinstance(level, int | np.integer) or not 0 <= level < len(levels):
        raise ValueError(f"level = {level!r}: image {image_key!r} has levels 0..{len(levels) - 1}.")
    else:
        factor = 1
    rgb = _overview(levels[level], factor)
    sy = shapes[0][0] / shapes[level][0] * factor  # level-0 px per overview px
    sx = shapes[0][1] / shapes[level][1] * factor
    view_mpp = mpp0 * 0.5 * (sy + sx)
    sat = gaussian(_saturation(rgb), sigma=1.0, preserve_range=True)
    # Otsu on log saturation: glass is a narrow mode near 0.02, stained tissue a broad one from ~0.1 up
    log_sat = np.log(np.maximum(sat, _SAT_FLOOR))
    otsu = float(np.exp(threshold_otsu(log_sat))) if np.ptp(log_sat) > 0 else 1.0
    threshold = max(otsu, float(min_saturation))
    threshold = _check_background(sat, threshold, float(min_saturation), background, image_key)
    mask = _clean(sat > threshold, min_object_um2 / view_mpp**2, max_hole_um2 / view_mpp**2)
    polygons = _polygons(mask, (sy, sx))
    if not polygons:
        raise ValueError(
            f"No tissue found in image {image_key!r} (level {level}, {view_mpp:.3g} µm/px view): no piece of at "
            f"least {min_object_um2:g} µm² has a saturation above {threshold:.3f} (Otsu {otsu:.3f}, "
            f"min_saturation {min_saturation:g}). The slide looks blank; for very faint tissue lower "
            "min_saturation / min_object_um2, or draw the tissue polygons yourself into sdata.shapes."
        )
    polygons.sort(key=lambda p: p.area, reverse=True)
    gdf = GeoDataFrame(
        {"area_um2": np.array([p.area for p in polygons]) * mpp0**2},
        geometry=GeoSeries(polygons),
        index=pd.RangeIndex(len(polygons)),
    )
    transformations = copy.deepcopy(get_transformation(image, get_all=True))
    sdata.shapes[key_added] = ShapesModel.parse(gdf, transformations=transformations)
    logger.info(
        "detect_tissue: %d piece(s), %.3g mm² of tissue in %r (level %d at %.3g µm/px, threshold %.3f)",
        len(polygons),
        gdf["area_um2"].sum() / 1e6,
        image_key,
        level,
        view_mpp,
        threshold,
    )
