"""Read a Visium HD Space Ranger ``outs/`` folder with ``spatialdata_io.visium_hd`` and record pixel sizes.

The bins (2/8/16 µm squares) and Space Ranger 4's segmented cells stay the tables and shapes spatialdata-io
made; hopt_st adds the ``"micrometers"`` coordinate system and ``uns["hopt_st"]`` (µm/px per image) to them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

from spatialdata import SpatialData

from .._constants import UNS_KEY
from ._coords import add_micrometers
from ._mpp import check_mpp
from ._visium import _spaceranger_images

logger = logging.getLogger(__name__)


def _dataset_id(path: Path) -> str:
    prefixed = [p.name[: -len("_feature_slice.h5")] for p in path.glob("*_feature_slice.h5")]
    if len(prefixed) == 1:
        return prefixed[0]
    name = path.resolve().parent.name if path.resolve().name == "outs" else path.resolve().name
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name) or "visium_hd"


def _microns_per_pixel(path: Path) -> tuple[float, dict]:
    """µm per full-resolution pixel from a bin's scalefactors (``microns_per_pixel``), and the scalefactors."""
    files = sorted(path.glob("binned_outputs/square_*um/spatial/scalefactors_json.json")) or sorted(
        path.rglob("scalefactors_json.json")
    )
    if not files:
        raise FileNotFoundError(
            f"Visium HD folder {str(path)!r} has no scalefactors_json.json: point read_visium_hd at the 'outs/' "
            "folder of a Space Ranger Visium HD run (it holds binned_outputs/ and spatial/)."
        )
    sf = json.loads(files[0].read_text())
    mpp = sf.get("microns_per_pixel")
    if mpp is None and sf.get("bin_size_um") and sf.get("spot_diameter_fullres"):
        mpp = float(sf["bin_size_um"]) / float(sf["spot_diameter_fullres"])
    if mpp is None:
        raise ValueError(f"{str(files[0])!r} has no microns_per_pixel: pass image_mpp=.")
    return float(mpp), sf


def read_visium_hd(
    path: str | Path,
    dataset_id: str | None = None,
    image_mpp: float | None = None,
    *,
    bin_size: int | list[int] | None = None,
    fullres_image_file: str | Path | None = None,
) -> SpatialData:
    """Read a Visium HD Space Ranger ``outs/`` folder.

    Parameters
    ----------
    path
        The ``outs/`` folder (``binned_outputs/``, ``spatial/``, ``feature_slice.h5``; Space Ranger 4's
        ``segmented_outputs/`` when present).
    dataset_id
        Name prefix of the elements; default: the prefix of ``<id>_feature_slice.h5``, else the folder name.
    image_mpp
        µm per full-resolution pixel; default the bins' ``microns_per_pixel``.
    bin_size
        Bin size(s) in µm to read (e.g. ``8`` or ``[8, 16]``); default all.
    fullres_image_file
        The full-resolution H&E, when it is not in ``microscope_image/``.

    Returns
    -------
    SpatialData
        As read by ``spatialdata_io.visium_hd`` (tables ``"square_008um"`` etc. annotating shapes
        ``"<id>_square_008um"``; ``"cell_segmentations"`` when present), every element also placed in
        ``"micrometers"``, and each table's ``uns["hopt_st"]`` holding ``image_mpp`` per image, ``fullres_mpp``,
        ``sample_id`` and ``metadata`` (``st_technology="Visium HD"``, ``bin_size_um``).
    """
    import spatialdata_io

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Visium HD folder {str(path)!r} does not exist (expected an 'outs/' folder)."
        )
    if not list(path.glob("*feature_slice.h5")):
        raise FileNotFoundError(
            f"Visium HD folder {str(path)!r} has no feature_slice.h5: it is not a Space Ranger Visium HD outs/ "
            "folder (for Visium v1/v2 use read_visium)."
        )
    fullres, sf = _microns_per_pixel(path)
    if image_mpp is not None:
        fullres = image_mpp
    fullres = check_mpp(fullres, "image_mpp")
    dataset_id = dataset_id or _dataset_id(path)
    kwargs = {} if fullres_image_file is None else {"fullres_image_file": fullres_image_file}
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):  # its "Found segmentation" prints
        warnings.filterwarnings(
            "ignore", message="Converting .region_key.* to categorical", category=UserWarning
        )
        sdata = spatialdata_io.visium_hd(
            path, dataset_id=dataset_id, bin_size=bin_size, load_segmentations_only=False, **kwargs
        )
    if not sdata.tables:
        raise ValueError(
            f"{str(path)!r}: spatialdata_io.visium_hd found no bins (binned_outputs/square_*um)."
        )
    mpp = _spaceranger_images(sdata, sf, fullres)
    first = next(iter(sdata.tables.values()))
    add_micrometers(sdata, first.uns["spatialdata_attrs"]["region"], fullres)
    for name, table in sdata.tables.items():
        bin_um = float(name[len("square_") : -2]) if name.startswith("square_") else None
        table.uns[UNS_KEY] = {
            "image_mpp": dict(mpp),
            "fullres_mpp": fullres,
            "sample_id": dataset_id,
            "metadata": {"st_technology": "Visium HD", "path": str(path)}
            | ({"bin_size_um": bin_um} if bin_um is not None else {}),
        }
    logger.info("read_visium_hd %s: tables %s, %.4g µm per full-res px", path, list(sdata.tables), fullres)
    return sdata
