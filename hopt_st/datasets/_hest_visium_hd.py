"""Write a :func:`~hopt_st.datasets.synthetic_visium_hd` sample as a Visium HD sample of HEST-1k, in HEST's layout.

Facts from github.com/mahmoodlab/HEST at commit afd42c3 (no code copied): HEST reads a Visium HD run's 16 µm
bins and pools them into 128 µm squares (``src/hest/readers.py:85-157``, ``pool_bins_visiumhd(...,
dst_bin_size_um=128, src_bin_size_um=16)`` at ``readers.py:148``); the pooled squares are the sample's
``st/<id>.h5ad`` (obs ``in_tissue``, ``pxl_col_in_fullres``/``pxl_row_in_fullres``, ``array_col``/``array_row``,
names ``<row:04d>x<col:04d>``, ``obsm["spatial"]``; empty squares dropped; ``readers.py:1132-1205``). There are
no bins below 128 µm, no transcripts and no segmentation in HEST-1k for these samples; ``assets/HEST_v1_1_0.csv``
lists them with ``st_technology`` "Visium HD" and ``spot_diameter`` = ``inter_spot_dist`` = 2. Here a square's
``pxl_*_in_fullres`` is its true centre (HEST's formula, ``readers.py:1190-1191``, puts it half a 16 µm bin
further right and down, as it starts from the first bin's centre rather than its edge).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from spatialdata import SpatialData

from .._atomic import check_overwrite
from .._constants import HEST_VISIUM_HD_SQUARE_UM, UNS_KEY
from ..io._hest import hest_paths
from ._hest_layout import hest_image_metadata, write_hest_files
from ._visium_hd import pool_bins

logger = logging.getLogger(__name__)

#: HEST's pseudo-spot of a Visium HD sample, µm (16 µm bins pooled; see hopt_st._constants)
HEST_HD_SQUARE_UM = int(HEST_VISIUM_HD_SQUARE_UM)


def write_hest_visium_hd(
    sample: SpatialData,
    root: str | Path,
    sample_id: str = "SYNHD000",
    *,
    compression: str = "zlib",
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a :func:`synthetic_visium_hd` sample as HEST-1k ships a Visium HD sample: the H&E
    (``wsis/<id>.tif``), its 16 µm bins pooled into 128 µm squares (``st/<id>.h5ad``, raw counts) and
    ``metadata/<id>.json``; read it with :func:`hopt_st.io.read_hest`.

    Parameters
    ----------
    sample
        From :func:`synthetic_visium_hd`.
    root
        The HEST-1k folder (created if needed).
    sample_id
        The sample's id.
    compression
        TIFF tile compression.
    overwrite
        Replace this sample's files when they exist.

    Returns
    -------
    dict
        Paths written: ``wsi``, ``st``, ``metadata``.
    """
    root = Path(root)
    paths = hest_paths(root, sample_id)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
        check_overwrite(p, overwrite, f"HEST file of sample {sample_id!r}")
    table = sample.tables["square_002um"]
    mpp = float(table.uns[UNS_KEY]["fullres_mpp"])
    # HEST's 16 µm -> 128 µm pooling nests in the 2 µm grid: one pooling of the 2 µm bins gives the same sums
    pooled, _ = pool_bins(table, HEST_HD_SQUARE_UM)
    X = sparse.csr_matrix(pooled.X, dtype=np.float32)
    r, c = pooled.obs["array_row"].to_numpy(), pooled.obs["array_col"].to_numpy()
    cx, cy = (c + 0.5) * HEST_HD_SQUARE_UM / mpp, (r + 0.5) * HEST_HD_SQUARE_UM / mpp
    nonempty = np.asarray(X.sum(1)).ravel() > 0
    obs = pd.DataFrame(
        {
            "in_tissue": True,
            "pxl_col_in_fullres": cx,
            "pxl_row_in_fullres": cy,
            "array_col": c,
            "array_row": r,
        },
        index=pd.Index([f"{a:04d}x{b:04d}" for a, b in zip(r, c)]),
    )
    spots = AnnData(X=X[nonempty], obs=obs[nonempty], var=pd.DataFrame(index=table.var_names.copy()))
    spots.obsm["spatial"] = np.column_stack([cx, cy])[nonempty]
    he = np.ascontiguousarray(np.asarray(sample.images["he"].transpose("y", "x", "c").data))
    meta = {
        "id": sample_id,
        "dataset_title": "hopt_st synthetic Visium HD sample",
        "st_technology": "Visium HD",
        **hest_image_metadata(mpp, he.shape),
        "spot_diameter": 2,
        "inter_spot_dist": 2,
        "spots_under_tissue": int(spots.n_obs),
        "nb_genes": int(spots.n_vars),
        "species": "Homo sapiens",
    }
    write_hest_files(paths, he, mpp, spots, meta, compression)
    logger.info("wrote HEST-1k Visium HD sample %s in %s: %d squares of 128 µm", sample_id, root, spots.n_obs)
    return paths
