"""Find the table, its spots (shapes) and the H&E image inside a SpatialData object.

Every stage of hopt_st resolves ``table_name`` / ``image_key`` through these functions, so
that defaults and error messages are the same everywhere.
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr
from anndata import AnnData
from spatialdata import SpatialData, get_pyramid_levels, match_element_to_table
from spatialdata.models import TableModel, get_table_keys
from spatialdata.transformations import (
    get_transformation,
    get_transformation_between_coordinate_systems,
)

logger = logging.getLogger(__name__)


def _check_named(what: str, key: str | None, elements) -> None:
    """A key given by the user must name an existing element; the error lists the ones there are."""
    if key is not None and key not in elements:
        raise KeyError(
            f"{what} {key!r} not found in the SpatialData; its {what}s are {list(elements.keys())}."
        )


def resolve_table_name(sdata: SpatialData, table_name: str | None = None) -> str:
    """Return the name of the spot table: ``table_name`` if given, else the only table, else ``"table"``."""
    _check_named("table", table_name, sdata.tables)
    if table_name is not None:
        return table_name
    names = list(sdata.tables.keys())
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

    For circles this is the circle centre; for polygons (square pseudo-spots) the centroid, as spatialdata's
    ``get_centroids`` computes them (after ``match_element_to_table`` puts the shapes in table order).
    Raises when a table row has no matching shape or a centre is NaN.
    """
    name = resolve_table_name(sdata, table_name)
    table, shapes_key = get_spot_table(sdata, name)
    elements, matched = match_element_to_table(sdata, shapes_key, name)
    if matched.n_obs != table.n_obs:
        _, _, instance_key = get_table_keys(table)
        missing = table.obs_names.difference(matched.obs_names)
        raise ValueError(
            f"{table.n_obs - matched.n_obs} rows of table {name!r} have no shape in {shapes_key!r} (first: "
            f"{missing[:5].tolist()}...): the table's {instance_key!r} column must match the shapes' index."
        )
    shapes = elements[shapes_key]
    if not len(shapes):
        return np.empty((0, 2), dtype=np.float64)
    # centres in the shapes' own coordinates (what spatialdata's get_centroids computes in a coordinate system
    # where the shapes sit by Identity; done here directly, since get_centroids warns on a non-sorted index)
    geom = shapes.geometry
    if (geom.geom_type == "Point").all():
        xy = np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()]).astype(np.float64)
    else:
        c = geom.centroid
        xy = np.column_stack([c.x.to_numpy(), c.y.to_numpy()]).astype(np.float64)
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} spots of {shapes_key!r} have NaN/inf coordinates (first: "
            f"{table.obs_names[np.flatnonzero(bad)[:5]].tolist()}): drop them from the table and shapes first."
        )
    return xy


def spots_to_image_matrix(sdata: SpatialData, shapes_key: str, image_key: str) -> np.ndarray:
    """3x3 affine matrix mapping the shapes' own (x, y) coordinates to the image's level-0 pixel (x, y).

    The path goes through a coordinate system both elements are registered to (``"global"`` when shared),
    composed by spatialdata's ``get_transformation_between_coordinate_systems``.
    """
    shapes, image = sdata.shapes[shapes_key], sdata.images[image_key]
    cs_shapes = get_transformation(shapes, get_all=True)
    cs_image = get_transformation(image, get_all=True)
    common = [c for c in cs_image if c in cs_shapes]
    if not common:
        raise ValueError(
            f"shapes {shapes_key!r} (coordinate systems {sorted(cs_shapes)}) and image {image_key!r} (coordinate "
            f"systems {sorted(cs_image)}) share no coordinate system, so spots cannot be placed on the image: add "
            "a transformation to a common coordinate system with spatialdata.transformations.set_transformation."
        )
    via = "global" if "global" in common else common[0]
    t = get_transformation_between_coordinate_systems(
        sdata, shapes, image, intermediate_coordinate_systems=via
    )
    m = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)
    lin = m[:2, :2]
    if abs(lin[0, 1]) > 1e-9 * abs(lin).max() or abs(lin[1, 0]) > 1e-9 * abs(lin).max():
        logger.warning(
            "The spots of %r are rotated or sheared relative to image %r; patches are cut axis-aligned in the "
            "image's pixel grid around the mapped centres.",
            shapes_key,
            image_key,
        )
    return m


def image_levels(image) -> list[xr.DataArray]:
    """The levels of an image element, finest first (one for a plain image; spatialdata's
    ``get_pyramid_levels`` for a multiscale one)."""
    if isinstance(image, xr.DataArray):
        return [image]
    return list(get_pyramid_levels(image))


def level_shape(level: xr.DataArray) -> tuple[int, int]:
    """(height, width) of one image level."""
    return int(level.sizes["y"]), int(level.sizes["x"])


def resolve_image_key(sdata: SpatialData, image_key: str | None = None) -> str:
    """Return ``image_key`` if given, else the image with the most pixels at full resolution."""
    _check_named("image", image_key, sdata.images)
    if image_key is not None:
        return image_key
    keys = list(sdata.images.keys())
    if not keys:
        raise ValueError("The SpatialData has no image: an H&E image element is needed to cut patches.")
    if len(keys) == 1:
        return keys[0]
    sizes = {k: np.prod(level_shape(image_levels(sdata.images[k])[0])) for k in keys}
    best = max(sizes, key=sizes.get)
    logger.info("Several images %s; using the largest, %r (pass image_key= to choose).", keys, best)
    return best
