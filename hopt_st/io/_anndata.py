"""Visium data held as an AnnData (``sc.read_visium``, ``sq.read.visium``, an ``.h5ad``) as a SpatialData.

The scanpy layout: ``obsm["spatial"]`` = spot centres (x, y) in full-resolution pixels and
``uns["spatial"][library_id]`` = ``{"images": {"hires", "lowres"}, "scalefactors": {...}, "metadata": {...}}``,
with ``metadata["source_image_path"]`` naming the full-resolution scan when the reader was given it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale

from .._constants import SPACERANGER_SPOT_DIAMETER_FULLRES_UM, UNS_KEY, VISIUM_SPOT_DIAMETER_UM
from ._coords import add_micrometers
from ._elements import check_finite_centers
from ._mpp import check_mpp

logger = logging.getLogger(__name__)

#: element names of the SpatialData built from an AnnData
SPOTS_KEY = "spots"
FULL_IMAGE_KEY = "full_image"


def _library(adata: AnnData, library_id: str | None) -> tuple[str | None, dict]:
    """``(library_id, uns["spatial"][library_id])``; ``(None, {})`` when the AnnData has no ``uns["spatial"]``."""
    spatial = adata.uns.get("spatial")
    if not spatial:
        if library_id is not None:
            raise KeyError(f"library_id={library_id!r}: the AnnData has no uns['spatial'].")
        return None, {}
    libraries = list(spatial.keys())
    if library_id is None:
        if len(libraries) > 1:
            raise ValueError(
                f"uns['spatial'] holds several libraries {libraries}: pass library_id= to choose one (and the "
                "AnnData of that library only)."
            )
        library_id = libraries[0]
    elif library_id not in spatial:
        raise KeyError(f"library_id={library_id!r} is not in uns['spatial'] (libraries: {libraries}).")
    return str(library_id), dict(spatial[library_id])


def _fullres_mpp(lib: dict, library_id: str | None, image_mpp: float | None) -> float:
    """µm per full-resolution pixel: ``image_mpp`` if given, else 65 µm / ``spot_diameter_fullres``."""
    if image_mpp is not None:
        return check_mpp(image_mpp, "image_mpp")
    diameter = lib.get("scalefactors", {}).get("spot_diameter_fullres")
    if not diameter:
        raise ValueError(
            "The pixel size is unknown: no uns['spatial'][library_id]['scalefactors']['spot_diameter_fullres'] "
            f"(library {library_id!r}). Pass image_mpp=<µm per full-resolution pixel>."
        )
    return check_mpp(
        SPACERANGER_SPOT_DIAMETER_FULLRES_UM / float(diameter),
        f"65 µm / spot_diameter_fullres of uns['spatial'][{library_id!r}]['scalefactors']",
    )


def _spot_xy(adata: AnnData) -> np.ndarray:
    if "spatial" not in adata.obsm:
        raise KeyError(
            "The AnnData has no obsm['spatial']: spot centres (x, y) in full-resolution pixels are needed "
            "(sc.read_visium / sq.read.visium set them)."
        )
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"obsm['spatial'] must be (n_spots, 2) x, y coordinates, got shape {xy.shape}.")
    return check_finite_centers(
        xy[:, :2].copy(), adata.obs_names, "have NaN/inf in obsm['spatial']", "drop them"
    )


def _rgb_uint8(a, what: str) -> np.ndarray | None:
    """``(h, w, 3|4)`` array -> ``(h, w, 3)`` uint8 (floats in 0..1 scaled by 255); None for a placeholder
    without pixels (fully transparent, or one colour everywhere, as scanpy reads a transparent PNG)."""
    a = np.asarray(a)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"{what} has shape {a.shape}; expected an (height, width, 3) RGB or RGBA array.")
    if a.shape[-1] == 4:
        if not np.any(a[..., 3]):
            return None
        a = a[..., :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if np.nanmax(a) <= 1.0:
            a = a * 255
        a = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
    return None if a.size == 0 or a.min() == a.max() else a


def _image_element(rgb, transformations: dict):
    """An ``(h, w, 3)`` image as an element. An image in memory stays one numpy array: one dask chunk (no
    rechunk: ``Image2DModel.parse``'s ``chunks=`` is in (c, y, x) order and would cut x into 3 px chunks),
    which the patch reader recognises and cuts windows from at numpy speed."""
    import dask.array as da

    if not hasattr(rgb, "dask"):
        rgb = np.asarray(rgb)
        rgb = da.from_array(rgb, chunks=rgb.shape)
    return Image2DModel.parse(
        rgb, dims=("y", "x", "c"), c_coords=["r", "g", "b"], transformations=transformations
    )


def _read_image_file(path: Path):
    """A full-resolution scan from disk (TIFFs lazily, pyramid kept; JPEG, PNG through PIL): the reader of
    :func:`hopt_st.io.read_slide`, so an image one takes the other takes too."""
    from ._image_file import read_image_file

    return read_image_file(path)


def _full_image(image, lib: dict):
    """The full-resolution image element from ``image=`` or ``metadata["source_image_path"]`` (None if neither)."""
    if image is None:
        source = lib.get("metadata", {}).get("source_image_path")
        if source is None:
            return None
        source = Path(str(np.asarray(source).ravel()[0]) if not isinstance(source, str) else source)
        if not source.is_file():
            logger.warning(
                "uns['spatial'][...]['metadata']['source_image_path'] = %r does not exist (moved, or another "
                "machine); pass image=<path to the full-resolution scan>.",
                str(source),
            )
            return None
        logger.info(  # a file the input names, not the user: said, so it is never read unannounced (rule 4)
            "reading the full-resolution scan named in uns['spatial'][...]['metadata']['source_image_path']: %s "
            "(pass image= to use another one)",
            source,
        )
        image = source
    if isinstance(image, (str, os.PathLike)):
        return _read_image_file(Path(image))
    if hasattr(image, "shape") and hasattr(image, "dtype"):
        rgb = image if hasattr(image, "compute") else _rgb_uint8(image, "image=")
        if rgb is None:
            raise ValueError(
                "image= is blank (fully transparent, or one colour everywhere): no tissue to cut."
            )
        return _image_element(rgb, {"global": Identity()})
    raise TypeError(
        f"image= must be a path to the full-resolution scan or an (height, width, 3) array, got {type(image).__name__}."
    )


def _downscaled_images(lib: dict, fullres_mpp: float) -> tuple[dict, dict]:
    """``uns["spatial"][lib]["images"]`` (hires/lowres PNGs) as elements placed by their scale factors."""
    images, mpp = {}, {}
    scalefactors = lib.get("scalefactors", {})
    for res, arr in dict(lib.get("images", {})).items():
        scalef = scalefactors.get(f"tissue_{res}_scalef")
        if not scalef:
            logger.info("uns['spatial'] image %r has no tissue_%s_scalef; left out.", res, res)
            continue
        rgb = _rgb_uint8(arr, f"uns['spatial'][...]['images'][{res!r}]")
        if rgb is None:
            logger.info("uns['spatial'] image %r is a blank placeholder (no pixels); left out.", res)
            continue
        key = f"{res}_image"
        images[key] = _image_element(rgb, {"global": Scale([1 / scalef, 1 / scalef], axes=("x", "y"))})
        mpp[key] = fullres_mpp / float(scalef)
    return images, mpp


def anndata_to_spatialdata(
    adata: AnnData,
    image=None,
    *,
    library_id: str | None = None,
    image_mpp: float | None = None,
    full_table: bool = True,
    source_image: bool = True,
) -> SpatialData:
    """The SpatialData of :func:`from_anndata`; with ``full_table=False`` its table holds only the spot ids and
    coordinates (for cutting patches without copying the counts), and only the finest image is kept;
    ``source_image=False`` ignores ``metadata["source_image_path"]`` (plots want the small images)."""
    if not isinstance(adata, AnnData):
        raise TypeError(f"expected an AnnData, got {type(adata).__name__}.")
    library_id, lib = _library(adata, library_id)
    xy = _spot_xy(adata)
    fullres = _fullres_mpp(lib, library_id, image_mpp)
    images, mpp = {}, {}
    full = _full_image(image, lib if source_image else {})
    if full is not None:
        images[FULL_IMAGE_KEY], mpp[FULL_IMAGE_KEY] = full, fullres
    if full is None or full_table:
        small, small_mpp = _downscaled_images(lib, fullres)
        images.update(small)
        mpp.update(small_mpp)
    if not images:
        raise ValueError(
            "The AnnData holds no usable H&E image (no uns['spatial'][library_id]['images'] with scale factors, "
            "no metadata['source_image_path']): pass image=<path to the full-resolution scan, or an array>."
        )
    if full is None:
        finest = min(mpp, key=mpp.get)
        logger.info(
            "No full-resolution image for library %r (image= or uns['spatial'][...]['metadata']"
            "['source_image_path']): using %r at %.3g µm/px.",
            library_id,
            finest,
            mpp[finest],
        )
    n = adata.n_obs
    table = adata.copy() if full_table else AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
    table.uns.pop(TableModel.ATTRS_KEY, None)
    table.obs["region"] = pd.Categorical([SPOTS_KEY] * n)
    table.obs["spot_id"] = np.arange(n)
    table.obsm["spatial"] = xy.copy()
    store = dict(table.uns.get(UNS_KEY, {}))
    store.update({"image_mpp": mpp, "fullres_mpp": fullres, "sample_id": str(library_id or SPOTS_KEY)})
    table.uns[UNS_KEY] = store
    spots = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.full(n, VISIUM_SPOT_DIAMETER_UM / 2 / fullres),
        index=np.arange(n),
        transformations={"global": Identity()},
    )
    table = TableModel.parse(table, region=SPOTS_KEY, region_key="region", instance_key="spot_id")
    sdata = SpatialData(images=images, shapes={SPOTS_KEY: spots}, tables={"table": table})
    add_micrometers(sdata, SPOTS_KEY, fullres)
    return sdata


def from_anndata(
    adata: AnnData,
    image: str | os.PathLike | np.ndarray | None = None,
    *,
    library_id: str | None = None,
    image_mpp: float | None = None,
) -> SpatialData:
    """Visium data held as an AnnData (scanpy's layout) as a SpatialData that hopt_st and spatialdata-plot use.

    Reads what ``sc.read_visium``, ``sq.read.visium`` or an ``.h5ad`` holds: spot centres in
    ``obsm["spatial"]`` (x, y, full-resolution pixels) and ``uns["spatial"][library_id]`` (``scalefactors``,
    ``images``, ``metadata["source_image_path"]``). :func:`hopt_st.pp.embed` and :func:`hopt_st.pp.patches`
    take the AnnData directly and call this for you.

    Parameters
    ----------
    adata
        Spots of one Visium library.
    image
        The full-resolution H&E scan whose pixels are the units of ``obsm["spatial"]``: a path (TIFFs are
        read lazily, other formats with PIL) or an ``(height, width, 3)`` array. Default
        ``uns["spatial"][library_id]["metadata"]["source_image_path"]`` when it exists; without either, only
        the hires/lowres images are available and patches are upsampled from them (a warning says by how
        much).
    library_id
        Key of ``uns["spatial"]``; needed only when it holds several libraries.
    image_mpp
        µm per full-resolution pixel. Default ``65 / spot_diameter_fullres`` (Space Ranger's
        ``spot_diameter_fullres`` spans a theoretical 65 µm spot, as :func:`hopt_st.io.read_visium` assumes).

    Returns
    -------
    SpatialData
        Images ``"full_image"`` (when given or found) and ``"hires_image"`` / ``"lowres_image"`` (from
        ``uns["spatial"]``, RGB uint8, placed by their ``tissue_*_scalef``; blank placeholders are left
        out), 55 µm circles ``"spots"`` at ``obsm["spatial"]``, and table ``"table"``: a copy of
        ``adata`` annotating them (``obs["region"]``, ``obs["spot_id"]``) with ``uns["hopt_st"]`` holding
        ``image_mpp`` per image, ``fullres_mpp`` and ``sample_id``. Elements sit in ``"global"``
        (full-resolution pixels) and ``"micrometers"``.
    """
    return anndata_to_spatialdata(adata, image, library_id=library_id, image_mpp=image_mpp, full_table=True)
