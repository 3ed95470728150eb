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
import xarray as xr
from anndata import AnnData
from spatialdata import SpatialData, get_pyramid_levels

from .._constants import SPACERANGER_SPOT_DIAMETER_FULLRES_UM, UNS_KEY
from .._docs import inject_docs
from ..io._elements import get_spot_table, resolve_image_key, resolve_table_name

logger = logging.getLogger(__name__)

#: Space Ranger's fiducial diameter relative to its ``spot_diameter_fullres`` (as in real scalefactors files).
_FIDUCIAL_PER_SPOT = 1.615


def _write_counts_h5(table: AnnData, path: Path) -> None:
    """Raw counts as a 10x HDF5 feature-barcode matrix (CSC, features x barcodes)."""
    import h5py
    import scipy.sparse as sp

    x = sp.csr_matrix(table.X).T.tocsc()
    with h5py.File(path, "w") as f:
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


def _write_positions(table: AnnData, path: Path) -> None:
    """Headerless rows: barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres."""
    xy = np.asarray(table.obsm["spatial"], dtype=float)
    obs = table.obs
    rows = obs["array_row"].to_numpy() if "array_row" in obs else np.zeros(len(xy), int)
    cols = obs["array_col"].to_numpy() if "array_col" in obs else np.arange(len(xy))
    with open(path, "w") as fh:
        for bc, r, c, (px, py) in zip(table.obs_names, rows, cols, xy):
            fh.write(f"{bc},1,{int(r)},{int(c)},{int(round(py))},{int(round(px))}\n")


def _write_png(levels: list[xr.DataArray], size: int, path: Path) -> float:
    """The image downscaled to ``size`` px on its largest side; returns the scale factor from level 0.

    The coarsest pyramid level that is still at least ``size`` px is resized with PIL (Lanczos).
    """
    from PIL import Image

    h0, w0 = int(levels[0].sizes["y"]), int(levels[0].sizes["x"])
    level = next((lv for lv in reversed(levels) if max(lv.sizes["y"], lv.sizes["x"]) >= size), levels[0])
    arr = np.asarray(level.transpose("y", "x", "c").data[..., :3])
    scalef = size / max(h0, w0)
    img = Image.fromarray(arr.astype(np.uint8)).resize(
        (max(1, round(w0 * scalef)), max(1, round(h0 * scalef))), Image.Resampling.LANCZOS
    )
    img.save(path)
    return scalef


def _write_scalefactors(path: Path, fullres_mpp: float, hires: float, lowres: float) -> None:
    # as Space Ranger writes it: the width of a theoretical 65 µm spot in full-res px (not the 55 µm spot)
    spot_um = SPACERANGER_SPOT_DIAMETER_FULLRES_UM
    scalefactors = {
        "spot_diameter_fullres": spot_um / fullres_mpp,
        "tissue_hires_scalef": hires,
        "fiducial_diameter_fullres": _FIDUCIAL_PER_SPOT * spot_um / fullres_mpp,
        "tissue_lowres_scalef": lowres,
    }
    path.write_text(json.dumps(scalefactors, indent=4))


@inject_docs()
def write_spaceranger_outs(
    sdata: SpatialData,
    path: str | Path,
    *,
    table_name: str | None = None,
    image_key: str | None = None,
    hires_size: int = 2000,
    lowres_size: int = 600,
    scan: str | Path | None = None,
) -> Path:
    """Write ``sdata`` (spots in full-res px of its image level 0, raw counts) as a Space Ranger ``outs/`` folder.

    Files written under ``path`` (what :func:`hopt_st.io.read_visium` reads):

    ``filtered_feature_bc_matrix.h5``
        10x HDF5 matrix (``attrs``: ``filetype="matrix"``, ``version=2``): group ``matrix`` with
        ``barcodes`` (the table's ``obs_names``), CSC ``data`` (int32 counts) / ``indices`` / ``indptr``,
        ``shape`` = (genes, spots) and group ``features`` (``id`` = ``name`` = ``var_names``,
        ``feature_type`` = ``"Gene Expression"``, ``genome`` = ``"synthetic"``, ``_all_tag_keys``).
    ``spatial/tissue_positions_list.csv``
        Headerless rows ``barcode, in_tissue (1), array_row, array_col, pxl_row_in_fullres,
        pxl_col_in_fullres``: array coordinates from ``obs["array_row"/"array_col"]`` (0 / running index
        when absent), pixel coordinates from ``obsm["spatial"]`` rounded to integers.
    ``spatial/tissue_hires_image.png``, ``spatial/tissue_lowres_image.png``
        The image resized (Lanczos) to ``hires_size`` / ``lowres_size`` px on its largest side.
    ``spatial/scalefactors_json.json``
        ``tissue_hires_scalef`` / ``tissue_lowres_scalef`` (PNG px per full-res px),
        ``spot_diameter_fullres`` (a 65 µm spot in full-res px, as Space Ranger defines it) and
        ``fiducial_diameter_fullres`` (1.615 times that), from ``uns["hopt_st"]["fullres_mpp"]``
        (0.5 µm/px when absent).

    Parameters
    ----------
    sdata
        A sample as written by :func:`hopt_st.datasets.synthetic_visium` (Identity transforms, spot
        coordinates = image level-0 pixels).
    path
        The ``outs/`` folder to create (must not exist or be empty).
    table_name
        {table_name}
    image_key
        {image_key}
    hires_size
        Largest side of the hires PNG, px.
    lowres_size
        Largest side of the lowres PNG, px.
    scan
        Also write the full-resolution image there, as a tiled pyramidal TIFF (lossless): the scan given to
        Space Ranger, which a real ``outs/`` folder does not contain. Read it back with
        ``read_visium(path, fullres_image_file=scan)`` or ``sq.read.visium(path, source_image_path=scan)``.

    Returns
    -------
    Path
        ``path``.
    """
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"expected a SpatialData, got {type(sdata).__name__}.")
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{str(path)!r} exists and is not empty: choose a new folder for the outs/.")
    table_name = resolve_table_name(sdata, table_name)
    table, _ = get_spot_table(sdata, table_name)
    image = sdata.images[resolve_image_key(sdata, image_key)]
    levels = [image] if isinstance(image, xr.DataArray) else get_pyramid_levels(image)
    fullres_mpp = float(table.uns.get(UNS_KEY, {}).get("fullres_mpp", 0.5))
    spatial = path / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)

    _write_counts_h5(table, path / "filtered_feature_bc_matrix.h5")
    _write_positions(table, spatial / "tissue_positions_list.csv")
    hires = _write_png(levels, hires_size, spatial / "tissue_hires_image.png")
    lowres = _write_png(levels, lowres_size, spatial / "tissue_lowres_image.png")
    _write_scalefactors(spatial / "scalefactors_json.json", fullres_mpp, hires, lowres)
    if scan is not None:
        from ._tiff import write_pyramidal_tiff

        level0 = np.asarray(levels[0].transpose("y", "x", "c").data[..., :3]).astype(np.uint8)
        write_pyramidal_tiff(scan, np.ascontiguousarray(level0), mpp=fullres_mpp, compression="zlib")
    logger.info("Wrote a Space Ranger-like folder %s (%d spots, %d genes)", path, table.n_obs, table.n_vars)
    return path
