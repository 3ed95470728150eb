"""Read a HEST-Benchmark task folder (splits, patch files, expression) into one SpatialData."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale

from .._constants import MICROMETERS_CS, UNS_KEY, VISIUM_SPOT_DIAMETER_UM
from .._errors import CorruptFileError
from .._h5 import open_h5
from .._patchset import (
    HEST_PATCH_MPP,
    check_unique_barcodes,
    decode_barcodes,
    h5_attr,
    hest_centers,
    hest_half,
    recorded_mpp,
    recorded_patch_size_src,
)
from ._counts import check_spots, ensure_raw_counts, read_h5ad

logger = logging.getLogger(__name__)


def _read_splits(tdir: Path) -> list[dict]:
    sdir = tdir / "splits"
    if not sdir.is_dir():
        raise FileNotFoundError(
            f"HEST-Benchmark task folder {str(tdir)!r} has no 'splits/' folder: expected "
            "splits/train_0.csv, splits/test_0.csv, ... Download the task again (hf dataset MahmoodLab/hest-bench)."
        )
    folds = sorted(
        int(p.stem.split("_")[1]) for p in sdir.glob("train_*.csv") if p.stem.split("_")[1].isdigit()
    )
    if not folds:
        raise FileNotFoundError(f"{str(sdir)!r} holds no train_<i>.csv split files.")
    splits = []
    for i in folds:
        fold = {}
        for name in ("train", "test"):
            p = sdir / f"{name}_{i}.csv"
            if not p.is_file():
                raise FileNotFoundError(
                    f"split file {str(p)!r} is missing (its partner {name == 'train' and 'test' or 'train'}_{i}.csv exists)."
                )
            df = pd.read_csv(p)
            cols = {"sample_id", "patches_path", "expr_path"}
            if not cols <= set(df.columns):
                raise ValueError(
                    f"split file {str(p)!r} has columns {list(df.columns)}; expected {sorted(cols)}."
                )
            fold[name] = df
        _check_disjoint(tdir, i, fold)
        splits.append(fold)
    return splits


def _check_disjoint(tdir: Path, i: int, fold: dict) -> None:
    """A benchmark never scores what it trained on (issue 20, rule 6): refuse a fold whose test split shares a
    sample with its train split, by sample id or by the patch or expression file it reads (the same spots
    under another id)."""
    train, test = fold["train"], fold["test"]
    shared = sorted(set(map(str, train["sample_id"])) & set(map(str, test["sample_id"])))
    for col in ("patches_path", "expr_path"):
        train_files = {(tdir / str(p)).resolve(): str(s) for s, p in zip(train["sample_id"], train[col])}
        shared += sorted(
            f"{s} (test) = {train_files[(tdir / str(p)).resolve()]} (train): same {col} {str(p)!r}"
            for s, p in zip(test["sample_id"], test[col])
            if (tdir / str(p)).resolve() in train_files and str(s) not in shared
        )
    if shared:
        raise ValueError(
            f"HEST-Benchmark split {i} of {str(tdir)!r} tests samples it also trains on: {shared[:5]}"
            f"{' ...' if len(shared) > 5 else ''} (splits/train_{i}.csv and splits/test_{i}.csv). A model scored "
            "on its own training spots looks better than it is: fix the split files (download the task again)."
        )


_SIZE_ATTRS = ("patch_size", "patch_size_target")


def _patch_centers(coords, src, adata, psize: int, path) -> tuple[np.ndarray, float]:
    """Spot centres (full-res px) and the patch side in full-res px for one HEST patch file.

    HEST's ``coords`` are ``int(centre - patch_size_src // 2)`` (see :mod:`hopt_st._patchset`). The expression
    file's ``obsm["spatial"]`` (HEST's spot centres, the ones the patches were cut around) gives the exact centres
    when it sits at that offset from ``coords``; files from hestcore >= 1.0.3 also record ``patch_size_src`` (via
    ``downsample``), while HEST's 2024 files record none, and the offset then gives it too.
    """
    spatial = adata.obsm.get("spatial") if "spatial" in adata.obsm else None
    if spatial is not None:
        spatial = np.asarray(spatial, dtype=np.float64)
        if spatial.shape == coords.shape and np.isfinite(spatial).all():
            off = spatial - coords
            half = float(np.median(np.floor(off)))
            consistent = half >= 0 and np.all(np.abs(off - half - 0.5) <= 1.0)
            if src is not None:
                consistent = consistent and abs(half - hest_half(src)) <= 1.0
            if consistent:
                if src is None:
                    # HEST truncates patch_size_src // 2: the side is known to within 2 px (< 0.4 % at 0.5 µm/px)
                    src = 2.0 * half + 1.0
                return spatial, src
            logger.warning(
                "%s: obsm['spatial'] of the expression file does not sit at a constant offset from the patch "
                "coords (median %.1f px); placing spots from coords instead.",
                path,
                half,
            )
    if src is None:
        src = float(psize)
        logger.warning(
            "%s records no patch_size_src and its expression file no usable obsm['spatial']; assuming the "
            "patches were cut at full resolution (patch_size_src = %d px, full-res 0.5 µm/px).",
            path,
            psize,
        )
    return hest_centers(coords, src), float(src)


def _task_dir(root: Path, task: str) -> Path:
    tdir = root / task
    if not tdir.is_dir() and root.name == task and (root / "splits").is_dir():
        return root
    if not tdir.is_dir():
        present = sorted(p.name for p in root.iterdir() if (p / "splits").is_dir()) if root.is_dir() else []
        raise FileNotFoundError(
            f"HEST-Benchmark task {task!r} not found: {str(tdir)!r} does not exist; tasks present in "
            f"{str(root)!r}: {present}. Download it, e.g. huggingface_hub.snapshot_download('MahmoodLab/hest-bench', "
            f"repo_type='dataset', allow_patterns=['{task}/*'])."
        )
    return tdir


def _read_genes(tdir: Path) -> list[str]:
    genes_path = tdir / "var_50genes.json"
    if not genes_path.is_file():
        raise FileNotFoundError(f"{str(genes_path)!r} is missing: the task's 50 genes are listed there.")
    genes = json.loads(genes_path.read_text()).get("genes")
    if not genes:
        raise ValueError(f"{str(genes_path)!r} has no 'genes' list.")
    return [str(g) for g in genes]


def _sample_files(raw_splits: list[dict]) -> tuple[dict, dict, list]:
    """sample -> (patches, expr) relative paths; sample -> patient (the fold that tests it); splits as ids."""
    files: dict[str, tuple[str, str]] = {}
    patient: dict[str, str] = {}
    splits = []
    for i, fold in enumerate(raw_splits):
        for name in ("train", "test"):
            for row in fold[name].itertuples(index=False):
                files.setdefault(str(row.sample_id), (str(row.patches_path), str(row.expr_path)))
                if name == "test":
                    patient.setdefault(str(row.sample_id), f"P{i}")
        splits.append({k: [str(s) for s in fold[k]["sample_id"]] for k in ("train", "test")})
    return files, patient, splits


def _read_patch_index(p_patch: Path) -> tuple[np.ndarray, list[str], int, float | None, float | None]:
    """coords, barcodes, patch size, recorded patch_size_src and slide µm/px of a patch file (pixels are not
    read)."""
    try:
        with open_h5(p_patch) as f:  # refuses data from outside the file (rule 4)
            missing = [key for key in ("coords", "barcode") if key not in f]
            if missing:
                raise ValueError(
                    f"patch file {str(p_patch)!r} has no {missing[0]!r} dataset (keys: {list(f.keys())})."
                )
            coords = np.asarray(f["coords"][:], dtype=np.float64)
            barcodes = list(decode_barcodes(f["barcode"][:]))
            psize = int(f["img"].shape[1]) if "img" in f else int(h5_attr(f, _SIZE_ATTRS) or 224)
            src = recorded_patch_size_src(f, psize)
            _, slide_mpp = recorded_mpp(f, psize)
    except (OSError, KeyError, RuntimeError, TypeError, IndexError) as e:  # h5py: truncated / garbled
        raise CorruptFileError.from_error(
            p_patch, e, what="patch file", fix="download the task's patches/ folder again."
        ) from None
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(barcodes):
        raise ValueError(
            f"patch file {str(p_patch)!r} has coords of shape {coords.shape} for {len(barcodes)} barcodes; "
            "expected one (x, y) row per barcode. Download it again."
        )
    if not np.isfinite(coords).all():
        raise ValueError(f"{str(p_patch)!r} has NaN/inf coords; drop those patches first.")
    check_unique_barcodes(barcodes, f"patch file {str(p_patch)!r}")
    return coords, barcodes, psize, src, slide_mpp


def _read_sample(task: str, sid: str, p_patch: Path, p_expr: Path, patient: str):
    """One sample's table (rows in patch-file order) and spot circles."""
    for p in (p_patch, p_expr):
        if not p.is_file():
            raise FileNotFoundError(
                f"sample {sid!r} of task {task!r}: {str(p)!r} (listed in the split files) is missing. "
                "Download the task's patches/ and adata/ folders again."
            )
    coords, barcodes, psize, src, slide_mpp = _read_patch_index(p_patch)
    adata = read_h5ad(p_expr)
    check_spots(adata, p_expr)
    ensure_raw_counts(adata, p_expr)
    missing = [b for b in barcodes if b not in adata.obs_names]
    if missing:
        raise ValueError(
            f"{len(missing)} patch barcodes of {str(p_patch)!r} are not in {str(p_expr)!r} "
            f"(e.g. {missing[:3]}): patch and expression files do not match."
        )
    adata = adata[barcodes].copy()
    centers, src = _patch_centers(coords, src, adata, psize, p_patch)
    # hestcore records the slide's µm/px (pixel_size); otherwise patches are HEST-Benchmark's 0.5 µm/px
    fullres_mpp = slide_mpp if slide_mpp is not None else HEST_PATCH_MPP * psize / src
    n, region = adata.n_obs, f"{sid}_spots"
    if "patient" not in adata.obs:
        adata.obs["patient"] = patient
    adata.obs["patient"] = adata.obs["patient"].astype(str)
    adata.obs["region"] = pd.Categorical([region] * n)
    adata.obs["spot_id"] = np.arange(n)
    adata.obsm["spatial"] = centers
    adata.uns.pop("spatialdata_attrs", None)
    adata.uns[UNS_KEY] = {
        "image_mpp": {},
        "fullres_mpp": float(fullres_mpp),
        "sample_id": sid,
        "metadata": {
            "task": task,
            "patches_path": str(p_patch),
            "patch_size": psize,
            "patch_mpp": HEST_PATCH_MPP,
        },
    }
    table = TableModel.parse(adata, region=region, region_key="region", instance_key="spot_id")
    shapes = ShapesModel.parse(
        centers.copy(),
        geometry=0,
        radius=np.full(n, VISIUM_SPOT_DIAMETER_UM / 2 / fullres_mpp),
        index=np.arange(n),
        transformations={
            "global": Identity(),
            MICROMETERS_CS: Scale([fullres_mpp, fullres_mpp], axes=("x", "y")),
        },
    )
    return table, shapes


def read_hest_bench(root: str | Path, task: str) -> SpatialData:
    """Read one HEST-Benchmark task.

    Parameters
    ----------
    root
        Folder holding the task folders (e.g. ``.../hest-bench`` with ``IDC/``, ``LYMPH_IDC/``, ...), or the
        task folder itself.
    task
        Task name, e.g. ``"IDC"``.

    Returns
    -------
    SpatialData
        One table per sample, named by sample id (raw counts, rows in patch-file order, ``obs["patient"]``,
        ``obsm["spatial"]`` = patch centres in full-res px: the expression file's own ``obsm["spatial"]`` when it
        sits at HEST's offset from the patch ``coords``, else ``coords + patch_size_src // 2``), shapes
        ``"<sample_id>_spots"`` (55 µm circles at the patch centres) and
        ``attrs["hest_bench"] = {"task", "root", "genes", "splits", "patches"}`` where ``splits`` is a list of
        ``{"train": [ids], "test": [ids]}`` and ``patches`` maps sample id to the patch ``.h5`` path. No image:
        the patches stay on disk (read them with :func:`hopt_st.io.read_patches`).
    """
    root = Path(root)
    tdir = _task_dir(root, task)
    raw_splits = _read_splits(tdir)
    genes = _read_genes(tdir)
    files, patient, splits = _sample_files(raw_splits)
    tables, shapes, patches = {}, {}, {}
    for sid, (ppath, epath) in files.items():
        tables[sid], shapes[f"{sid}_spots"] = _read_sample(
            task, sid, tdir / ppath, tdir / epath, patient.get(sid, sid)
        )
        patches[sid] = str(tdir / ppath)
    sdata = SpatialData(shapes=shapes, tables=tables)
    sdata.attrs["hest_bench"] = {
        "task": task,
        "root": str(tdir),
        "genes": genes,
        "splits": splits,
        "patches": patches,
    }
    logger.info("read_hest_bench %s: %d samples, %d folds", task, len(tables), len(splits))
    return sdata
