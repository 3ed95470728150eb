"""A Xenium-like sample with truth at cells: the cells of a :func:`synthetic_visium_hd` sample, segmented,
with their transcripts, written in the Xenium Onboard Analysis layout with the post-Xenium H&E and its
alignment.

Files written (what ``spatialdata_io.xenium`` reads; checked against spatialdata-io 0.7.1,
``spatialdata_io/readers/xenium.py`` and ``_constants/_constants.py`` ``XeniumKeys``), for an XOA 1.0
output (before ``cells.zarr.zip`` carried cell ids): ``experiment.xenium`` (``analysis_sw_version``,
``pixel_size``), ``cells.zarr.zip`` (an empty zarr group), ``cell_feature_matrix.h5`` (10x HDF5),
``cells.parquet`` (``cell_id, x_centroid, y_centroid, transcript_counts, cell_area, nucleus_area``, µm),
``cell_boundaries.parquet`` / ``nucleus_boundaries.parquet`` (``cell_id, vertex_x, vertex_y``, µm, rows
of a polygon contiguous), ``transcripts.parquet`` (``transcript_id, cell_id, overlaps_nucleus,
feature_name, x_location, y_location, z_location, qv``), ``morphology_mip.ome.tif`` and
``morphology_focus.ome.tif`` (DAPI-like, at ``pixel_size``), and the post-Xenium H&E
``<id>_he_image.ome.tif`` with ``<id>_he_imagealignment.csv``: the 3 x 3 affine from H&E pixels to
morphology pixels, as Xenium Explorer exports it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from spatialdata import SpatialData

from .._atomic import atomic_dir, check_overwrite
from .._constants import UNS_KEY
from ._synthetic import expected_counts

logger = logging.getLogger(__name__)

#: Xenium's morphology pixel, µm (10x: 0.2125 µm)
XENIUM_PIXEL_UM = 0.2125
#: transcripts per µm² of a cell (library size = area x density)
_DENSITY = 0.5


def xenium_cells(sample: SpatialData) -> pd.DataFrame:
    """The cells of a :func:`synthetic_visium_hd` sample: id, state, Voronoi polygon (µm), nucleus disc, area,
    centroid (deterministic, so the truth can be recomputed from the sample)."""
    import shapely

    syn = sample.attrs[UNS_KEY]["synthetic"]
    cells = sample.attrs[UNS_KEY]["synthetic_cells"]
    xy, state = np.asarray(cells["xy_um"]), np.asarray(cells["state"])
    frame = shapely.box(0, 0, syn["width_um"], syn["height_um"])
    pts = shapely.points(xy)
    vor = shapely.get_parts(shapely.voronoi_polygons(shapely.multipoints(xy), extend_to=frame))
    # match each Voronoi polygon to its seed
    owner = np.array([int(np.flatnonzero(shapely.contains(v, pts))[0]) for v in vor])
    poly = np.empty(len(xy), dtype=object)
    poly[owner] = shapely.intersection(vor, frame)
    keep = np.array([p is not None and not p.is_empty and p.geom_type == "Polygon" for p in poly])
    t2 = sample.tables["square_002um"]
    from ._synthetic import _tissue_model, look_arrays

    radius = look_arrays(_tissue_model(syn["n_states"], t2.n_vars, None, syn["model_seed"]))["radius"]
    nuc = np.empty(len(xy), dtype=object)
    for i in np.flatnonzero(keep):
        nuc[i] = shapely.intersection(shapely.Point(*xy[i]).buffer(radius[state[i]], 8), poly[i])
        keep[i] = nuc[i].geom_type == "Polygon" and not nuc[i].is_empty
    idx = np.flatnonzero(keep)
    polys, nuclei = list(poly[idx]), list(nuc[idx])
    area = shapely.area(np.array(polys, dtype=object))
    c = shapely.centroid(np.array(polys, dtype=object))
    return pd.DataFrame(
        {
            "cell_id": [f"cell{i:06d}" for i in idx],
            "state": state[idx],
            "polygon": polys,
            "nucleus": nuclei,
            "cell_area": area,
            "nucleus_area": shapely.area(np.array(nuclei, dtype=object)),
            "x_centroid": shapely.get_x(c),
            "y_centroid": shapely.get_y(c),
        }
    ).set_index("cell_id", drop=False)


def _model(sample: SpatialData) -> dict:
    t2 = sample.tables["square_002um"]
    return {
        "log_base": t2.var["truth_log_base"].to_numpy(),
        "loadings": np.asarray(t2.varm["truth_loadings"], float),
    }


def cell_truth(sample: SpatialData) -> pd.DataFrame:
    """Noise-free expected ``log1p`` counts per gene of every cell of :func:`xenium_cells` (its library size
    is its area times the transcript density)."""
    cells = xenium_cells(sample)
    n_states = sample.attrs[UNS_KEY]["synthetic"]["n_states"]
    onehot = np.eye(n_states)[cells["state"].to_numpy()]
    mu = expected_counts(_model(sample), onehot, cells["cell_area"].to_numpy() * _DENSITY)
    return pd.DataFrame(np.log1p(mu), index=cells.index, columns=sample.tables["square_002um"].var_names)


def _boundaries(geoms, ids) -> pd.DataFrame:
    rows = []
    for cid, g in zip(ids, geoms):
        x, y = np.asarray(g.exterior.coords.xy)
        rows.append(
            pd.DataFrame({"cell_id": cid, "vertex_x": x.astype(np.float32), "vertex_y": y.astype(np.float32)})
        )
    return pd.concat(rows, ignore_index=True)


def _ome_tif(path: Path, array: np.ndarray, rgb: bool) -> None:
    import tifffile

    tifffile.imwrite(path, array, ome=True, photometric="rgb" if rgb else "minisblack")


def write_xenium_outs(
    sample: SpatialData,
    path: str | Path,
    *,
    pixel_size: float = XENIUM_PIXEL_UM,
    he_pad_px: int = 40,
    seed: int = 0,
    name: str = "sample",
    overwrite: bool = False,
) -> Path:
    """Write the cells of a :func:`synthetic_visium_hd` sample as a Xenium output folder, with its H&E as the
    post-Xenium image (padded by ``he_pad_px`` on the left and top, so the alignment has a translation).

    Counts per cell are Poisson draws from the cell's state at library size area x 0.5 transcripts/µm²
    (:func:`cell_truth` gives their expected ``log1p``); each transcript lies at a uniform position inside its
    cell.

    Parameters
    ----------
    sample
        From :func:`synthetic_visium_hd`.
    path
        The output folder to create (its parent must exist).
    pixel_size
        µm per morphology pixel (``experiment.xenium``).
    he_pad_px
        White margin added to the H&E, px.
    seed
        Seed of the counts and transcript positions.
    name
        Prefix of the H&E and alignment files.
    overwrite
        Replace an existing ``path`` (only once the new folder is complete); otherwise it is refused.

    Returns
    -------
    Path
        ``path``.
    """
    import shapely
    import zarr

    from ._spaceranger import _write_counts_h5

    path = check_overwrite(
        path, overwrite, "Xenium output folder"
    )  # before any work; atomic_dir replaces it whole
    rng = np.random.default_rng(seed)
    cells = xenium_cells(sample)
    n_states = sample.attrs[UNS_KEY]["synthetic"]["n_states"]
    genes = sample.tables["square_002um"].var_names
    mu = expected_counts(
        _model(sample), np.eye(n_states)[cells["state"].to_numpy()], cells["cell_area"] * _DENSITY
    )
    counts = rng.poisson(mu)
    # transcripts: uniform inside each cell (rejection sampling in its bounding box)
    tx = []
    for i, (cid, poly, nuc) in enumerate(zip(cells.index, cells["polygon"], cells["nucleus"])):
        n = int(counts[i].sum())
        if n == 0:
            continue
        x0, y0, x1, y1 = poly.bounds
        pts = np.empty((0, 2))
        while len(pts) < n:
            cand = rng.uniform([x0, y0], [x1, y1], (2 * n + 8, 2))
            pts = np.vstack([pts, cand[shapely.contains_xy(poly, cand[:, 0], cand[:, 1])]])
        pts = pts[:n]
        tx.append(
            pd.DataFrame(
                {
                    "cell_id": cid,
                    "overlaps_nucleus": shapely.contains_xy(nuc, pts[:, 0], pts[:, 1]).astype(np.uint8),
                    "feature_name": np.repeat(np.asarray(genes), counts[i]),
                    "x_location": pts[:, 0].astype(np.float32),
                    "y_location": pts[:, 1].astype(np.float32),
                }
            )
        )
    tx = pd.concat(tx, ignore_index=True)
    tx.insert(0, "transcript_id", np.arange(len(tx), dtype=np.uint64))
    tx["z_location"] = np.float32(5.0)
    tx["qv"] = np.float32(40.0)
    table = AnnData(X=sparse.csr_matrix(counts.astype(np.float32)), var=pd.DataFrame(index=genes.copy()))
    table.obs_names = cells.index.copy()

    he = np.asarray(sample.images["he"].transpose("y", "x", "c").data)
    he_mpp = float(sample.tables["square_002um"].uns[UNS_KEY]["fullres_mpp"])
    he = np.pad(he, ((he_pad_px, 0), (he_pad_px, 0), (0, 0)), constant_values=255)
    s = he_mpp / pixel_size
    alignment = np.array([[s, 0, -he_pad_px * s], [0, s, -he_pad_px * s], [0, 0, 1]])
    syn = sample.attrs[UNS_KEY]["synthetic"]
    h, w = int(syn["height_um"] / pixel_size), int(syn["width_um"] / pixel_size)
    dapi = np.zeros((1, h, w), dtype=np.uint16)
    yy, xx = (np.arange(h) + 0.5) * pixel_size, (np.arange(w) + 0.5) * pixel_size
    for nuc in cells["nucleus"]:
        x0, y0, x1, y1 = nuc.bounds
        r = slice(int(y0 / pixel_size), int(np.ceil(y1 / pixel_size)))
        c = slice(int(x0 / pixel_size), int(np.ceil(x1 / pixel_size)))
        gx, gy = np.meshgrid(xx[c], yy[r])
        dapi[0, r, c][shapely.contains_xy(nuc, gx, gy)] = 2000
    with atomic_dir(path) as tmp:
        tmp.mkdir()
        (tmp / "experiment.xenium").write_text(
            json.dumps({"analysis_sw_version": "xenium-1.0.2", "pixel_size": pixel_size, "run_name": name})
        )
        with zarr.storage.ZipStore(tmp / "cells.zarr.zip", mode="w") as store:
            zarr.open_group(store, mode="w")
        _write_counts_h5(table, tmp / "cell_feature_matrix.h5")
        meta = cells[["cell_id", "x_centroid", "y_centroid"]].copy()
        meta["transcript_counts"] = counts.sum(1).astype(np.uint32)
        meta["cell_area"] = cells["cell_area"].to_numpy()
        meta["nucleus_area"] = cells["nucleus_area"].to_numpy()
        meta.reset_index(drop=True).to_parquet(tmp / "cells.parquet", index=False)
        _boundaries(cells["polygon"], cells.index).to_parquet(tmp / "cell_boundaries.parquet", index=False)
        _boundaries(cells["nucleus"], cells.index).to_parquet(tmp / "nucleus_boundaries.parquet", index=False)
        tx.to_parquet(tmp / "transcripts.parquet", index=False)
        _ome_tif(tmp / "morphology_mip.ome.tif", dapi, rgb=False)
        _ome_tif(tmp / "morphology_focus.ome.tif", dapi, rgb=False)
        _ome_tif(tmp / f"{name}_he_image.ome.tif", he, rgb=True)
        pd.DataFrame(alignment).to_csv(tmp / f"{name}_he_imagealignment.csv", header=False, index=False)
    logger.info("wrote a Xenium folder %s: %d cells, %d transcripts", path, len(cells), len(tx))
    return path
