"""The one pixel-size convention of hopt_st.

Convention
----------
``image_mpp`` is the number of micrometres per pixel of an image element's **full-resolution level**
(level 0, ``scale0`` of a pyramid) -- the pixel grid of the array itself, whatever transformation maps it
into a coordinate system. Readers record it in the spot table::

    table.uns["hopt_st"]["image_mpp"] = {<image key>: <µm per level-0 pixel>, ...}
    table.uns["hopt_st"]["fullres_mpp"] = <µm per unit of the spots' coordinates>  # full-res pixels

For a Visium hires image (a downscaled copy of the full-resolution scan) ``image_mpp`` is therefore
``fullres_mpp / tissue_hires_scalef``. A slide read without any table (:func:`hopt_st.io.read_slide`) records
the same mapping in ``sdata.attrs["hopt_st"]["image_mpp"]``, which is consulted when no table records it.
Every later step (patches, embeddings) reads it through :func:`get_image_mpp`; an explicit ``image_mpp=``
argument always wins.
"""

from __future__ import annotations

from spatialdata import SpatialData

from .._constants import UNS_KEY
from ._elements import resolve_image_key, resolve_table_name


def get_image_mpp(
    sdata: SpatialData,
    image_key: str | None = None,
    table_name: str | None = None,
    image_mpp: float | None = None,
) -> float:
    """Micrometres per pixel of the full-resolution level of ``image_key``.

    Parameters
    ----------
    sdata
        The SpatialData object.
    image_key
        The image element; ``None`` picks the largest image.
    table_name
        The spot table holding the recorded pixel size; ``None`` picks the only table.
    image_mpp
        An explicit value; when given it is validated and returned as is.

    Returns
    -------
    float
        µm per level-0 pixel.
    """
    if image_mpp is not None:
        return check_mpp(image_mpp, "image_mpp")
    image_key = resolve_image_key(sdata, image_key)
    slide = sdata.attrs.get(UNS_KEY, {}).get("image_mpp", {})
    where = "no table"
    if table_name is not None or sdata.tables:
        try:
            table_name = resolve_table_name(sdata, table_name)
        except ValueError:  # several tables and none chosen: a slide's own record still answers
            if image_key not in slide:
                raise
        else:
            recorded = sdata.tables[table_name].uns.get(UNS_KEY, {}).get("image_mpp", {})
            if image_key in recorded:
                return check_mpp(
                    recorded[image_key], f"table {table_name!r} uns['{UNS_KEY}']['image_mpp'][{image_key!r}]"
                )
            where = f"in table {table_name!r}"
    if image_key in slide:  # a slide without spots (io.read_slide): recorded in the SpatialData's attrs
        return check_mpp(slide[image_key], f"sdata.attrs['{UNS_KEY}']['image_mpp'][{image_key!r}]")
    raise UnknownPixelSizeError(
        f"The pixel size of image {image_key!r} is unknown: no table.uns['{UNS_KEY}']['image_mpp'][{image_key!r}] "
        f"{where} (nor sdata.attrs['{UNS_KEY}']['image_mpp']). Pass image_mpp=<µm per full-resolution pixel> "
        f"(e.g. 0.25 for a 40x scan, 0.5 for 20x), or record it with hopt_st.io.set_image_mpp(sdata, "
        f"{{{image_key!r}: value}})."
    )


class UnknownPixelSizeError(ValueError):
    """No µm per pixel is known for an image: the caller passes ``image_mpp=`` (``--image-mpp`` on the CLI)."""


def set_image_mpp(sdata: SpatialData, mpp: dict[str, float], table_name: str | None = None) -> None:
    """Record µm per full-resolution pixel for image elements, in place.

    Parameters
    ----------
    sdata
        The SpatialData object.
    mpp
        ``{image_key: µm per level-0 pixel}``.
    table_name
        The spot table to record it in; a SpatialData without tables (a slide) records it in
        ``sdata.attrs["hopt_st"]["image_mpp"]``.
    """
    if table_name is None and not sdata.tables:
        uns = sdata.attrs
    else:
        uns = sdata.tables[resolve_table_name(sdata, table_name)].uns
    store = dict(uns.get(UNS_KEY, {}))
    recorded = dict(store.get("image_mpp", {}))
    for key, value in mpp.items():
        if key not in sdata.images:
            raise KeyError(
                f"image {key!r} not found in the SpatialData; its images are {list(sdata.images)}."
            )
        recorded[key] = check_mpp(value, f"mpp[{key!r}]")
    store["image_mpp"] = recorded
    uns[UNS_KEY] = store


def check_mpp(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} = {value!r} is not a number of µm per pixel.") from None
    if not (v > 0 and v < 1000):
        raise ValueError(f"{what} = {value!r} is not a plausible µm per pixel (expected 0 < mpp < 1000).")
    return v
