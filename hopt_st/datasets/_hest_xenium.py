"""Write the Xenium-like sample of :func:`~hopt_st.datasets.synthetic_visium_hd` (cells, transcripts, truth) as a
Xenium sample of HEST-1k, in HEST's own layout.

Facts taken from HEST (github.com/mahmoodlab/HEST at commit afd42c3; no code copied):

- The files of a HEST-1k sample ``<id>`` (``tutorials/1-Downloading-HEST-1k.ipynb`` lines 178-194, the list
  of folders; ``src/hest/HESTData.py:1158-1206``, ``_read_st``): ``wsis/<id>.tif`` (pyramidal TIFF),
  ``st/<id>.h5ad``, ``metadata/<id>.json``; for Xenium also ``transcripts/<id>_transcripts.parquet``
  ("individual transcripts aligned to H&E ... aligned coordinates in pixel are in columns ['he_x', 'he_y']")
  and ``xenium_seg/<id>_xenium_cell_seg.parquet`` / ``<id>_xenium_nucleus_seg.parquet`` ("xenium
  segmentation on DAPI and aligned to H&E").
- ``transcripts/<id>_transcripts.parquet`` is Xenium's ``transcripts.parquet`` (``x_location``/``y_location``
  in µm of the morphology frame, ``feature_name``, ``cell_id``, ...) with ``he_x``/``he_y`` (H&E pixels,
  through the inverse of the ``*imagealignment.csv`` affine, H&E px -> morphology px) and ``dapi_x``/``dapi_y``
  (``*_location / pixel_size``, morphology px) added (``src/hest/readers.py:826-866``,
  ``src/hest/utils.py:141-172``), saved as ``aligned_transcripts.parquet`` (``HESTData.py:841-842``) and
  copied to ``transcripts/<id>_transcripts.parquet`` (``utils.py:1134-1135``).
- The segmentations are GeoDataFrames of polygons in H&E pixels indexed by the Xenium ``cell_id``
  (``src/hest/io/seg_readers.py:68-137``, ``groupby_shape`` / ``XeniumParquetCellReader``), saved with
  ``GeoDataFrame.to_parquet`` as ``he_cell_seg.parquet`` / ``he_nucleus_seg.parquet`` (``HESTData.py:844-852``)
  and copied to ``xenium_seg/<id>_xenium_{cell,nucleus}_seg.parquet`` (``utils.py:1140-1141``).
- ``st/<id>.h5ad`` holds the transcripts pooled into 100 µm square pseudo-spots on the H&E pixel grid
  (``readers.py:956-968`` and ``pool_transcripts_xenium``, ``readers.py:1040-1130``: obs names
  ``<row:03d>x<col:03d>``, ``pxl_col_in_fullres``/``pxl_row_in_fullres`` = centres, empty squares dropped).
- ``metadata/<id>.json`` holds the fields of ``experiment.xenium`` (``pixel_size`` of the morphology image,
  ``readers.py:931-937``), ``pixel_size_um_estimated`` = ``pixel_size`` x the alignment's scale
  (``readers.py:810-823``), ``pixel_size_um_embedded``, ``spot_diameter`` = ``inter_spot_dist`` = 100
  (``readers.py:967-968``), ``st_technology`` "Xenium" (``assets/HEST_v1_1_0.csv``).

HEST-1k's Visium HD samples ship no bins below the spot: ``st/<id>.h5ad`` holds the 16 µm bins pooled into
128 µm squares (``readers.py:85-157``, ``pool_bins_visiumhd`` ``readers.py:1132``; ``assets/HEST_v1_1_0.csv``
lists them with ``spot_diameter`` = ``inter_spot_dist`` = 2), which :func:`hopt_st.io.read_hest` reads as
pseudo-spots; their sub-spot data come from Space Ranger (:func:`hopt_st.io.read_visium_hd`).
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

from .._atomic import atomic_path, check_overwrite, remove, temp_sibling
from .._constants import SQUARE_SPOT_SIDE_UM, UNS_KEY
from ..io._hest_xenium import hest_xenium_paths
from ._hest_layout import hest_image_metadata, write_hest_files
from ._xenium import XENIUM_PIXEL_UM, write_xenium_outs

logger = logging.getLogger(__name__)


def _seg_px(path: Path, ps: float, inv_alignment: np.ndarray):
    """Xenium boundaries (µm, morphology frame) as a GeoDataFrame of H&E-pixel polygons indexed by cell id."""
    import geopandas as gpd
    import shapely

    vertices = pd.read_parquet(path, columns=["cell_id", "vertex_x", "vertex_y"])
    xy = _to_he(vertices["vertex_x"].to_numpy(float), vertices["vertex_y"].to_numpy(float), ps, inv_alignment)
    ids = vertices["cell_id"].astype(str).to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    polys = [shapely.Polygon(p) for p in np.split(xy, starts[1:])]
    return gpd.GeoDataFrame(geometry=polys, index=pd.Index(ids[starts]))


def _to_he(x_um: np.ndarray, y_um: np.ndarray, ps: float, inv_alignment: np.ndarray) -> np.ndarray:
    """µm of the morphology frame -> morphology px (/ pixel_size) -> H&E px (inverse alignment affine)."""
    p = np.column_stack([x_um / ps, y_um / ps, np.ones(len(x_um))])
    return (p @ inv_alignment.T)[:, :2]


def _pseudo_spots(tx: pd.DataFrame, genes: pd.Index, mpp: float, side_um: float) -> AnnData:
    """Transcripts pooled into ``side_um`` squares of the H&E pixel grid (origin: the smallest he_x, he_y)."""
    step = side_um / mpp
    x0, y0 = float(tx["he_x"].min()), float(tx["he_y"].min())
    col = np.floor((tx["he_x"].to_numpy() - x0) / step).astype(int)
    row = np.floor((tx["he_y"].to_numpy() - y0) / step).astype(int)
    n_col = int(col.max()) + 1
    key = row * n_col + col
    uniq, inv = np.unique(key, return_inverse=True)
    g = genes.get_indexer(tx["feature_name"])
    X = sparse.csr_matrix((np.ones(len(tx), np.float32), (inv, g)), shape=(len(uniq), len(genes)))
    r, c = uniq // n_col, uniq % n_col
    cx, cy = x0 + (c + 0.5) * step, y0 + (r + 0.5) * step
    obs = pd.DataFrame(
        {"in_tissue": 1, "array_row": r, "array_col": c, "pxl_col_in_fullres": cx, "pxl_row_in_fullres": cy},
        index=pd.Index([f"{a:03d}x{b:03d}" for a, b in zip(r, c)]),
    )
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes.copy()))
    adata.obsm["spatial"] = np.column_stack([cx, cy])
    return adata


def write_hest_xenium(
    sample: SpatialData,
    root: str | Path,
    sample_id: str = "SYNXC000",
    *,
    pixel_size: float = XENIUM_PIXEL_UM,
    he_pad_px: int = 40,
    seed: int = 0,
    compression: str = "zlib",
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the cells of a :func:`synthetic_visium_hd` sample as a Xenium sample of HEST-1k, in HEST's layout.

    The sample is first written as a Xenium output folder (:func:`write_xenium_outs`, same ``seed``: the same
    cells, counts and transcripts, :func:`cell_truth` their expected ``log1p``), then processed as HEST does
    (see the module's docstring): the post-Xenium H&E becomes ``wsis/<id>.tif``, the transcripts get
    ``he_x``/``he_y`` through the inverse alignment, the cell and nucleus boundaries become H&E-pixel polygons.

    Parameters
    ----------
    sample
        From :func:`synthetic_visium_hd`.
    root
        The HEST-1k folder (created if needed; other samples in it are left alone).
    sample_id
        The sample's id (file names).
    pixel_size
        µm per morphology pixel of the Xenium run.
    he_pad_px
        White margin added on the left and top of the H&E, px (so H&E px and µm differ by a translation).
    seed
        Seed of the counts and transcript positions.
    compression
        TIFF tile compression (``"zlib"`` lossless, or ``"jpeg"``).
    overwrite
        Replace this sample's files when they exist.

    Returns
    -------
    dict
        The paths written: ``wsi``, ``st``, ``metadata``, ``transcripts``, ``cell_seg``, ``nucleus_seg``.
    """
    import tifffile

    root = Path(root)
    paths = hest_xenium_paths(root, sample_id)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
        check_overwrite(p, overwrite, f"HEST file of sample {sample_id!r}")
    staging = temp_sibling(root / sample_id, ".xenium")
    try:
        outs = write_xenium_outs(sample, staging, pixel_size=pixel_size, he_pad_px=he_pad_px, seed=seed)
        he = tifffile.imread(next(outs.glob("*_he_image.ome.tif")))
        alignment = pd.read_csv(next(outs.glob("*_he_imagealignment.csv")), header=None).to_numpy(float)
        inv = np.linalg.inv(alignment)
        he_mpp = pixel_size * float(np.sqrt(abs(np.linalg.det(alignment[:2, :2]))))
        tx = pd.read_parquet(outs / "transcripts.parquet")
        hexy = _to_he(tx["x_location"].to_numpy(float), tx["y_location"].to_numpy(float), pixel_size, inv)
        tx["he_x"], tx["he_y"] = hexy[:, 0], hexy[:, 1]
        tx["dapi_x"] = tx["x_location"].to_numpy(float) / pixel_size
        tx["dapi_y"] = tx["y_location"].to_numpy(float) / pixel_size
        genes = pd.Index(sample.tables["square_002um"].var_names)
        spots = _pseudo_spots(tx, genes, he_mpp, SQUARE_SPOT_SIDE_UM)
        spots.uns["sample_id"] = sample_id
        experiment = json.loads((outs / "experiment.xenium").read_text())
        meta = experiment | {
            "id": sample_id,
            "dataset_title": "hopt_st synthetic Xenium sample",
            "st_technology": "Xenium",
            **hest_image_metadata(he_mpp, he.shape),
            "spot_diameter": SQUARE_SPOT_SIDE_UM,
            "inter_spot_dist": SQUARE_SPOT_SIDE_UM,
            "spots_under_tissue": int(spots.n_obs),
            "cells_under_tissue": int(pd.read_parquet(outs / "cells.parquet").shape[0]),
            "nb_genes": int(len(genes)),
            "organ": "Synthetic",
            "species": "Homo sapiens",
            "hopt_st_seed": int(sample.attrs[UNS_KEY]["synthetic"]["seed"]),
        }
        write_hest_files(paths, he, he_mpp, spots, meta, compression)
        with atomic_path(paths["transcripts"], what="transcripts") as tmp:
            tx.to_parquet(tmp, index=False)
        for key, name in (("cell_seg", "cell_boundaries"), ("nucleus_seg", "nucleus_boundaries")):
            gdf = _seg_px(outs / f"{name}.parquet", pixel_size, inv)
            with atomic_path(paths[key], what="segmentation") as tmp:
                gdf.to_parquet(tmp)
    finally:
        remove(staging)
    logger.info("wrote HEST-1k Xenium sample %s in %s: %d transcripts", sample_id, root, len(tx))
    return paths
