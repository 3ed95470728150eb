"""Read a Xenium sample of HEST-1k in HEST's own layout: the H&E pyramid, the cell (and nucleus) polygons aligned
to it, and a table of counts per cell pooled from the aligned transcripts by their position in µm.

Layout (facts from github.com/mahmoodlab/HEST at commit afd42c3, with file:line in
:mod:`hopt_st.datasets._hest_xenium`): ``wsis/<id>.tif``, ``metadata/<id>.json`` (``pixel_size_um_estimated``),
``transcripts/<id>_transcripts.parquet`` (``feature_name``; ``he_x``/``he_y`` in H&E pixels; Xenium's
``x_location``/``y_location`` in µm of the morphology frame), ``xenium_seg/<id>_xenium_cell_seg.parquet`` and
``<id>_xenium_nucleus_seg.parquet`` (GeoParquet polygons in H&E pixels, indexed by the Xenium ``cell_id``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import PointsModel, ShapesModel, TableModel
from spatialdata.transformations import Identity

from .._constants import UNS_KEY
from ._coords import add_micrometers
from ._hest import _json_safe, _present_ids, _read_metadata, hest_paths
from ._mpp import check_mpp
from ._tiff import read_tiff_image

logger = logging.getLogger(__name__)

#: relative disagreement tolerated between the metadata's µm/px and the transcripts' own µm
_MPP_RTOL = 0.02
#: names of Xenium's control probes and codewords, left out of the counts by default (NegControlProbe_,
#: NegControlCodeword_, UnassignedCodeword_: the feature types Giotto's createGiottoXeniumObject splits off,
#: giottosuite.com/reference/createGiottoXeniumObject.html; BLANK_ and DeprecatedCodeword_: their names in
#: older / newer Xenium panels)
CONTROL_PREFIXES = (
    "NegControlProbe_",
    "NegControlCodeword_",
    "UnassignedCodeword_",
    "DeprecatedCodeword_",
    "BLANK_",
)
_DOWNLOAD = (
    "download it from the HEST-1k dataset (huggingface_hub.snapshot_download(repo_id='MahmoodLab/hest', "
    "repo_type='dataset', allow_patterns=['*{id}[_.]*']))"
)


def hest_xenium_paths(root: str | Path, sample_id: str) -> dict[str, Path]:
    """The files of Xenium sample ``sample_id`` in a HEST-1k folder ``root`` (see the module's docstring)."""
    root = Path(root)
    return hest_paths(root, sample_id) | {
        "transcripts": root / "transcripts" / f"{sample_id}_transcripts.parquet",
        "cell_seg": root / "xenium_seg" / f"{sample_id}_xenium_cell_seg.parquet",
        "nucleus_seg": root / "xenium_seg" / f"{sample_id}_xenium_nucleus_seg.parquet",
    }


def _metadata_mpp(meta: dict, path: Path, measured: float | None) -> float:
    for key in ("pixel_size_um_estimated", "pixel_size_um_embedded"):
        v = meta.get(key)
        if v is not None and not (isinstance(v, float) and not np.isfinite(v)):
            return check_mpp(v, f"{path} {key}")
    raise ValueError(
        f"metadata {str(path)!r} has no 'pixel_size_um_estimated' (nor 'pixel_size_um_embedded'): the WSI's µm "
        "per pixel is unknown. Pass image_mpp=<µm per full-resolution pixel> to read_hest_xenium ("
        + (
            f"the transcripts' own µm give {measured:.6g}"
            if measured is not None
            else "e.g. 0.2737 for HEST's 40x Xenium slides"
        )
        + ")."
    )


def _transcripts_um_per_px(tx: pd.DataFrame) -> float | None:
    """µm per H&E pixel measured on the transcripts themselves: the scale of the affine fitted from
    (``he_x``, ``he_y``) to Xenium's (``x_location``, ``y_location``); None without those columns."""
    if not {"x_location", "y_location"} <= set(tx.columns) or len(tx) < 3:
        return None
    sub = tx.iloc[np.linspace(0, len(tx) - 1, min(len(tx), 20000)).astype(int)]
    A = np.column_stack([sub["he_x"].to_numpy(float), sub["he_y"].to_numpy(float), np.ones(len(sub))])
    B = sub[["x_location", "y_location"]].to_numpy(float)
    coef, *_ = np.linalg.lstsq(A, B, rcond=None)
    return float(np.sqrt(abs(np.linalg.det(coef[:2, :2]))))


def _pool_by_position(x_um, y_um, genes_idx, n_genes, polys_um) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Counts per polygon: each transcript to the polygon that holds its µm position (first one on a shared
    edge); returns the (cells x genes) counts and, per transcript, its polygon's row (-1: outside every cell)."""
    import shapely

    tree = shapely.STRtree(polys_um)
    pt_idx, poly_idx = tree.query(shapely.points(x_um, y_um), predicate="within")
    owner = np.full(len(x_um), -1, dtype=np.int64)
    first = np.unique(pt_idx, return_index=True)[1]
    owner[pt_idx[first]] = poly_idx[first]
    ok = owner >= 0
    X = sparse.csr_matrix(
        (np.ones(int(ok.sum()), np.float32), (owner[ok], genes_idx[ok])), shape=(len(polys_um), n_genes)
    )
    return X, owner


def read_hest_xenium(
    root: str | Path,
    sample_id: str,
    image_mpp: float | None = None,
    *,
    nuclei: bool = True,
    transcripts: bool = True,
    min_qv: float | None = 20.0,
    controls: bool = False,
) -> SpatialData:
    """Read a Xenium sample of HEST-1k (HEST's layout) with cells as polygons and their counts.

    Counts are pooled from the aligned transcripts (quality ``min_qv`` and up, control probes left out) by
    physical position: a transcript counts for the cell whose
    polygon holds it, both in µm (H&E pixels x the WSI's µm/px). When the transcripts carry Xenium's own µm
    (``x_location``, ``y_location``), the µm/px is checked against them (the scale of the affine from
    ``he_x``/``he_y`` to them): a disagreement over 2 % is refused rather than pooled at a wrong scale.

    Parameters
    ----------
    root
        The HEST-1k folder (``wsis/``, ``metadata/``, ``transcripts/``, ``xenium_seg/``).
    sample_id
        The sample, e.g. ``"TENX95"``.
    image_mpp
        µm per pixel of the WSI's full resolution; overrides ``pixel_size_um_estimated`` of the metadata.
    nuclei
        Also read ``xenium_seg/<id>_xenium_nucleus_seg.parquet`` (when present) as ``"nucleus_boundaries"``.
    min_qv
        Count only transcripts whose ``qv`` (Phred-scaled quality) is at least this (when the column is there);
        20 is the threshold Xenium's own cell x gene matrix uses (Seurat's ``ReadXenium`` documentation,
        ``mols.qv.threshold``). ``None``: all.
    controls
        Also count the control probes and codewords (:data:`CONTROL_PREFIXES`) as genes.
    transcripts
        Keep the (counted) transcripts as points ``"transcripts"`` (H&E pixels; ``feature_name``, ``cell``: the cell
        holding each one, ``""`` outside every cell).

    Returns
    -------
    SpatialData
        In the form of :func:`hopt_st.io.read_xenium`: image ``"he"``, shapes ``"cell_boundaries"`` (and
        ``"nucleus_boundaries"``), points ``"transcripts"``, table ``"table"`` (raw counts per cell, ``obs``
        ``cell_id``, ``region``, ``transcript_counts``, ``cell_area`` in µm²; ``obsm["spatial"]`` centroids in
        H&E px) annotating ``"cell_boundaries"``; every element in ``"global"`` (H&E full-resolution pixels) and
        ``"micrometers"``; ``table.uns["hopt_st"]`` holds ``image_mpp`` (``{"he": mpp}``), ``fullres_mpp``,
        ``sample_id``, ``metadata`` (HEST's, with ``transcripts_outside_cells``, ``transcripts_below_min_qv``,
        ``transcripts_not_counted`` (low quality, controls, outside cells) and, when measurable,
        ``transcripts_um_per_px``).
    """
    import geopandas as gpd
    import shapely

    root, sample_id = Path(root), str(sample_id)
    if not root.is_dir():
        raise FileNotFoundError(f"HEST folder {str(root)!r} does not exist.")
    paths = hest_xenium_paths(root, sample_id)
    if not paths["metadata"].is_file() and not paths["wsi"].is_file():
        raise KeyError(
            f"sample {sample_id!r} is not in the HEST folder {str(root)!r}; samples present: {_present_ids(root)}."
        )
    fix = _DOWNLOAD.format(id=sample_id)
    for key, what in (
        ("metadata", "metadata"),
        ("wsi", "H&E WSI"),
        ("transcripts", "aligned transcripts"),
        ("cell_seg", "Xenium cell segmentation"),
    ):
        if not paths[key].is_file():
            raise FileNotFoundError(
                f"HEST Xenium sample {sample_id!r}: the {what} file {str(paths[key])!r} is missing; {fix}."
            )
    meta = _read_metadata(paths["metadata"])
    tech = str(meta.get("st_technology", ""))
    if "xenium" not in tech.lower():
        raise ValueError(
            f"HEST sample {sample_id!r} is {tech or 'of unknown technology'!s} (metadata {str(paths['metadata'])!r}),"
            " not Xenium: read it with hs.io.read_hest."
        )
    tx = pd.read_parquet(paths["transcripts"])
    missing = [c for c in ("feature_name", "he_x", "he_y") if c not in tx.columns]
    if missing:
        raise ValueError(
            f"transcripts {str(paths['transcripts'])!r} lack the columns {missing} (HEST's aligned transcripts have "
            f"feature_name, he_x, he_y); {fix}."
        )
    n_read = len(tx)
    keep = np.ones(n_read, dtype=bool)
    if min_qv is not None and "qv" in tx.columns:
        keep &= tx["qv"].to_numpy(float) >= float(min_qv)
    n_low_qv = int((~keep).sum())
    if not controls:
        raw = tx["feature_name"]
        raw = raw.str.decode("utf-8") if n_read and isinstance(raw.iloc[0], bytes) else raw.astype(str)
        is_control = raw.str.startswith(CONTROL_PREFIXES).to_numpy()
        keep &= ~is_control
    tx = tx[keep] if not keep.all() else tx
    measured = _transcripts_um_per_px(tx)
    if image_mpp is not None:
        mpp = check_mpp(image_mpp, "image_mpp")
    else:
        mpp = _metadata_mpp(meta, paths["metadata"], measured)
    if measured is not None and abs(measured - mpp) > _MPP_RTOL * mpp:
        raise ValueError(
            f"HEST Xenium sample {sample_id!r}: the WSI's µm/px {mpp:.5g} (image_mpp or metadata "
            f"{str(paths['metadata'])!r}) disagrees with the transcripts' own µm (x_location vs he_x: "
            f"{measured:.5g} µm/px). Pass image_mpp={measured:.6g} if the transcripts are right."
        )
    names = tx["feature_name"]
    if len(names) and isinstance(names.iloc[0], bytes):
        names = names.str.decode("utf-8")
    names = names.astype(str).to_numpy()
    genes, gidx = np.unique(names, return_inverse=True)

    cells = gpd.read_parquet(paths["cell_seg"])
    ids = cells["cell_id"].astype(str).to_numpy() if "cell_id" in cells.columns else cells.index.astype(str)
    cells = gpd.GeoDataFrame(geometry=cells.geometry.to_numpy(), index=pd.Index(np.asarray(ids), name=None))
    if not cells.index.is_unique:
        raise ValueError(f"{str(paths['cell_seg'])!r} has repeated cell ids: download it again.")
    polys_um = shapely.transform(cells.geometry.to_numpy(), lambda c: c * mpp)
    x_um, y_um = tx["he_x"].to_numpy(float) * mpp, tx["he_y"].to_numpy(float) * mpp
    X, owner = _pool_by_position(x_um, y_um, gidx.ravel(), len(genes), polys_um)
    centroids = shapely.centroid(cells.geometry.to_numpy())
    obs = pd.DataFrame(
        {
            "cell_id": cells.index.to_numpy(),
            "region": pd.Categorical(["cell_boundaries"] * len(cells)),
            "transcript_counts": np.asarray(X.sum(1)).ravel().astype(np.int64),
            "cell_area": shapely.area(polys_um),
        },
        index=pd.Index(cells.index.to_numpy()),
    )
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.obsm["spatial"] = np.column_stack([shapely.get_x(centroids), shapely.get_y(centroids)])
    outside = int((owner < 0).sum())
    info = _json_safe(meta) | {
        "transcripts_outside_cells": outside,
        "transcripts_below_min_qv": n_low_qv,
        "transcripts_not_counted": n_read - len(tx) + outside,
        "path": str(paths["transcripts"]),
    }
    if measured is not None:
        info["transcripts_um_per_px"] = measured
    adata.uns[UNS_KEY] = {
        "image_mpp": {"he": mpp},
        "fullres_mpp": mpp,
        "sample_id": sample_id,
        "metadata": info,
    }
    table = TableModel.parse(adata, region="cell_boundaries", region_key="region", instance_key="cell_id")

    shapes = {"cell_boundaries": ShapesModel.parse(cells, transformations={"global": Identity()})}
    if nuclei and paths["nucleus_seg"].is_file():
        nuc = gpd.read_parquet(paths["nucleus_seg"])
        nid = nuc["cell_id"].astype(str).to_numpy() if "cell_id" in nuc.columns else nuc.index.astype(str)
        nuc = gpd.GeoDataFrame(geometry=nuc.geometry.to_numpy(), index=pd.Index(np.asarray(nid)))
        shapes["nucleus_boundaries"] = ShapesModel.parse(nuc, transformations={"global": Identity()})
    points = {}
    if transcripts:
        ids_arr = cells.index.to_numpy()
        df = pd.DataFrame(
            {
                "x": tx["he_x"].to_numpy(float),
                "y": tx["he_y"].to_numpy(float),
                "feature_name": pd.Categorical(names),
                "cell": np.where(owner >= 0, ids_arr[np.maximum(owner, 0)], ""),
            }
        )
        points["transcripts"] = PointsModel.parse(
            df, feature_key="feature_name", transformations={"global": Identity()}
        )
    sdata = SpatialData(
        images={"he": read_tiff_image(paths["wsi"])}, shapes=shapes, points=points, tables={"table": table}
    )
    add_micrometers(sdata, "cell_boundaries", mpp)
    logger.info(
        "read_hest_xenium %s: %d cells, %d genes, %d of %d transcripts outside cells, %.4g µm/px",
        sample_id,
        len(cells),
        len(genes),
        outside,
        len(tx),
        mpp,
    )
    return sdata
