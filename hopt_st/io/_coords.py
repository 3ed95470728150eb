"""The ``"micrometers"`` coordinate system: every element placed in µm next to its full-resolution pixels."""

from __future__ import annotations

from spatialdata import SpatialData
from spatialdata.transformations import (
    Identity,
    Scale,
    Sequence,
    get_transformation,
    set_transformation,
)

from .._constants import MICROMETERS_CS


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
