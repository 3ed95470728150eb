"""The H&E background of a spot plot: pick a small pyramid level, crop it to the spots, map spots onto it.

Nothing here loads a full whole-slide image: the finest pyramid level whose largest side is at most
``max_size`` pixels is chosen (or the coarsest level, strided down, when no level is that small), and
only the crop around the spots is computed from the lazy (dask) array.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import xarray as xr
from geopandas import GeoDataFrame
from spatialdata import SpatialData, get_pyramid_levels

from .._docs import inject_docs
from ..io._elements import (
    get_spot_table,
    resolve_image_key,
    resolve_table_name,
    spot_centers,
    spots_to_image_matrix,
)

logger = logging.getLogger(__name__)


@dataclass
class TissueView:
    """What a spot panel needs: an RGB crop (or None), spot centres and radius in the crop's pixels."""

    image: np.ndarray | None  # (h, w, 3) uint8, or None when there is no usable image
    xy: np.ndarray  # (n, 2) x, y in the crop's pixel grid (or the spots' own coordinates without image)
    radius: float  # spot radius in the same units
    image_key: str | None
    level: int | None


def _spot_radius(shapes: GeoDataFrame) -> float:
    if "radius" in shapes.columns:
        return float(np.nanmedian(shapes["radius"].to_numpy(dtype=float)))
    return float(np.sqrt(np.nanmedian(shapes.geometry.area.to_numpy()) / np.pi))


@inject_docs()
def tissue_view(
    sdata: SpatialData,
    *,
    table_name: str | None = None,
    image_key: str | None = None,
    show_image: bool = True,
    max_size: int = 2000,
    margin: float = 0.05,
) -> TissueView:
    """Spot centres (table row order) and, when possible, the H&E crop under them at a small level.

    Parameters
    ----------
    {spot_params}
    show_image
        Crop the image; ``False`` returns the spots alone, in their own coordinates.
    max_size
        Largest side, in pixels, of the crop: the finest pyramid level whose largest side is at most this
        is used (or the coarsest level, strided down, when none is that small).
    margin
        Crop margin around the spots, as a fraction of the spots' extent.

    Returns
    -------
    TissueView
        The RGB crop (``None`` without a usable image), spot centres and radius in its pixel grid, the
        image key and pyramid level used.
    """
    table_name = resolve_table_name(sdata, table_name)
    _, shapes_key = get_spot_table(sdata, table_name)
    shapes = sdata.shapes[shapes_key]
    xy = spot_centers(sdata, table_name)
    radius = _spot_radius(shapes)
    if not show_image or not sdata.images:
        return TissueView(None, xy, radius, None, None)
    image_key = resolve_image_key(sdata, image_key)
    image = sdata.images[image_key]
    to_img = spots_to_image_matrix(sdata, shapes_key, image_key)
    xy0 = xy @ to_img[:2, :2].T + to_img[:2, 2]
    r0 = radius * float(np.sqrt(abs(np.linalg.det(to_img[:2, :2]))))

    levels = [image] if isinstance(image, xr.DataArray) else get_pyramid_levels(image)
    h0, w0 = int(levels[0].sizes["y"]), int(levels[0].sizes["x"])
    level = next((i for i, lv in enumerate(levels) if max(lv.sizes["y"], lv.sizes["x"]) <= max_size), None)
    if level is None:
        level = len(levels) - 1
    arr = levels[level]
    h, w = int(arr.sizes["y"]), int(arr.sizes["x"])
    sy, sx = h / h0, w / w0
    xyl = xy0 * np.array([sx, sy])
    rl = r0 * float(np.sqrt(sx * sy))

    # crop to the spots plus a margin
    lo = xyl.min(axis=0) - rl
    hi = xyl.max(axis=0) + rl
    pad = margin * (hi - lo).max() + rl
    x0, y0 = (max(0, int(np.floor(v))) for v in lo - pad)
    x1, y1 = int(min(w, np.ceil(hi[0] + pad))), int(min(h, np.ceil(hi[1] + pad)))
    if x1 <= x0 or y1 <= y0:
        logger.warning(
            "The spots of table %r fall outside image %r; drawing them without it.", table_name, image_key
        )
        return TissueView(None, xy, radius, None, None)
    step = max(1, int(np.ceil(max(y1 - y0, x1 - x0) / max_size)))
    crop = arr.isel(y=slice(y0, y1, step), x=slice(x0, x1, step)).transpose("y", "x", "c")
    rgb = _to_rgb(np.asarray(crop.data if not hasattr(crop.data, "compute") else crop.data.compute()))
    if rgb is None:
        logger.warning("Image %r is fully transparent; drawing the spots without it.", image_key)
        return TissueView(None, xy, radius, None, None)
    xyc = (xyl - np.array([x0, y0])) / step
    return TissueView(rgb, xyc, rl / step, image_key, level)


def _to_rgb(a: np.ndarray) -> np.ndarray | None:
    """(h, w, c) -> (h, w, 3) uint8; None when an alpha channel says nothing is visible."""
    if a.shape[-1] == 4:
        if not np.any(a[..., 3]):
            return None
        a = a[..., :3]
    elif a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] != 3:
        a = a[..., :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        top = float(np.nanmax(a)) if a.size else 1.0
        a = np.clip(a / (top if top > 1 else 1.0) * 255, 0, 255).astype(np.uint8)
    return a
