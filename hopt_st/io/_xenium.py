"""Read a Xenium output folder with ``spatialdata_io.xenium`` (post-Xenium H&E and its alignment included) and
record pixel sizes and the ``"micrometers"`` coordinate system."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
from spatialdata import SpatialData
from spatialdata.transformations import Identity, Scale, Sequence, get_transformation, set_transformation

from .._constants import MICROMETERS_CS, UNS_KEY
from ._mpp import check_mpp

logger = logging.getLogger(__name__)


def read_xenium(path: str | Path, *, sample_id: str | None = None, **kwargs) -> SpatialData:
    """Read a Xenium Onboard Analysis output folder.

    Parameters
    ----------
    path
        The output folder (``experiment.xenium``, ``cells.parquet``, ``cell_boundaries.parquet``,
        ``transcripts.parquet``, ... and the post-Xenium ``*_he_image.ome.tif`` with its
        ``*_he_imagealignment.csv``, which spatialdata-io reads with ``xenium_aligned_image``).
    sample_id
        Recorded in ``uns["hopt_st"]["sample_id"]``; default the folder name.
    **kwargs
        Passed to ``spatialdata_io.xenium``; default ``cells_labels=False, nucleus_labels=False`` (the raster
        labels are not needed for cell features).

    Returns
    -------
    SpatialData
        As read by ``spatialdata_io.xenium`` (cells ``"table"``, ``"cell_boundaries"``,
        ``"nucleus_boundaries"``, ``"transcripts"``, morphology images, ``"he_image"``), every element also
        placed in ``"micrometers"`` (its ``"global"`` placement, in morphology pixels, then ``pixel_size``).
        When the cell labels are not read the table annotates ``"cell_boundaries"`` (spatialdata-io points it at
        ``"cell_labels"``). ``table.uns["hopt_st"]`` holds ``image_mpp`` per image (the H&E's from its
        alignment affine), ``fullres_mpp`` (= ``pixel_size``), ``sample_id`` and ``metadata``.
    """
    import spatialdata_io

    path = Path(path)
    specs_file = path / "experiment.xenium"
    if not specs_file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a Xenium output folder: it has no experiment.xenium (point read_xenium at the "
            "folder of the Xenium Onboard Analysis output)."
        )
    specs = json.loads(specs_file.read_text())
    ps = check_mpp(float(specs.get("pixel_size", 0)), f"pixel_size of {specs_file}")
    kwargs = {"cells_labels": False, "nucleus_labels": False} | kwargs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The table is annotating", category=UserWarning)
        sdata = spatialdata_io.xenium(path, **kwargs)
    table = sdata.tables.get("table")
    if table is not None:
        region = table.uns["spatialdata_attrs"]["region"]
        if region not in sdata.shapes and region not in sdata.labels and "cell_boundaries" in sdata.shapes:
            table.obs["region"] = "cell_boundaries"
            table.obs["region"] = table.obs["region"].astype("category")
            sdata.set_table_annotates_spatialelement(
                "table", region="cell_boundaries", region_key="region", instance_key="cell_id"
            )
    to_um = Scale([ps, ps], axes=("x", "y"))
    mpp = {}
    for _, name, element in sdata.gen_spatial_elements():
        t = get_transformation(element, get_all=True).get("global")
        if t is None:
            continue
        set_transformation(
            element, to_um if isinstance(t, Identity) else Sequence([t, to_um]), MICROMETERS_CS
        )
        if name in sdata.images:
            m = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
            mpp[name] = ps * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    if table is not None:
        table.uns[UNS_KEY] = {
            "image_mpp": mpp,
            "fullres_mpp": ps,
            "sample_id": sample_id or path.resolve().name,
            "metadata": {
                "st_technology": "Xenium",
                "analysis_sw_version": str(specs.get("analysis_sw_version", "")),
                "path": str(path),
            },
        }
    else:
        sdata.attrs.setdefault(UNS_KEY, {})["image_mpp"] = mpp
    logger.info(
        "read_xenium %s: %s cells, pixel size %.4g µm", path, None if table is None else table.n_obs, ps
    )
    return sdata
