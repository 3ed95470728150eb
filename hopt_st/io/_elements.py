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
)

logger = logging.getLogger(__name__)


def _check_named(what: str, key: str | None, elements) -> None:
    """A key given by the user must name an existing element; the error lists the ones there are."""
    if key is not None and key not in elements:
        raise KeyError(
            f"{what} {key!r} not found in the SpatialData; its {what}s are {list(elements.keys())}."
        )


def check_new_element(
    sdata: SpatialData, name: str, kind: str, overwrite: bool, what: str = "key_added"
) -> None:
    """A name for a new element of ``kind`` (``"shapes"``, ``"tables"``, ...) must be free in every element type
    (spatialdata names are unique across images, labels, points, shapes and tables, ignoring case); an element
    of the same kind and name is replaced only with ``overwrite``."""
    for k in ("images", "labels", "points", "shapes", "tables"):
        for existing in getattr(sdata, k):
            if existing.lower() != name.lower():
                continue
            if k == kind and existing == name:
                if not overwrite:
                    raise ValueError(
                        f"{kind} element {name!r} already exists in the SpatialData: pass overwrite=True to "
                        f"replace it, or {what}= another name."
                    )
            else:
                raise ValueError(
                    f"{what} = {name!r} is taken by the {k} element {existing!r} (spatialdata names are unique "
                    "across images, shapes, tables, ..., ignoring case): choose another name."
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
    return check_finite_centers(
        xy,
        table.obs_names,
        f"of {shapes_key!r} have NaN/inf coordinates",
        "drop them from the table and shapes",
    )


def check_finite_centers(xy: np.ndarray, names, what: str, fix: str) -> np.ndarray:
    """``xy`` unchanged, or a ``ValueError`` naming how many spots (``names``: their ids) are not finite.

    The message reads ``"<n> spots <what> (first: [...]): <fix> first."``.
    """
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        first = np.asarray(names)[np.flatnonzero(bad)[:5]].tolist()
        raise ValueError(f"{int(bad.sum())} spots {what} (first: {first}): {fix} first.")
    return xy


def spots_to_image_matrix(sdata: SpatialData, shapes_key: str, image_key: str) -> np.ndarray:
    """3x3 affine matrix mapping the shapes' own (x, y) coordinates to the image's level-0 pixel (x, y).

    The path goes through a coordinate system both elements are registered to (``"global"`` when shared),
    composed through it as spatialdata's ``get_transformation_between_coordinate_systems`` does.
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
    # shapes -> via, then via -> image: what get_transformation_between_coordinate_systems composes through one
    # intermediate system, without its graph search (whose first call imports networkx, ~0.5 s)
    axes = {"input_axes": ("x", "y"), "output_axes": ("x", "y")}
    to_via = np.asarray(cs_shapes[via].to_affine_matrix(**axes), dtype=np.float64)
    image_to_via = np.asarray(cs_image[via].to_affine_matrix(**axes), dtype=np.float64)
    m = np.linalg.solve(image_to_via, to_via)
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


#: a level up to this many pixels is read whole for the blank check; larger ones on a grid of windows
_BLANK_FULL_PX = 4 * 2**20
_BLANK_GRID, _BLANK_WINDOW = 8, 256
_BLANK_CACHE: dict[str, tuple | None] = {}


def _sample_blocks(level: xr.DataArray):
    """Yield ``(n, channels)`` pixel values of a level: the level whole when small, else an 8 x 8 grid of
    windows. The first block is read alone, so a look that stops there reads nothing more."""
    data = level.transpose(*[d for d in ("y", "x", "c") if d in level.dims]).data
    h, w = level_shape(level)
    if h * w <= _BLANK_FULL_PX:
        blocks = [data]
    else:
        ys = np.linspace(0, max(h - _BLANK_WINDOW, 0), _BLANK_GRID).astype(int)
        xs = np.linspace(0, max(w - _BLANK_WINDOW, 0), _BLANK_GRID).astype(int)
        blocks = [data[y : y + _BLANK_WINDOW, x : x + _BLANK_WINDOW] for y in ys for x in xs]
    n_c = level.sizes.get("c", 1)
    if hasattr(data, "dask"):
        blocks = _computed_lazily(blocks)
    for b in blocks:
        yield np.asarray(b).reshape(-1, n_c)


def _computed_lazily(blocks: list):
    """Dask blocks computed as they are asked for: the first alone, then all the others together.

    With ``dask.get``, the synchronous scheduler passed as a function: given by name, dask first imports
    distributed to look for a client (about 0.3 s the first time), for a few small windows.
    """
    import dask

    yield dask.compute(blocks[0], scheduler=dask.get)[0]
    if len(blocks) > 1:
        yield from dask.compute(*blocks[1:], scheduler=dask.get)


def image_blank_value(image) -> tuple | None:
    """The one colour every pixel of an image element has (a placeholder without H&E), else ``None``.

    A cheap look: the coarsest pyramid level, read whole when small, else on an 8 x 8 grid of 256 px windows
    (stopping at the first that varies); an alpha channel (4th) is ignored and values within 1 (uint8) or
    1/255 (float) count as one.
    """
    level = image_levels(image)[-1]
    name = getattr(level.data, "name", None)  # dask names identify the source: cache on them
    if name is not None and name in _BLANK_CACHE:
        return _BLANK_CACHE[name]
    lo = hi = None
    for px in _sample_blocks(level):
        px = px[:, :3]
        if not px.size:
            continue
        tol = 1.0 / 255 if px.dtype.kind == "f" else 1
        lo = px.min(axis=0) if lo is None else np.minimum(lo, px.min(axis=0))
        hi = px.max(axis=0) if hi is None else np.maximum(hi, px.max(axis=0))
        if not (np.all(np.isfinite(lo)) and np.all(hi - lo <= tol)):
            lo = None
            break
    blank = None if lo is None else tuple(np.asarray(lo).tolist())
    if name is not None:
        if len(_BLANK_CACHE) > 4096:
            _BLANK_CACHE.clear()
        _BLANK_CACHE[name] = blank
    return blank


def _blank_error(key: str, value: tuple, others: list[str]) -> str:
    alts = f"the other images: {others}" if others else "there is no other image in it"
    return (
        f"image {key!r} holds no H&E: every pixel is {value} (a placeholder, e.g. Space Ranger's transparent "
        f"hires PNG). Patches cut from it would all be identical. Use another image (image_key=; {alts}), or "
        "give the full-resolution H&E (read_visium(..., fullres_image_file=...))."
    )


def resolve_image_key(
    sdata: SpatialData, image_key: str | None = None, *, require_pixels: bool = False
) -> str:
    """Return ``image_key`` if given, else the largest image (most pixels at full resolution) that holds pixels.

    Images whose pixels are all one colour (placeholders) are skipped with a warning naming the alternatives.

    Parameters
    ----------
    sdata
        The SpatialData object.
    image_key
        An explicit choice (must exist).
    require_pixels
        Raise ``ValueError`` rather than return an image without H&E pixels: when the explicit ``image_key`` is
        one, or every image is (used by :func:`hopt_st.pp.patches`, where such an image gives identical patches).
    """
    _check_named("image", image_key, sdata.images)
    keys = list(sdata.images.keys())
    if image_key is not None:
        if require_pixels:
            value = image_blank_value(sdata.images[image_key])
            if value is not None:
                others = [k for k in keys if k != image_key and image_blank_value(sdata.images[k]) is None]
                raise ValueError(_blank_error(image_key, value, others))
        return image_key
    if not keys:
        raise ValueError("The SpatialData has no image: an H&E image element is needed to cut patches.")
    sizes = {k: np.prod(level_shape(image_levels(sdata.images[k])[0])) for k in keys}
    ranked = sorted(keys, key=lambda k: -sizes[k])
    blank = {}
    for k in ranked:
        value = image_blank_value(sdata.images[k])
        if value is None:
            if blank:
                logger.warning(
                    "image(s) %s hold no H&E (every pixel one colour, e.g. %s); using %r (pass image_key= to "
                    "choose).",
                    list(blank),
                    next(iter(blank.values())),
                    k,
                )
            elif len(keys) > 1:
                logger.info("Several images %s; using the largest, %r (pass image_key= to choose).", keys, k)
            return k
        blank[k] = value
    if require_pixels:
        first = ranked[0]
        raise ValueError(_blank_error(first, blank[first], [k for k in ranked if k != first]))
    logger.warning(
        "no image holds H&E pixels (every pixel one colour in %s); using %r.", list(blank), ranked[0]
    )
    return ranked[0]
