"""Find the table, its spots (shapes) and the H&E image inside a SpatialData object.

Every stage of hopt_st resolves ``table_name`` / ``image_key`` through these functions, so
that defaults and error messages are the same everywhere.
"""

from __future__ import annotations

import logging

import numpy as np
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import TableModel, get_table_keys

logger = logging.getLogger(__name__)


def resolve_table_name(sdata: SpatialData, table_name: str | None = None) -> str:
    """Return the name of the spot table: ``table_name`` if given, else the only table, else ``"table"``."""
    names = list(sdata.tables.keys())
    if table_name is not None:
        if table_name not in sdata.tables:
            raise KeyError(f"table {table_name!r} not found in the SpatialData; its tables are {names}.")
        return table_name
    if len(names) == 1:
        return names[0]
    if "table" in names:
        return "table"
    if not names:
        raise ValueError(
            "The SpatialData has no table: add an AnnData of counts annotating the spot shapes "
            "(spatialdata.models.TableModel.parse(adata, region=..., region_key=..., instance_key=...))."
        )
    raise ValueError(f"The SpatialData has several tables {names}: pass table_name= to choose one.")


def get_spot_table(sdata: SpatialData, table_name: str | None = None) -> tuple[AnnData, str]:
    """Return ``(table, shapes_key)``: the spot table and the name of the shapes element it annotates.

    Parameters
    ----------
    sdata
        The SpatialData object.
    table_name
        Name of the table; ``None`` picks the only table (or ``"table"``).

    Returns
    -------
    tuple of (AnnData, str)
    """
    name = resolve_table_name(sdata, table_name)
    table = sdata.tables[name]
    if TableModel.ATTRS_KEY not in table.uns:
        raise ValueError(
            f"table {name!r} does not annotate any element (no uns[{TableModel.ATTRS_KEY!r}]): parse it with "
            "spatialdata.models.TableModel.parse(adata, region=<shapes name>, region_key=..., instance_key=...)."
        )
    region, region_key, _ = get_table_keys(table)
    regions = [region] if isinstance(region, str) else list(region)
    shapes = [r for r in regions if r in sdata.shapes]
    if len(shapes) != 1:
        raise ValueError(
            f"table {name!r} must annotate exactly one shapes element (spot circles or squares); it annotates "
            f"{regions} and the SpatialData's shapes are {list(sdata.shapes.keys())}."
        )
    return table, shapes[0]


def spot_centers(sdata: SpatialData, table_name: str | None = None) -> np.ndarray:
    """Spot centres ``(n_spots, 2)`` as (x, y) in the shapes element's own coordinates, in table row order.

    For circles this is the circle centre; for polygons (square pseudo-spots) the centroid.
    Raises when a table row has no matching shape or a centre is NaN.
    """
    table, shapes_key = get_spot_table(sdata, table_name)
    _, _, instance_key = get_table_keys(table)
    shapes = sdata.shapes[shapes_key]
    if "radius" in shapes.columns:
        xy = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])
    else:
        c = shapes.geometry.centroid
        xy = np.column_stack([c.x.to_numpy(), c.y.to_numpy()])
    ids = table.obs[instance_key].to_numpy()
    pos = shapes.index.get_indexer(ids)
    if (pos < 0).any():
        missing = ids[pos < 0][:5].tolist()
        raise ValueError(
            f"{int((pos < 0).sum())} rows of table {resolve_table_name(sdata, table_name)!r} have no shape in "
            f"{shapes_key!r} (instance ids {missing}...): the table's {instance_key!r} column must match the "
            "shapes' index."
        )
    xy = xy[pos].astype(np.float64)
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} spots of {shapes_key!r} have NaN/inf coordinates (first: "
            f"{table.obs_names[np.flatnonzero(bad)[:5]].tolist()}): drop them from the table and shapes first."
        )
    return xy


def _level0_shape(image) -> tuple[int, int]:
    """(height, width) of an image element's full-resolution level (DataArray or multiscale DataTree)."""
    if hasattr(image, "sizes") and "y" in image.sizes:
        return int(image.sizes["y"]), int(image.sizes["x"])
    first = image[next(iter(image.children))]  # DataTree: scale0 first
    da = next(iter(first.ds.data_vars.values()))
    return int(da.sizes["y"]), int(da.sizes["x"])


def resolve_image_key(sdata: SpatialData, image_key: str | None = None) -> str:
    """Return ``image_key`` if given, else the image with the most pixels at full resolution."""
    keys = list(sdata.images.keys())
    if image_key is not None:
        if image_key not in sdata.images:
            raise KeyError(f"image {image_key!r} not found in the SpatialData; its images are {keys}.")
        return image_key
    if not keys:
        raise ValueError("The SpatialData has no image: an H&E image element is needed to cut patches.")
    if len(keys) == 1:
        return keys[0]
    sizes = {k: np.prod(_level0_shape(sdata.images[k])) for k in keys}
    best = max(sizes, key=sizes.get)
    logger.info("Several images %s; using the largest, %r (pass image_key= to choose).", keys, best)
    return best
