"""Read one sample of a HEST-1k download (``wsis/``, ``st/``, ``metadata/``) into a SpatialData."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
from shapely.geometry import box
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import Identity

from .._constants import HEST_VISIUM_HD_SQUARE_UM, SQUARE_SPOT_SIDE_UM, UNS_KEY, VISIUM_SPOT_DIAMETER_UM
from .._errors import CorruptFileError
from ._coords import add_micrometers
from ._counts import check_spots, ensure_raw_counts, read_h5ad
from ._mpp import check_mpp
from ._tiff import read_tiff_image

logger = logging.getLogger(__name__)

_SQUARE_TECHS = ("xenium", "visium hd", "visium_hd", "visiumhd")


def _present_ids(root: Path) -> list[str]:
    ids = set()
    for sub, ext in (("st", ".h5ad"), ("wsis", ".tif"), ("metadata", ".json")):
        d = root / sub
        if d.is_dir():
            ids |= {p.name[: -len(ext)] for p in d.iterdir() if p.name.endswith(ext)}
    return sorted(ids)


def _spot_xy(adata: ad.AnnData, path: Path) -> np.ndarray:
    if "pxl_col_in_fullres" in adata.obs and "pxl_row_in_fullres" in adata.obs:
        xy = np.column_stack(
            [
                pd.to_numeric(adata.obs["pxl_col_in_fullres"], errors="coerce").to_numpy(float),
                pd.to_numeric(adata.obs["pxl_row_in_fullres"], errors="coerce").to_numpy(float),
            ]
        )
    elif "spatial" in adata.obsm:
        xy = np.asarray(adata.obsm["spatial"], dtype=float)[:, :2]
    else:
        raise ValueError(
            f"{str(path)!r} has no spot coordinates: expected obs['pxl_col_in_fullres'] and "
            "obs['pxl_row_in_fullres'] (or obsm['spatial'] = (x, y) full-resolution pixels)."
        )
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{str(path)!r}: {int(bad.sum())} of {adata.n_obs} spots have NaN/inf coordinates "
            f"(first barcodes: {adata.obs_names[np.flatnonzero(bad)[:5]].tolist()}). Drop them first, e.g. "
            "adata = adata[np.isfinite(adata.obs[['pxl_col_in_fullres', 'pxl_row_in_fullres']]).all(1)].copy()."
        )
    return xy


def _json_safe(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        if v is None:
            continue
        if isinstance(v, (str, bool, int, float)):
            if isinstance(v, float) and not np.isfinite(v):
                continue
            out[str(k)] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v):
            out[str(k)] = list(v)
        else:
            out[str(k)] = str(v)
    return out


def hest_paths(root: str | Path, sample_id: str) -> dict[str, Path]:
    """The files every sample ``sample_id`` of a HEST-1k folder ``root`` has: ``wsi`` (``wsis/<id>.tif``), ``st``
    (``st/<id>.h5ad``) and ``metadata`` (``metadata/<id>.json``)."""
    root = Path(root)
    return {
        "wsi": root / "wsis" / f"{sample_id}.tif",
        "st": root / "st" / f"{sample_id}.h5ad",
        "metadata": root / "metadata" / f"{sample_id}.json",
    }


def _sample_paths(root: Path, sample_id: str) -> dict[str, Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"HEST folder {str(root)!r} does not exist.")
    paths = hest_paths(root, sample_id)
    missing = [k for k, p in paths.items() if not p.is_file()]
    if len(missing) == len(paths):
        raise KeyError(
            f"sample {sample_id!r} is not in the HEST folder {str(root)!r}; samples present: {_present_ids(root)}. "
            "Download it (e.g. hest's datasets.load_dataset / huggingface_hub.snapshot_download with "
            f"allow_patterns=['*{sample_id}[_.]*'])."
        )
    if missing:
        raise FileNotFoundError(
            f"HEST sample {sample_id!r} is incomplete: missing {[str(paths[k]) for k in missing]}. "
            "A HEST-1k sample needs wsis/{id}.tif, st/{id}.h5ad and metadata/{id}.json: download the missing "
            "files again."
        )
    return paths


def _read_metadata(path: Path) -> dict:
    try:
        meta = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFileError(
            path,
            f"metadata {str(path)!r} is not valid JSON ({e}): it is truncated or corrupt, download it again.",
        ) from None
    if not isinstance(meta, dict):
        raise CorruptFileError(path, f"metadata {str(path)!r} is not a JSON object: download it again.")
    return meta


def _metadata_mpp(meta: dict, path: Path) -> float:
    """µm/px of the WSI: ``pixel_size_um_estimated``, else (null/NaN/absent) ``pixel_size_um_embedded``."""

    def usable(v):
        return v is not None and not (isinstance(v, float) and not np.isfinite(v))

    key = next(
        (k for k in ("pixel_size_um_estimated", "pixel_size_um_embedded") if usable(meta.get(k))), None
    )
    if key is None:
        raise ValueError(
            f"metadata {str(path)!r} has no 'pixel_size_um_estimated' (nor 'pixel_size_um_embedded'): the WSI's "
            "µm per pixel is unknown. Pass image_mpp=<µm per full-resolution pixel> to read_hest (e.g. 0.25 for "
            "40x, 0.5 for 20x)."
        )
    return check_mpp(meta[key], f"{path} {key}")


def _spot_diameter_um(meta: dict, path: Path) -> float:
    """``spot_diameter`` of the metadata (µm), 55 µm when absent; a non-positive value is refused."""
    if meta.get("spot_diameter") is None:
        return VISIUM_SPOT_DIAMETER_UM
    try:
        d = float(meta["spot_diameter"])
    except (TypeError, ValueError):
        d = float("nan")
    if not (np.isfinite(d) and d > 0):
        raise ValueError(
            f"metadata {str(path)!r} has spot_diameter = {meta['spot_diameter']!r}: it must be a positive number "
            "of µm (55 for Visium). Correct it (or remove it to use 55 µm)."
        )
    return d


def _spot_shapes(xy: np.ndarray, meta: dict, mpp: float, diameter_um: float = VISIUM_SPOT_DIAMETER_UM):
    """55 µm circles (Visium/ST; ``spot_diameter`` of the metadata when given), or squares: 128 µm for Visium HD
    (HEST pools its 16 µm bins so), 100 µm for Xenium."""
    tech = str(meta.get("st_technology", "Visium"))
    n = len(xy)
    if any(t in tech.lower() for t in _SQUARE_TECHS):
        side = HEST_VISIUM_HD_SQUARE_UM if "hd" in tech.lower() else SQUARE_SPOT_SIDE_UM
        half = side / 2 / mpp
        geoms = [box(x - half, y - half, x + half, y + half) for x, y in xy]
        return ShapesModel.parse(
            gpd.GeoDataFrame(geometry=geoms, index=pd.Index(np.arange(n))),
            transformations={"global": Identity()},
        )
    return ShapesModel.parse(
        xy.copy(),
        geometry=0,
        radius=np.full(n, diameter_um / 2 / mpp),
        index=np.arange(n),
        transformations={"global": Identity()},
    )


def read_hest(root: str | Path, sample_id: str, image_mpp: float | None = None) -> SpatialData:
    """Read one HEST-1k sample lazily.

    Parameters
    ----------
    root
        The HEST-1k download folder holding ``wsis/{id}.tif``, ``st/{id}.h5ad`` and ``metadata/{id}.json``.
    sample_id
        Sample id, e.g. ``"TENX95"``.
    image_mpp
        µm per pixel of the WSI's full resolution; overrides ``pixel_size_um_estimated`` of the metadata.

    Returns
    -------
    SpatialData
        Image ``"he"`` (multiscale DataTree when the TIFF is pyramidal; pixels are never read here),
        shapes ``"spots"`` (55 µm circles for Visium/ST, 100 µm squares for Xenium / Visium HD
        pseudo-spots), table ``"table"`` of raw counts with ``obsm["spatial"]`` and
        ``uns["hopt_st"] = {"image_mpp": {"he": mpp}, "fullres_mpp": mpp, "sample_id", "metadata"}``; elements in
        ``"global"`` (full-resolution pixels) and ``"micrometers"``.
    """
    root = Path(root)
    sample_id = str(sample_id)
    paths = _sample_paths(root, sample_id)
    meta = _read_metadata(paths["metadata"])
    if image_mpp is not None:
        mpp = check_mpp(image_mpp, "image_mpp")
    else:
        mpp = _metadata_mpp(meta, paths["metadata"])

    diameter_um = _spot_diameter_um(meta, paths["metadata"])
    adata = read_h5ad(paths["st"])
    check_spots(adata, paths["st"])
    ensure_raw_counts(adata, paths["st"])
    xy = _spot_xy(adata, paths["st"])
    image = read_tiff_image(paths["wsi"])
    shapes = _spot_shapes(xy, meta, mpp, diameter_um)

    n = adata.n_obs
    adata.obs["region"] = pd.Categorical(["spots"] * n)
    adata.obs["spot_id"] = np.arange(n)
    adata.obsm["spatial"] = xy.copy()
    adata.uns.pop("spatialdata_attrs", None)
    store = dict(adata.uns.get(UNS_KEY, {}))
    store.update(
        {"image_mpp": {"he": mpp}, "fullres_mpp": mpp, "sample_id": sample_id, "metadata": _json_safe(meta)}
    )
    adata.uns[UNS_KEY] = store
    table = TableModel.parse(adata, region="spots", region_key="region", instance_key="spot_id")
    logger.info(
        "read_hest %s: %d spots, %s, %.4g µm/px", sample_id, n, meta.get("st_technology", "Visium"), mpp
    )
    sdata = SpatialData(images={"he": image}, shapes={"spots": shapes}, tables={"table": table})
    add_micrometers(sdata, "spots", mpp)
    return sdata
