"""Read a Space Ranger ``outs/`` folder (Visium) with spatialdata-io and record pixel sizes."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
from spatialdata import SpatialData
from spatialdata.models import Image2DModel
from spatialdata.transformations import get_transformation

from .._constants import (
    SPACERANGER_SPOT_DIAMETER_FULLRES_UM,
    UNS_KEY,
    VISIUM_SPOT_DIAMETER_UM,
    VISIUM_SPOT_DISTANCE_UM,
)
from .._errors import CorruptFileError
from .._h5 import check_h5_file
from ._coords import add_micrometers
from ._counts import check_h5_readable, check_spots, ensure_raw_counts
from ._elements import get_spot_table, spot_centers
from ._mpp import check_mpp

logger = logging.getLogger(__name__)

_POSITIONS = ("tissue_positions.csv", "tissue_positions_list.csv", "tissue_positions.parquet")


def _check_folder(path: Path, counts_file: str) -> tuple[Path, dict]:
    if not path.is_dir():
        raise FileNotFoundError(
            f"Space Ranger folder {str(path)!r} does not exist (expected an 'outs/' folder)."
        )
    missing = []
    if not (path / counts_file).is_file():
        missing.append(str(path / counts_file))
    sf = path / "spatial" / "scalefactors_json.json"
    if not sf.is_file():
        missing.append(str(sf))
    if not any((path / "spatial" / p).is_file() for p in _POSITIONS):
        missing.append(str(path / "spatial" / "tissue_positions.csv (or tissue_positions_list.csv)"))
    if missing:
        raise FileNotFoundError(
            f"Space Ranger folder {str(path)!r} is incomplete: missing {missing}. Point read_visium at the "
            "'outs/' folder of a Space Ranger run (it holds filtered_feature_bc_matrix.h5 and spatial/)."
        )
    try:
        scalefactors = json.loads(sf.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFileError(
            sf,
            f"{str(sf)!r} is not valid JSON ({e}): the file is truncated or corrupt. Copy it again from the "
            "Space Ranger run's outs/spatial/ folder.",
        ) from None
    if not isinstance(scalefactors, dict):
        raise CorruptFileError(sf, f"{str(sf)!r} is not a JSON object of scale factors: copy it again.")
    if not scalefactors.get("spot_diameter_fullres"):
        raise ValueError(
            f"{str(sf)!r} has no 'spot_diameter_fullres', so the pixel size cannot be inferred: pass image_mpp=."
        )
    for key in ("spot_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef"):
        value = scalefactors.get(key)
        if value is None:
            continue
        try:
            ok = float(value) > 0 and np.isfinite(float(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"{str(sf)!r} has {key} = {value!r}: it must be a positive number (Space Ranger writes one). "
                "Copy the file again from the Space Ranger run, or pass image_mpp= with the µm per full-resolution "
                "pixel."
            )
    return sf, scalefactors


def _rgb(image, key: str):
    """Drop an alpha channel (keeping transformations); warn when the image is a transparent placeholder."""
    if image.sizes.get("c", 3) != 4:
        return image
    alpha_max = int(image.data[3].max().compute())
    if alpha_max == 0:
        logger.warning(
            "image %r is fully transparent (alpha = 0 everywhere): it is a placeholder without H&E pixels; "
            "use another image (image_key=) for patches.",
            key,
        )
    t = get_transformation(image, get_all=True)
    return Image2DModel.parse(
        image.data[:3], dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations=t
    )


def _spaceranger_images(sdata: SpatialData, sf: dict, fullres: float) -> dict[str, float]:
    """µm per pixel of Space Ranger's images (``*_full_image``, ``*_hires_image``, ``*_lowres_image``) from the
    full-resolution µm/px and the scale factors ``sf`` (``scalefactors_json.json``), by image key; images of
    unknown resolution are left out. Each single-scale image loses its alpha channel (:func:`_rgb`), in place.
    """
    mpp = {}
    for key in list(sdata.images.keys()):
        if key.endswith("_hires_image") and sf.get("tissue_hires_scalef"):
            mpp[key] = fullres / float(sf["tissue_hires_scalef"])
        elif key.endswith("_lowres_image") and sf.get("tissue_lowres_scalef"):
            mpp[key] = fullres / float(sf["tissue_lowres_scalef"])
        elif key.endswith("_full_image"):
            mpp[key] = fullres
        img = sdata.images[key]
        if not hasattr(img, "children") or not len(img.children):
            sdata.images[key] = _rgb(img, key)
    return mpp


def _spatialdata_io_visium(path: Path, **kwargs) -> SpatialData:
    """``spatialdata_io.visium`` without its notice about its own table: it builds ``obs["region"]`` as strings
    and spatialdata converts them (``UserWarning: Converting region_key: region to categorical dtype``) on
    every read -- nothing about the user's data. A failure caused by a truncated counts file is reported as
    such (:class:`CorruptFileError` naming it)."""
    import spatialdata_io

    counts = path / kwargs.get("counts_file", "filtered_feature_bc_matrix.h5")
    if counts.suffix == ".h5" and counts.is_file():
        with contextlib.suppress(OSError):  # not HDF5 at all: spatialdata_io's error, reported below
            check_h5_file(counts)  # refuses data from outside the file (rule 4)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Converting .region_key.* to categorical", category=UserWarning
            )
            return spatialdata_io.visium(path, **kwargs)
    except Exception:
        if counts.suffix == ".h5":
            check_h5_readable(counts)  # raises CorruptFileError naming the file when that is the cause
        raise


def read_visium(
    path: str | Path,
    dataset_id: str | None = None,
    image_mpp: float | None = None,
    *,
    fullres_image_file: str | Path | None = None,
    counts_file: str = "filtered_feature_bc_matrix.h5",
) -> SpatialData:
    """Read a Visium Space Ranger ``outs/`` folder.

    Parameters
    ----------
    path
        The ``outs/`` folder (``filtered_feature_bc_matrix.h5``, ``spatial/``).
    dataset_id
        Name prefix of the elements (spatialdata-io convention); default: the library id of the counts file,
        else the folder name.
    image_mpp
        µm per **full-resolution** pixel (the spots' coordinate unit). Default
        ``65 / spot_diameter_fullres`` (Space Ranger's ``spot_diameter_fullres`` spans a theoretical 65 µm
        spot, not the 55 µm capture spot). The hires/lowres images get
        ``image_mpp / tissue_{hires,lowres}_scalef``.
    fullres_image_file
        Optional full-resolution H&E (e.g. the ``.tif`` given to Space Ranger).
    counts_file
        Counts matrix inside ``path``.

    Returns
    -------
    SpatialData
        As read by :func:`spatialdata_io.visium` (images ``"<id>_hires_image"``, ``"<id>_lowres_image"``,
        optionally ``"<id>_full_image"``; circles ``"<id>"``; table ``"table"``; coordinate system ``"<id>"`` in
        full-resolution pixels), every element also placed in ``"micrometers"``, with RGB images,
        ``table.obsm["spatial"]`` (x, y full-res px) and ``table.uns["hopt_st"]`` holding ``image_mpp`` per
        image, ``fullres_mpp``, ``sample_id`` and the scalefactors as ``metadata``.
    """
    path = Path(path)
    sf_path, sf = _check_folder(path, counts_file)
    kwargs = {}
    if fullres_image_file is not None:
        if not Path(fullres_image_file).is_file():
            raise FileNotFoundError(f"fullres_image_file {str(fullres_image_file)!r} does not exist.")
        kwargs["fullres_image_file"] = fullres_image_file
    try:
        sdata = _spatialdata_io_visium(path, dataset_id=dataset_id, counts_file=counts_file, **kwargs)
    except ValueError as e:
        if dataset_id is not None or "library_id" not in str(e):
            raise
        # no library id in the counts file: name the elements after the folder
        name = path.resolve().parent.name if path.resolve().name == "outs" else path.resolve().name
        dataset_id = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name) or "visium"
        logger.info("No library id in %s; using dataset_id=%r.", path, dataset_id)
        sdata = _spatialdata_io_visium(path, dataset_id=dataset_id, counts_file=counts_file, **kwargs)

    if image_mpp is not None:
        fullres = check_mpp(image_mpp, "image_mpp")
    else:
        fullres = check_mpp(
            SPACERANGER_SPOT_DIAMETER_FULLRES_UM / float(sf["spot_diameter_fullres"]),
            f"65 µm / spot_diameter_fullres of {sf_path}",
        )
    mpp = _spaceranger_images(sdata, sf, fullres)
    for key in sdata.images:
        if key not in mpp:
            logger.warning("image %r: unknown resolution; no pixel size recorded.", key)

    table_name = "table" if "table" in sdata.tables else next(iter(sdata.tables))
    table = sdata.tables[table_name]
    check_spots(table, path / counts_file)
    ensure_raw_counts(table, path / counts_file)
    _, shapes_key = get_spot_table(sdata, table_name)
    try:
        xy = spot_centers(sdata, table_name)
    except ValueError as err:
        raise ValueError(
            f"{str(path)!r}: {err} (Spot positions come from spatial/tissue_positions*.csv.)"
        ) from err
    table.obsm["spatial"] = xy
    add_micrometers(sdata, shapes_key, fullres)
    sample_id = dataset_id or shapes_key
    table.uns[UNS_KEY] = {
        "image_mpp": mpp,
        "fullres_mpp": fullres,
        "sample_id": str(sample_id),
        "metadata": {
            "st_technology": "Visium",
            "spot_diameter": VISIUM_SPOT_DIAMETER_UM,
            "inter_spot_dist": VISIUM_SPOT_DISTANCE_UM,
            "scalefactors": {k: float(v) for k, v in sf.items() if isinstance(v, (int, float))},
            "path": str(path),
        },
    }
    logger.info("read_visium %s: %d spots, %.4g µm per full-res px", path, table.n_obs, fullres)
    return sdata
