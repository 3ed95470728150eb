"""Write synthetic samples in the on-disk layouts of HEST-1k and of the HEST-Benchmark.

All samples share one tissue model (``model_seed``), so expression is the same known function of the
image in every sample and a benchmark on the ``"bench"`` layout has a clearly positive answer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from anndata import AnnData
from spatialdata import get_pyramid_levels

from .._atomic import atomic_path
from .._constants import (
    PATCH_SIZE,
    SQUARE_SPOT_SIDE_UM,
    TARGET_MPP,
    VISIUM_SPOT_DIAMETER_UM,
    VISIUM_SPOT_DISTANCE_UM,
)
from .._patchset import ArrayPatches, hest_topleft, write_patches_h5
from ..io._hest import hest_paths
from ._synthetic import synthetic_visium
from ._tiff import write_pyramidal_tiff

logger = logging.getLogger(__name__)


def _sample(sample_id: str, seed: int, **kwargs) -> tuple[AnnData, np.ndarray]:
    """A synthetic sample's table and its image's level-0 pixels as (y, x, 3) uint8."""
    sdata = synthetic_visium(seed=seed, sample_id=sample_id, **kwargs)
    img = sdata.images["he"]
    da = img if isinstance(img, xr.DataArray) else get_pyramid_levels(img, n=0)
    return sdata.tables["table"], np.ascontiguousarray(np.asarray(da.data.compute()).transpose(1, 2, 0))


def _plain_adata(table: AnnData, sample_id: str) -> AnnData:
    """The table as HEST ships it: raw counts, Visium obs columns, obsm['spatial']; no spatialdata attrs."""
    keep = ["in_tissue", "array_row", "array_col", "pxl_col_in_fullres", "pxl_row_in_fullres"]
    obs = table.obs[keep].copy()
    adata = AnnData(X=table.X.copy(), obs=obs, var=table.var[[]].copy())
    adata.obsm["spatial"] = np.asarray(table.obsm["spatial"], dtype=np.float64)
    adata.obsm["latent_truth"] = np.asarray(table.obsm["latent_truth"])
    adata.varm["truth_loadings"] = np.asarray(table.varm["truth_loadings"])
    adata.uns["sample_id"] = sample_id
    return adata


def hest_image_metadata(mpp: float, shape: tuple[int, ...]) -> dict[str, Any]:
    """HEST's metadata fields of a sample's H&E: its µm/px (``pixel_size_um_estimated`` = ``_embedded``), the
    magnification it implies (20x from 0.4 µm/px up, else 40x) and its full-resolution size (``shape`` is
    ``(h, w, ...)``)."""
    return {
        "pixel_size_um_estimated": float(mpp),
        "pixel_size_um_embedded": float(mpp),
        "magnification": "20x" if mpp >= 0.4 else "40x",
        "fullres_px_width": int(shape[1]),
        "fullres_px_height": int(shape[0]),
    }


def write_hest_files(
    paths: dict[str, Path], he: np.ndarray, mpp: float, spots: AnnData, meta: dict, compression: str
) -> None:
    """Write a HEST-1k sample's three files (:func:`hopt_st.io._hest.hest_paths`), each atomically: the H&E
    ``he`` (``(h, w, 3)`` uint8, a pyramidal TIFF at ``mpp`` µm/px), the ``spots`` table and ``meta`` (JSON)."""
    with atomic_path(paths["wsi"], what="WSI") as tmp:
        write_pyramidal_tiff(tmp, he, mpp=mpp, compression=compression, min_side=256)
    with atomic_path(paths["st"], what="st h5ad") as tmp:
        spots.write_h5ad(tmp)
    with atomic_path(paths["metadata"], what="metadata") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def write_hest_layout(
    root: str | Path,
    *,
    layout: str = "bench",
    task: str = "SYNTH",
    n_samples: int = 3,
    n_patients: int | None = None,
    n_spots: int = 150,
    n_genes: int = 60,
    n_states: int = 4,
    image_mpp: float = 0.5,
    xenium: bool = False,
    seed: int = 0,
    model_seed: int = 0,
    compression: str = "jpeg",
) -> dict[str, Any]:
    """Write synthetic samples (:func:`synthetic_visium`) in a real HEST on-disk layout.

    ``layout="hest1k"`` writes, for each sample ``{id}`` (``SYN<seed>``; ``SYNX<seed>`` for the Xenium-like one):

    ``wsis/{id}.tif``
        The H&E as a tiled pyramidal BigTIFF (:func:`write_pyramidal_tiff`, reduced levels as sub-IFDs,
        resolution from ``image_mpp``).
    ``st/{id}.h5ad``
        Raw counts (float32 CSR) with ``obs`` ``in_tissue``, ``array_row``, ``array_col``,
        ``pxl_col_in_fullres``, ``pxl_row_in_fullres``; ``obsm["spatial"]`` (x, y full-res px),
        ``obsm["latent_truth"]``, ``varm["truth_loadings"]`` and ``uns["sample_id"]``.
    ``metadata/{id}.json``
        HEST's metadata fields: ``id``, ``pixel_size_um_estimated`` / ``pixel_size_um_embedded``
        (``image_mpp``), ``magnification``, ``fullres_px_width`` / ``fullres_px_height``, ``patient``,
        ``organ``, ``oncotree_code``, ``species``, ``tissue``, ``disease_state``, ``st_technology``,
        ``spot_diameter`` / ``inter_spot_dist`` (µm), ``spots_under_tissue``, ``nb_genes``,
        ``dataset_title``.

    ``layout="bench"`` writes a HEST-Benchmark task folder ``root/<task>/`` (samples ``SYNB<seed>``):

    ``splits/train_{i}.csv``, ``splits/test_{i}.csv``
        Columns ``sample_id, patches_path, expr_path``; patient-level folds: fold ``i`` tests on patient
        ``i`` and trains on the others.
    ``patches/{id}.h5``
        ``img`` (N, 224, 224, 3) uint8 at 0.5 µm/px with hestcore 1.0.4's attributes (``patch_size_src``,
        ``patch_size_target``, ``downsample``, ``pixel_size`` = the slide's µm/px), ``coords`` (N, 2) top-left
        x, y in full-res px as HEST computes them, ``barcode`` (N, 1) bytes: the file hestcore 1.0.4 writes.
        Only spots whose patch lies inside the image.
    ``adata/{id}.h5ad``
        Raw counts of those spots, as in ``st/`` above.
    ``var_50genes.json``
        ``{"genes": [...]}``: the 50 genes of highest variance of log1p(counts normalised to 10,000) over
        all samples, as HEST-Benchmark picks them.

    Parameters
    ----------
    root
        Output folder (created).
    layout
        ``"hest1k"`` (HEST-1k folders) or ``"bench"`` (a HEST-Benchmark task), see above.
    task
        Task folder name (``"bench"`` only).
    n_samples
        Number of samples.
    n_patients
        Number of patients (``"bench"``: number of folds; samples are dealt to patients in turn).
        Default: one patient per sample up to 3 samples, else ``n_samples // 2``.
    n_spots
        Spots per sample.
    n_genes
        Genes per sample; the bench layout needs >= 50.
    n_states
        Latent cell states of the tissue model.
    image_mpp
        µm per pixel of the synthetic WSIs (``"bench"`` patches are cut at this resolution, so it must be
        0.5 there: HEST-Benchmark patches are 224 px at 0.5 µm/px).
    xenium
        ``"hest1k"`` only: add one Xenium-like sample with 100 µm square pseudo-spots.
    seed
        Sample ``i`` uses ``seed + i``.
    model_seed
        Tissue model shared by all samples.
    compression
        TIFF tile compression, ``"jpeg"`` or ``"zlib"`` (lossless).

    Returns
    -------
    dict
        ``{"root", "layout", "sample_ids", "paths": {sample_id: {...}}}`` and, for ``"bench"``,
        ``"task"``, ``"task_dir"``, ``"genes"``, ``"splits"`` (list of ``{"train": [...], "test": [...]}``)
        and ``"patients"`` (``{sample_id: patient}``).
    """
    root = Path(root)
    if not isinstance(layout, str):
        raise TypeError(f"layout must be 'bench' or 'hest1k', got {type(layout).__name__}.")
    if layout not in ("bench", "hest1k"):
        raise ValueError(
            f"layout = {layout!r}: use 'bench' (HEST-Benchmark task) or 'hest1k' (HEST-1k folders)."
        )
    if n_samples < 1:
        raise ValueError(f"n_samples = {n_samples!r}: need at least one sample.")
    root.mkdir(parents=True, exist_ok=True)
    if layout == "hest1k":
        return _write_hest1k(
            root, n_samples, n_spots, n_genes, n_states, image_mpp, xenium, seed, model_seed, compression
        )
    if n_genes < 50:
        raise ValueError(
            f"n_genes = {n_genes}: the HEST-Benchmark layout lists 50 genes, so n_genes must be >= 50."
        )
    if abs(image_mpp - TARGET_MPP) > 1e-9:
        raise ValueError(
            f"image_mpp = {image_mpp}: HEST-Benchmark patches are {PATCH_SIZE} px at 0.5 µm/px; use 0.5."
        )
    if n_patients is None:
        n_patients = n_samples if n_samples <= 3 else max(2, n_samples // 2)
    n_patients = int(min(max(n_patients, 1), n_samples))
    if n_patients < 2:
        raise ValueError(f"n_patients = {n_patients}: patient-level folds need at least 2 patients.")
    return _write_bench(root, task, n_samples, n_patients, n_spots, n_genes, n_states, seed, model_seed)


def _write_hest1k(
    root, n_samples, n_spots, n_genes, n_states, image_mpp, xenium, seed, model_seed, compression
):
    for sub in ("wsis", "st", "metadata"):
        (root / sub).mkdir(exist_ok=True)
    ids, paths = [], {}
    specs = [(f"SYN{seed + i:03d}", "Visium", seed + i) for i in range(n_samples)]
    if xenium:
        specs.append((f"SYNX{seed:03d}", "Xenium", seed + n_samples))
    for sid, tech, s in specs:
        table, img = _sample(
            sid,
            s,
            n_spots=n_spots,
            image_mpp=image_mpp,
            n_genes=n_genes,
            n_states=n_states,
            model_seed=model_seed,
            technology=tech,
        )
        square = tech != "Visium"
        meta = {
            "id": sid,
            "dataset_title": "hopt_st synthetic sample",
            **hest_image_metadata(image_mpp, img.shape),
            "patient": f"P{s:03d}",
            "organ": "Synthetic",
            "oncotree_code": "SYN",
            "species": "Homo sapiens",
            "tissue": "synthetic",
            "disease_state": "Cancer",
            "st_technology": tech,
            "spot_diameter": SQUARE_SPOT_SIDE_UM if square else VISIUM_SPOT_DIAMETER_UM,
            "inter_spot_dist": VISIUM_SPOT_DISTANCE_UM,
            "spots_under_tissue": int(table.n_obs),
            "nb_genes": int(table.n_vars),
        }
        files = hest_paths(root, sid)
        write_hest_files(files, img, image_mpp, _plain_adata(table, sid), meta, compression)
        ids.append(sid)
        paths[sid] = {k: str(p) for k, p in files.items()}
        logger.info("wrote HEST-1k sample %s (%s, %d spots)", sid, tech, table.n_obs)
    return {"root": str(root), "layout": "hest1k", "sample_ids": ids, "paths": paths}


def _write_bench(root, task, n_samples, n_patients, n_spots, n_genes, n_states, seed, model_seed):
    tdir = root / task
    for sub in ("splits", "patches", "adata"):
        (tdir / sub).mkdir(parents=True, exist_ok=True)
    ids, paths, patients, adatas = [], {}, {}, {}
    for i in range(n_samples):
        sid = f"SYNB{seed + i:03d}"
        table, img = _sample(
            sid,
            seed + i,
            n_spots=n_spots,
            image_mpp=TARGET_MPP,
            n_genes=n_genes,
            n_states=n_states,
            model_seed=model_seed,
        )
        xy = np.asarray(table.obsm["spatial"])
        tl = hest_topleft(xy, PATCH_SIZE)  # full-res is at TARGET_MPP, so patch_size_src = PATCH_SIZE
        h, w = img.shape[:2]
        inside = (
            (tl[:, 0] >= 0) & (tl[:, 1] >= 0) & (tl[:, 0] + PATCH_SIZE <= w) & (tl[:, 1] + PATCH_SIZE <= h)
        )
        tl, sel = tl[inside], np.flatnonzero(inside)
        patches = np.stack([img[y : y + PATCH_SIZE, x : x + PATCH_SIZE] for x, y in tl])
        barcodes = table.obs_names[sel].tolist()
        # written as HEST's pinned patcher (hestcore 1.0.4) writes them (no hopt_st fields, no exact centres)
        p_patch = write_patches_h5(
            ArrayPatches(patches, TARGET_MPP, barcodes, centers=xy[sel], patch_size_src=PATCH_SIZE),
            tdir / "patches" / f"{sid}.h5",
            hopt_st_fields=False,
        )
        adata = _plain_adata(table[sel], sid)
        p_ad = tdir / "adata" / f"{sid}.h5ad"
        adata.write_h5ad(p_ad)
        adatas[sid] = adata
        ids.append(sid)
        patients[sid] = f"P{i % n_patients}"
        paths[sid] = {"patches": str(p_patch), "adata": str(p_ad)}

    # 50 most variable genes (log1p of normalised counts), as HEST-Benchmark picks them
    logs = []
    for a in adatas.values():
        x = np.asarray(a.X.todense() if hasattr(a.X, "todense") else a.X, dtype=np.float64)
        logs.append(np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4))
    var = np.concatenate(logs).var(axis=0)
    names = list(next(iter(adatas.values())).var_names)
    genes = [names[g] for g in np.argsort(-var, kind="stable")[:50]]
    (tdir / "var_50genes.json").write_text(json.dumps({"genes": genes}, indent=2))

    splits = []
    for k in range(n_patients):
        test = [s for s in ids if patients[s] == f"P{k}"]
        train = [s for s in ids if patients[s] != f"P{k}"]
        for name, members in (("train", train), ("test", test)):
            pd.DataFrame(
                {
                    "sample_id": members,
                    "patches_path": [f"patches/{s}.h5" for s in members],
                    "expr_path": [f"adata/{s}.h5ad" for s in members],
                }
            ).to_csv(tdir / "splits" / f"{name}_{k}.csv", index=False)
        splits.append({"train": train, "test": test})
    logger.info("wrote HEST-Benchmark task %s: %d samples, %d folds", task, n_samples, n_patients)
    return {
        "root": str(root),
        "layout": "bench",
        "task": task,
        "task_dir": str(tdir),
        "sample_ids": ids,
        "paths": paths,
        "genes": genes,
        "splits": splits,
        "patients": patients,
    }
