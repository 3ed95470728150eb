"""Write a SpatialData sample as a Space Ranger ``outs/``-like folder (for tutorials and tests without real data).

The folder has what :func:`hopt_st.io.read_visium` (spatialdata-io) reads: ``filtered_feature_bc_matrix.h5``
(10x HDF5 matrix), ``spatial/scalefactors_json.json``, ``spatial/tissue_positions_list.csv`` (the headerless
6-column format) and ``spatial/tissue_hires_image.png`` / ``tissue_lowres_image.png`` downscaled from the
sample's image. Like a real run there is no full-resolution image: pass the original as ``fullres_image_file``
when you have it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def write_spaceranger_outs(
    sdata,
    path: str | Path,
    *,
    table_name: str | None = None,
    image_key: str | None = None,
    hires_size: int = 2000,
    lowres_size: int = 600,
) -> Path:
    """Write ``sdata`` (spots in full-res px of its image level 0, raw counts) as a Space Ranger ``outs/`` folder.

    Parameters
    ----------
    sdata : SpatialData
        A sample as written by :func:`hopt_st.datasets.synthetic_visium` (Identity transforms, spot
        coordinates = image level-0 pixels).
    path : str or Path
        The ``outs/`` folder to create (must not exist or be empty).
    table_name, image_key : str, optional
        Elements to use; defaults as everywhere in hopt_st.
    hires_size, lowres_size : int
        Largest side of the hires / lowres PNGs.

    Returns
    -------
    Path
        ``path``.
    """
    import h5py
    import scipy.sparse as sp
    from PIL import Image

    from .io._elements import get_spot_table, resolve_image_key, resolve_table_name
    from .pl._tissue import _levels

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{str(path)!r} exists and is not empty: choose a new folder for the outs/.")
    table_name = resolve_table_name(sdata, table_name)
    table, _ = get_spot_table(sdata, table_name)
    image_key = resolve_image_key(sdata, image_key)
    levels = _levels(sdata.images[image_key])
    h0, w0 = int(levels[0].sizes["y"]), int(levels[0].sizes["x"])
    uns = table.uns.get("hopt_st", {})
    fullres_mpp = float(uns.get("fullres_mpp", 0.5))
    spatial = path / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)

    # counts: 10x HDF5 (CSC, features x barcodes)
    x = sp.csr_matrix(table.X).T.tocsc()
    with h5py.File(path / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(table.obs_names, dtype="S"))
        m.create_dataset("data", data=x.data.astype(np.int32))
        m.create_dataset("indices", data=x.indices.astype(np.int64))
        m.create_dataset("indptr", data=x.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(x.shape, dtype=np.int32))
        feats = m.create_group("features")
        names = np.array(table.var_names, dtype="S")
        feats.create_dataset("id", data=names)
        feats.create_dataset("name", data=names)
        feats.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(names)))
        feats.create_dataset("genome", data=np.array([b"synthetic"] * len(names)))
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))

    # positions (headerless: barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres)
    xy = np.asarray(table.obsm["spatial"], dtype=float)
    obs = table.obs
    rows = obs["array_row"].to_numpy() if "array_row" in obs else np.zeros(len(xy), int)
    cols = obs["array_col"].to_numpy() if "array_col" in obs else np.arange(len(xy))
    with open(spatial / "tissue_positions_list.csv", "w") as fh:
        for bc, r, c, (px, py) in zip(table.obs_names, rows, cols, xy):
            fh.write(f"{bc},1,{int(r)},{int(c)},{int(round(py))},{int(round(px))}\n")

    # images: the coarsest pyramid level that is still at least hires_size, resized with PIL
    def _png(size: int, name: str) -> float:
        level = next((lv for lv in reversed(levels) if max(lv.sizes["y"], lv.sizes["x"]) >= size), levels[0])
        arr = np.asarray(level.transpose("y", "x", "c").data[..., :3])
        scalef = size / max(h0, w0)
        img = Image.fromarray(arr.astype(np.uint8)).resize(
            (max(1, round(w0 * scalef)), max(1, round(h0 * scalef))), Image.Resampling.LANCZOS
        )
        img.save(spatial / name)
        return scalef

    hires = _png(hires_size, "tissue_hires_image.png")
    lowres = _png(lowres_size, "tissue_lowres_image.png")
    # as Space Ranger writes it: the width of a theoretical 65 µm spot in full-res px (not the 55 µm spot)
    from .io._visium import SPACERANGER_SPOT_DIAMETER_FULLRES_UM as spot_um

    scalefactors = {
        "spot_diameter_fullres": spot_um / fullres_mpp,
        "tissue_hires_scalef": hires,
        "fiducial_diameter_fullres": 1.615 * spot_um / fullres_mpp,
        "tissue_lowres_scalef": lowres,
    }
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors, indent=4))
    logger.info("Wrote a Space Ranger-like folder %s (%d spots, %d genes)", path, table.n_obs, table.n_vars)
    return path
