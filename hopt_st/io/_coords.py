"""The ``"micrometers"`` coordinate system: every element placed in µm next to its full-resolution pixels."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.transformations import (
    Identity,
    Scale,
    Sequence,
    get_transformation,
    set_transformation,
)

from .._constants import MICROMETERS_CS
from ._elements import get_spot_table


def fullres_coordinate_system(shapes) -> str:
    """The coordinate system in which the spots sit by ``Identity`` (their own units: full-resolution px)."""
    transformations = get_transformation(shapes, get_all=True)
    cs = next((c for c, t in transformations.items() if isinstance(t, Identity)), None)
    if cs is None:
        raise ValueError(
            f"the spots have no coordinate system in which they sit by Identity ({sorted(transformations)}); "
            "cannot place them in micrometres."
        )
    return cs


def add_micrometers(sdata: SpatialData, shapes_key: str, fullres_mpp: float) -> None:
    """Register every element that is placed in the spots' full-resolution pixel system also in
    ``"micrometers"`` (that placement followed by ``Scale(fullres_mpp)``), in place.

    Parameters
    ----------
    sdata
        The SpatialData (elements in memory; nothing is written to disk).
    shapes_key
        The spots, whose own coordinates are full-resolution pixels (for a slide without spots: its image,
        whose level 0 is).
    fullres_mpp
        µm per full-resolution pixel.
    """
    reference = sdata.shapes[shapes_key] if shapes_key in sdata.shapes else sdata.images[shapes_key]
    via = fullres_coordinate_system(reference)
    to_um = Scale([float(fullres_mpp), float(fullres_mpp)], axes=("x", "y"))
    for _, _, element in sdata.gen_spatial_elements():
        t = get_transformation(element, get_all=True).get(via)
        if t is not None:
            um = to_um if isinstance(t, Identity) else Sequence([t, to_um])
            set_transformation(element, um, to_coordinate_system=MICROMETERS_CS)


def micrometers_affine(element, what: str) -> np.ndarray:
    """The ``(3, 3)`` affine (x, y) that places ``element`` in ``"micrometers"``.

    Parameters
    ----------
    element
        An image, labels, points or shapes element.
    what
        The element, as the error names it (e.g. ``"the image"``, ``"shapes 'cells'"``).

    Raises
    ------
    ValueError
        When ``element`` is not placed in ``"micrometers"`` (not read by a hopt_st reader).
    """
    t = get_transformation(element, get_all=True).get(MICROMETERS_CS)
    if t is None:
        raise ValueError(
            f"{what} is not placed in the 'micrometers' coordinate system: read it with a hopt_st reader "
            "(hs.io.read_visium_hd, read_slide, ...), which adds it."
        )
    return t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


def centers_um(sdata: SpatialData, table_name: str | None = None) -> tuple[AnnData, np.ndarray]:
    """A table and the centres of its shapes in micrometres, ``(n_obs, 2)`` as (x, y) in table row order.

    The centre of a circle is its point, that of a polygon (a bin, a cell) its centroid, mapped to
    ``"micrometers"`` by the shapes' placement there (:func:`micrometers_affine`).
    """
    table, shapes_key = get_spot_table(sdata, table_name)
    shapes = sdata.shapes[shapes_key]
    m = micrometers_affine(shapes, f"shapes {shapes_key!r}")
    c = shapes.geometry.centroid
    xy = np.column_stack([c.x, c.y]) @ m[:2, :2].T + m[:2, 2]
    ids = table.obs[table.uns["spatialdata_attrs"]["instance_key"]].to_numpy()
    return table, pd.DataFrame(xy, index=shapes.index).loc[ids].to_numpy()
