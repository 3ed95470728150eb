"""Cohorts: a table of samples (:func:`read_cohort`), how to read one of them, and their embeddings as one
AnnData (:func:`load_cohort`).

A cohort table has one row per sample and the columns

``sample_id``
    Unique name; the embedding file is ``<out_dir>/<model>/<sample_id>.h5``.
``source``
    Where the sample comes from: a HEST-1k root (the sample is ``sample_id`` in it), a Space Ranger ``outs/``
    folder, a SpatialData ``.zarr``, an ``.h5ad`` (scanpy's Visium layout, as ``hopt-st embed`` reads it; or a
    spot table with ``pxl_*_in_fullres`` / ``obsm["spatial"]`` plus ``image`` and ``image_mpp``; processed
    values are fine, embedding needs no counts), a HEST patch file ``.h5``, or a whole H&E slide without
    spatial data (``.svs``, ``.tif``, ``.tiff``, ``.ndpi``, ...: tissue is detected and tiled, each tile is one
    row of the embedding file).
``kind`` (optional)
    ``"hest"``, ``"visium"``, ``"zarr"``, ``"h5ad"``, ``"patches"`` or ``"slide"``; inferred from ``source``
    when absent.
``image`` (optional)
    Full-resolution H&E scan (TIFF, JPEG, PNG, ...) for ``visium`` and ``h5ad`` sources.
``image_mpp`` (optional)
    µm per full-resolution pixel, overriding what the reader records (an h5ad in scanpy's layout records it
    as ``spot_diameter_fullres``; other h5ads need it).
``patient`` (optional)
    Patient id (for patient-level cross-validation, ``groups="patient"``).
``counts`` (optional)
    An ``.h5ad`` of raw counts for :func:`load_cohort` when the source has none (patch files). A source with
    processed values only gives them as they are (fit with ``target="none"``).

Other columns are kept. Relative paths in a CSV are relative to the CSV's folder (in a DataFrame, to the
current folder).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import UNS_KEY
from .._patchset import Patches, read_patches
from ._counts import ensure_raw_counts, read_h5ad
from ._embeddings import read_embeddings
from ._store import check_name, sanitize_name

logger = logging.getLogger(__name__)

#: kinds of sample sources a cohort table may name
KINDS = ("hest", "visium", "zarr", "h5ad", "patches", "slide")
_SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".btf", ".scn", ".bif")
COLUMNS = ("sample_id", "source", "kind", "image", "image_mpp", "patient", "counts")
_PATH_COLUMNS = ("source", "image", "counts")
_HEST_SUBDIRS = (("st", ".h5ad"), ("wsis", ".tif"), ("metadata", ".json"))
_HEST_META_COLUMNS = ("patient", "organ", "oncotree_code", "st_technology", "species", "disease_state")
_ZARR_META = ("zarr.json", ".zattrs", ".zarray", ".zgroup", ".zmetadata")


def model_dirname(name: str) -> str:
    """The folder name of a model's outputs (``timm:vit_x`` -> ``timm_vit_x``)."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(name))


# ----------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------
def _is_hest_root(path: Path) -> bool:
    return any((path / sub).is_dir() for sub, _ in _HEST_SUBDIRS)


def _is_bench_task(path: Path) -> bool:
    return (path / "splits").is_dir() and (path / "patches").is_dir()


def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists()


def _infer_kind(source: Path) -> str | None:
    suffix = source.suffix.lower()
    if suffix == ".zarr" or (source.is_dir() and _is_zarr(source)):
        return "zarr"
    if suffix == ".h5ad":
        return "h5ad"
    if suffix in (".h5", ".hdf5"):
        return "patches"
    if suffix in _SLIDE_SUFFIXES and source.is_file():
        return "slide"
    if source.is_dir():
        if (source / "spatial").is_dir():
            return "visium"
        if _is_hest_root(source):
            return "hest"
    return None


def _hest1k_table(root: Path) -> pd.DataFrame:
    """One row per sample found in a HEST-1k root, with the main metadata fields."""
    ids = set()
    for sub, ext in _HEST_SUBDIRS:
        if (root / sub).is_dir():
            ids |= {p.name[: -len(ext)] for p in (root / sub).iterdir() if p.name.endswith(ext)}
    rows = []
    for sid in sorted(ids):
        row = {"sample_id": sid, "source": str(root), "kind": "hest"}
        meta_path = root / "metadata" / f"{sid}.json"
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError:
                meta = {}  # reading the sample reports it
            row.update({k: meta.get(k) for k in _HEST_META_COLUMNS})
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"HEST-1k root {str(root)!r} holds no sample (st/*.h5ad, wsis/*.tif).")
    return pd.DataFrame(rows)


def _bench_table(task_dir: Path) -> pd.DataFrame:
    """One row per sample of a HEST-Benchmark task folder: its patch file, and its counts for load_cohort."""
    rows: dict[str, dict] = {}
    for split in sorted((task_dir / "splits").glob("*.csv")):
        df = pd.read_csv(split)
        if not {"sample_id", "patches_path", "expr_path"} <= set(df.columns):
            raise ValueError(
                f"split file {str(split)!r} has columns {list(df.columns)}; expected sample_id, patches_path, "
                "expr_path."
            )
        for sid, patches, expr in zip(df["sample_id"], df["patches_path"], df["expr_path"]):
            rows.setdefault(
                str(sid),
                {
                    "sample_id": str(sid),
                    "source": str(task_dir / patches),
                    "kind": "patches",
                    "counts": str(task_dir / expr),
                },
            )
    if not rows:
        raise FileNotFoundError(f"HEST-Benchmark task {str(task_dir)!r} has no split file listing samples.")
    return pd.DataFrame(list(rows.values()))


def _check_ids(df: pd.DataFrame, what: str) -> None:
    ids = df["sample_id"]
    bad = [s for s in ids if not s or s.startswith(".") or any(c in s for c in "/\\\0")]
    if bad:
        raise ValueError(
            f"{what}: sample_id {bad[:5]} cannot name a file (empty, leading '.', or '/'): rename them."
        )
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"{what}: sample_id must be unique; repeated: {dup[:10]}.")


def _scanpy_layout(path: Path) -> bool:
    """Whether an .h5ad holds ``uns/spatial`` (scanpy's Visium layout), from its HDF5 tree only."""
    from .._h5 import open_h5

    try:
        with open_h5(path) as f:  # self-contained HDF5 only (rule 4)
            return "uns/spatial" in f and len(f["uns/spatial"]) > 0 and "obsm/spatial" in f
    except (OSError, ValueError):  # unreadable or not self-contained: the reader says so with the file named
        return True


def _normalise(df: pd.DataFrame, base: Path, what: str, keep_bad: bool = False) -> pd.DataFrame:
    missing = [c for c in ("sample_id", "source") if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what} needs the columns 'sample_id' and 'source'; missing {missing} (it has {list(df.columns)})."
        )
    df = df.copy().reset_index(drop=True)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = None
    df = df.astype(object).where(df.notna(), None)
    df["sample_id"] = [None if v is None else str(v) for v in df["sample_id"]]
    df["sample_id"] = ["" if v is None else v.strip() for v in df["sample_id"]]
    _check_ids(df, what)
    for col in _PATH_COLUMNS:  # absolute paths, so the table means the same thing in every process
        df[col] = [None if v is None else str((base / str(v)).absolute()) for v in df[col]]
    problems = []
    kinds = []
    row_problems: list[str | None] = []
    for sid, source, kind, image, mpp in zip(df.sample_id, df.source, df.kind, df.image, df.image_mpp):
        row_problems.append(None)
        n_before = len(problems)
        if source is None:
            problems.append(f"{sid}: no source")
            kinds.append(None)
            row_problems[-1] = problems[-1]
            continue
        src = Path(source)
        if not src.exists():
            problems.append(f"{sid}: source {source!r} " + _why_not_a_sample(src))
            kinds.append(kind)
            row_problems[-1] = problems[-1]
            continue
        if kind is None:
            kind = _infer_kind(src)
            if kind is None:
                problems.append(f"{sid}: source {source!r} " + _why_not_a_sample(src))
        elif kind not in KINDS:
            problems.append(f"{sid}: kind {kind!r} is not one of {list(KINDS)}")
        if image is not None and kind in ("hest", "zarr", "patches"):
            problems.append(f"{sid}: column 'image' applies to visium and h5ad sources, not {kind}")
        if kind == "h5ad" and (image is None or mpp is None) and src.is_file() and not _scanpy_layout(src):
            problems.append(
                f"{sid}: the h5ad has no uns['spatial'] (scanpy's Visium layout), so it needs 'image' (the H&E "
                "scan) and 'image_mpp'"
            )
        if mpp is not None:
            try:
                ok = float(mpp) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                problems.append(f"{sid}: image_mpp {mpp!r} must be a positive number (µm per pixel)")
        kinds.append(kind)
        if len(problems) > n_before:
            row_problems[-1] = "; ".join(problems[n_before:])
    if keep_bad:  # one bad sample never stops a cohort (rule 10): the caller records it and goes on
        df["problem"] = row_problems
        df["image_mpp"] = pd.Series(
            [None if p is not None else v for v, p in zip(df["image_mpp"], row_problems)], dtype=object
        )
        problems = []
    if problems:
        raise ValueError(
            f"{what}: {len(problems)} bad row(s): "
            + "; ".join(problems[:10])
            + (" ..." if len(problems) > 10 else "")
            + f". Correct the column 'source' (paths are relative to the CSV's folder): sources are a HEST-1k "
            "root, a Space Ranger outs/ folder, a .zarr, an .h5ad, a patch .h5 or a whole slide (.svs, .tif, "
            f".ndpi, ...) (or set the column 'kind' to one of {list(KINDS)})."
        )
    df["kind"] = kinds
    # object columns: a float column would turn None into NaN
    df["image_mpp"] = pd.Series([None if v is None else float(v) for v in df["image_mpp"]], dtype=object)
    df["patient"] = [None if v is None else str(v) for v in df["patient"]]
    return df


def _why_not_a_sample(src: Path) -> str:
    if src.is_symlink() and not src.exists():
        return "is a broken symbolic link or a symlink loop"
    return "does not exist" if not src.exists() else "is not a sample (see the kinds below)"


def read_cohort(cohort: pd.DataFrame | str | os.PathLike, *, keep_bad: bool = False) -> pd.DataFrame:
    """A cohort table: one row per sample to embed (see :mod:`hopt_st.io._cohort` for the columns).

    Parameters
    ----------
    cohort
        A DataFrame or a CSV file with at least the columns ``sample_id`` and ``source``; a HEST-1k root
        (``wsis/``, ``st/``, ``metadata/``: one row per sample found, with its ``patient``, ``organ``,
        ``oncotree_code``, ``st_technology``, ``species`` and ``disease_state`` from the metadata); or a
        HEST-Benchmark task folder (one row per sample of its splits: the patch file and its counts).
    keep_bad
        Keep rows whose sample is unusable (a source that does not exist or is a symlink loop, a wrong kind,
        ...), with the reason in a column ``problem`` (``None`` for good rows), instead of raising: what
        :func:`hopt_st.pp.embed_cohort` does, so one bad sample is recorded as failed and the others go on.

    Returns
    -------
    pandas.DataFrame
        Columns ``sample_id, source, kind, image, image_mpp, patient, counts`` (absolute paths, ``kind``
        filled in, missing values ``None``) and any other column of the input.

    Raises
    ------
    ValueError
        Missing columns, repeated or unusable ``sample_id``, sources that do not exist or are not samples.
    """
    if isinstance(cohort, pd.DataFrame):
        return _normalise(cohort, Path.cwd(), "cohort table", keep_bad)
    if not isinstance(cohort, str | os.PathLike):
        raise TypeError(
            f"cohort must be a DataFrame, a CSV file or a HEST folder, got {type(cohort).__name__}."
        )
    path = Path(cohort)
    if path.is_dir():
        if _is_bench_task(path):
            return _normalise(_bench_table(path), path, f"HEST-Benchmark task {str(path)!r}", keep_bad)
        if _is_hest_root(path):
            return _normalise(_hest1k_table(path), path, f"HEST-1k root {str(path)!r}", keep_bad)
        raise ValueError(
            f"cohort folder {str(path)!r} is neither a HEST-1k root (wsis/, st/, metadata/) nor a "
            "HEST-Benchmark task folder (splits/, patches/); pass a CSV with sample_id,source instead."
        )
    if not path.is_file():
        raise FileNotFoundError(f"cohort {str(path)!r} does not exist.")
    df = _read_cohort_csv(path)
    return _normalise(df, path.parent, f"cohort {str(path)!r}", keep_bad)


def _read_cohort_csv(path: Path) -> pd.DataFrame:
    """The CSV as written: ``sample_id`` and ``patient`` are strings ("NA", "None", "001" stay as they are),
    other columns' empty cells are missing; an empty file or one without rows is refused with the file named."""
    example = "sample_id,source,image\\nS1,sample1.h5ad,scan1.jpg"
    if not path.read_bytes().strip():
        raise ValueError(
            f"cohort {str(path)!r} is empty: write a header and one row per sample, e.g. '{example}'."
        )
    text_cols = ("sample_id", "patient")
    try:
        df = pd.read_csv(
            path,
            sep=None,
            engine="python",
            dtype=dict.fromkeys(text_cols, str),
            keep_default_na=False,
            na_values={c: [""] for c in COLUMNS if c not in text_cols},
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error, UnicodeDecodeError) as e:
        raise ValueError(
            f"cohort {str(path)!r} is not a readable CSV ({type(e).__name__}: {e}): write a header and one "
            f"row per sample, comma-separated, e.g. '{example}'."
        ) from None
    if df.empty:
        raise ValueError(
            f"cohort {str(path)!r} has a header ({list(df.columns)}) but no sample rows: add one row per "
            f"sample, e.g. '{example}'."
        )
    return df


# ----------------------------------------------------------------------------------------------------------
# one sample
# ----------------------------------------------------------------------------------------------------------
def _file_stat(path: Path, root: Path) -> list:
    try:
        st = path.stat()
    except FileNotFoundError:
        return [str(path.relative_to(root)) if path.is_relative_to(root) else path.name, -1, -1]
    name = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
    return [name, st.st_size, st.st_mtime_ns]


def sample_files(row) -> list[list]:
    """``[name, size, mtime_ns]`` of the files a cohort row's sample is read from (its identity on disk).

    Names are relative to the source, so moving a whole data folder does not change the identity; a missing
    file is ``[name, -1, -1]``. For a ``.zarr`` only metadata files are listed (they change whenever an
    element is rewritten).
    """
    src = Path(row["source"])
    kind = row["kind"]
    if kind == "hest":
        sid = row["sample_id"]
        files = [src / sub / f"{sid}{ext}" for sub, ext in _HEST_SUBDIRS]
    elif kind == "visium":
        files = sorted(p for p in src.glob("*.h5") if p.is_file())
        files += (
            sorted(p for p in (src / "spatial").iterdir() if p.is_file())
            if (src / "spatial").is_dir()
            else []
        )
    elif kind == "zarr":
        files = sorted(Path(d) / f for d, _, names in os.walk(src) for f in names if f in _ZARR_META) or [src]
    else:
        files = [src]
    stats = [_file_stat(p, src if src.is_dir() else src.parent) for p in files]
    if row.get("image") is not None:
        stats.append(_file_stat(Path(row["image"]), Path(row["image"]).parent))
    return stats


def _read_h5ad_sample(row) -> SpatialData:
    """An .h5ad spot table as ``hopt-st embed`` reads it: scanpy's Visium layout (``obsm["spatial"]`` and
    ``uns["spatial"]``: µm/px from ``spot_diameter_fullres`` unless ``image_mpp``; the scan from ``image`` or
    ``source_image_path``, else the hires PNG), or HEST's (``pxl_*_in_fullres``, with ``image`` and
    ``image_mpp``). Embedding needs no counts: processed (log-normalised) tables are read as they are."""
    from spatialdata.models import TableModel

    from ._anndata import anndata_to_spatialdata
    from ._hest import _spot_shapes, _spot_xy
    from ._image_file import read_image_file
    from ._mpp import check_mpp

    path, sid = Path(row["source"]), str(row["sample_id"])
    adata = read_h5ad(path)  # self-contained HDF5 only (rule 4)
    if adata.uns.get("spatial") and "spatial" in adata.obsm:
        sdata = anndata_to_spatialdata(
            adata, row.get("image"), image_mpp=row.get("image_mpp"), full_table=False
        )
        sdata.tables["table"].uns[UNS_KEY]["sample_id"] = sid
        return sdata
    if row.get("image") is None or row.get("image_mpp") is None:
        raise ValueError(
            f"sample {sid!r}: {str(path)!r} has no uns['spatial'] (scanpy's Visium layout, where the pixel size "
            "comes from spot_diameter_fullres), so the cohort row needs the columns 'image' (the full-resolution "
            "H&E scan) and 'image_mpp' (µm per pixel of that scan)."
        )
    mpp = check_mpp(row["image_mpp"], f"image_mpp of sample {sid!r}")
    xy = _spot_xy(adata, path)
    n = adata.n_obs
    adata.obs["region"] = pd.Categorical(["spots"] * n)
    adata.obs["spot_id"] = np.arange(n)
    adata.obsm["spatial"] = xy.copy()
    adata.uns.pop("spatialdata_attrs", None)
    adata.uns[UNS_KEY] = {"image_mpp": {"he": mpp}, "fullres_mpp": mpp, "sample_id": sid}
    table = TableModel.parse(adata, region="spots", region_key="region", instance_key="spot_id")
    return SpatialData(
        images={"he": read_image_file(Path(row["image"]))},
        shapes={"spots": _spot_shapes(xy, {}, mpp)},
        tables={"table": table},
    )


def read_sample(row) -> SpatialData | Patches:
    """Read the sample of one cohort row: a SpatialData, or lazy :class:`~hopt_st.pp.Patches` for a patch file."""
    from ._hest import read_hest
    from ._visium import read_visium

    kind, src, mpp = row["kind"], Path(row["source"]), row.get("image_mpp")
    if kind == "hest":
        return read_hest(src, row["sample_id"], image_mpp=mpp)
    if kind == "visium":
        return read_visium(src, image_mpp=mpp, fullres_image_file=row.get("image"))
    if kind == "zarr":
        import spatialdata as sd

        from ._elements import resolve_image_key
        from ._mpp import set_image_mpp

        sdata = sd.read_zarr(src)
        if mpp is not None:
            set_image_mpp(sdata, {resolve_image_key(sdata, None): mpp})
        return sdata
    if kind == "h5ad":
        return _read_h5ad_sample(row)
    if kind == "patches":
        return read_patches(src)
    if kind == "slide":
        from ._slide import read_slide

        return read_slide(src, image_mpp=mpp)
    raise ValueError(f"sample {row['sample_id']!r}: kind {kind!r} is not one of {list(KINDS)}.")


def read_counts(row) -> ad.AnnData | None:
    """Raw counts of a cohort row's sample (spots x genes, barcodes as ``obs_names``), or ``None``."""
    from ._elements import get_spot_table

    kind, src = row["kind"], Path(row["source"])
    if row.get("counts") is not None:
        path = Path(row["counts"])
    elif kind == "hest":
        path = src / "st" / f"{row['sample_id']}.h5ad"
    elif kind == "h5ad":
        path = src
    elif kind in ("visium", "zarr"):
        sdata = read_sample(row)
        table = get_spot_table(sdata)[0]
        return ad.AnnData(X=table.X, obs=pd.DataFrame(index=table.obs_names), var=table.var[[]])
    else:
        return None
    adata = read_h5ad(path)  # self-contained HDF5 only (rule 4)
    # processed (e.g. log-normalised) values are kept as they are: fitting refuses them unless target="none"
    ensure_raw_counts(adata, path, required=False)
    return ad.AnnData(X=adata.X, obs=pd.DataFrame(index=adata.obs_names), var=adata.var[[]])


# ----------------------------------------------------------------------------------------------------------
# all samples' embeddings as one AnnData
# ----------------------------------------------------------------------------------------------------------
def model_folder(out_dir: str | os.PathLike, model) -> Path:
    """``out_dir/<model>``, the folder of one model's embedding files, which must exist.

    ``model`` is a registry name or a ``ModelSpec``. Raises ``TypeError`` for anything else and
    ``FileNotFoundError`` (saying how to make it) when the folder is absent.
    """
    name = model if isinstance(model, str) else getattr(model, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"model must be a model name or a ModelSpec, got {type(model).__name__}.")
    folder = Path(out_dir) / model_dirname(name)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{str(folder)!r} does not exist: embed the cohort first (hopt_st.pp.embed_cohort or "
            "`hopt-st embed-cohort`)."
        )
    return folder


def load_cohort(
    out_dir: str | os.PathLike,
    model,
    cohort: pd.DataFrame | str | os.PathLike | None = None,
    *,
    counts: bool = True,
    key_added: str | None = None,
    join: str = "inner",
    by_provenance: bool = False,
) -> ad.AnnData | dict[str, ad.AnnData]:
    """The embeddings of a cohort (written by :func:`hopt_st.pp.embed_cohort`) as one AnnData.

    Parameters
    ----------
    out_dir
        The ``out_dir`` given to :func:`~hopt_st.pp.embed_cohort` (files ``<out_dir>/<model>/<sample>.h5``).
    model
        Model name (or :class:`~hopt_st.models.ModelSpec`).
    cohort
        The cohort (anything :func:`read_cohort` takes): which samples, in which order, their patients, and
        where their counts are. ``None``: every embedding file in the folder, without counts.
    counts
        Read the samples' raw counts into ``X`` (genes measured in every sample) when the cohort has them.
    key_added
        ``obsm`` key; default ``"X_<model>"``.
    join
        How the samples' genes are combined, as in :func:`anndata.concat`: ``"inner"`` keeps the genes measured
        in every sample (refused, naming the samples, when there is none), ``"outer"`` every gene of any
        sample (a gene a sample did not measure is 0 in its rows; ``var["n_samples_measured"]`` says in how
        many samples each gene was measured).
    by_provenance
        Embeddings are stacked only when they came from the same model, weights and geometry (model, ``dim``,
        weights sha256, µm/px, patch size): samples that differ are refused, naming them. ``True`` returns
        instead one AnnData per provenance group, in a dict keyed ``"<model>|<weights sha256 prefix>|<dim>d|
        <mpp> µm/px|<patch> px"``.

    Returns
    -------
    anndata.AnnData
        One row per embedded spot, named ``<sample_id>_<barcode>``, with

        ``obs["sample_id"]``, ``obs["patient"]``, ``obs["barcode"]``
            The sample, its patient (the sample id when unknown) and the spot's barcode.
        ``obsm[key_added]``
            float32 embeddings.
        ``obsm["spatial"]``
            Spot centres (x, y) in the sample's full-resolution pixels.
        ``X``
            Raw counts when ``counts`` and every sample has them (else no genes).
        ``uns["hopt_st"]["cohort"]``
            ``model``, ``out_dir``, ``samples``, ``missing`` (cohort samples without an embedding file) and
            each sample's ``fingerprints``; ``uns["hopt_st"]["embeddings"][key_added]`` the provenance of the
            first sample's file.
    """
    folder = model_folder(out_dir, model)
    name = model if isinstance(model, str) else model.name
    if cohort is None:
        table = pd.DataFrame({"sample_id": sorted(p.stem for p in folder.glob("*.h5"))})
        table["patient"] = None
    else:
        table = read_cohort(cohort)
    key = f"X_{sanitize_name(name)}" if key_added is None else check_name(key_added, "key_added")
    if join not in ("inner", "outer"):
        raise ValueError(f"join={join!r} must be 'inner' or 'outer' (as in anndata.concat).")
    parts, provs, missing, fingerprints, groups = [], [], [], {}, {}
    for row in table.to_dict("records"):
        sid = row["sample_id"]
        path = folder / f"{sid}.h5"
        if not path.is_file():
            missing.append(sid)
            continue
        emb = read_embeddings(path)
        fingerprints[sid] = emb.fingerprint or ""
        provs.append(emb.provenance)
        groups.setdefault(_provenance_group(emb), []).append(len(parts))
        parts.append(_sample_part(row, emb, key, counts and cohort is not None))
    if missing:
        logger.warning(
            "load_cohort: %d of %d samples have no embedding file in %s (not embedded, or failed: see "
            "status.csv): %s",
            len(missing),
            len(table),
            folder,
            missing[:10],
        )
    if not parts:
        raise FileNotFoundError(f"no embedding file of the cohort's samples in {str(folder)!r}.")
    if len(groups) > 1:  # never stack embeddings of different models, weights or geometry (rule 2)
        if by_provenance:
            return {
                label: _stack(
                    [parts[i] for i in idx], provs[idx[0]], join, key, name, out_dir, missing, fingerprints
                )
                for label, idx in groups.items()
            }
        desc = "; ".join(
            f"{label}: {[str(parts[i].obs['sample_id'].iloc[0]) for i in idx][:5]}"
            for label, idx in groups.items()
        )
        raise ValueError(
            f"load_cohort: the embedding files in {str(folder)!r} come from {len(groups)} different models, "
            f"weights or geometries and cannot be stacked ({desc}). Embed the samples again with one model and "
            "weights (embed_cohort(..., overwrite=True)), load a cohort of one group, or pass by_provenance=True "
            "for one AnnData per group."
        )
    adata = _stack(parts, provs[0], join, key, name, out_dir, missing, fingerprints)
    return {next(iter(groups)): adata} if by_provenance else adata


def _provenance_group(emb) -> str:
    """What embeddings must share to be stacked: model, weights, dims, µm/px and patch size (``?`` unknown)."""
    prov = emb.provenance or {}
    sha = str(prov.get("weights_sha256") or "?")
    return "|".join(
        [
            str(prov.get("model", "?")),
            sha.split(":")[-1][:12] if sha != "?" else sha,
            f"{emb.embeddings.shape[1]}d",
            f"{prov['mpp']:g} µm/px" if isinstance(prov.get("mpp"), int | float) else "? µm/px",
            f"{prov['patch_size']} px" if prov.get("patch_size") is not None else "? px",
        ]
    )


def _stack(parts, prov, join: str, key: str, name: str, out_dir, missing, fingerprints) -> ad.AnnData:
    """Concatenate samples of one provenance ``prov`` (their genes joined by ``join``)."""
    with_counts = [p.n_vars > 0 for p in parts]
    if any(with_counts) and not all(with_counts):
        logger.warning("load_cohort: some samples have no counts; returning embeddings only.")
        parts = [ad.AnnData(obs=p.obs, obsm=dict(p.obsm)) for p in parts]
    if all(with_counts) and join == "inner":
        common = set(parts[0].var_names).intersection(*(p.var_names for p in parts[1:]))
        if not common:
            ids = [str(p.obs["sample_id"].iloc[0]) for p in parts]
            pair = next(
                (
                    (ids[i], ids[j])
                    for i in range(len(parts))
                    for j in range(i + 1, len(parts))
                    if not set(parts[i].var_names) & set(parts[j].var_names)
                ),
                None,
            )
            which = (
                f"samples {pair[0]!r} and {pair[1]!r} have no gene in common"
                if pair
                else f"no gene is measured in all of {ids}"
            )
            raise ValueError(
                f"load_cohort: {which} (different gene namespaces, e.g. Ensembl ids and symbols, or species), so "
                "join='inner' leaves 0 genes. Map the genes to one namespace, load those samples separately, "
                "or pass join='outer' to keep every gene (unmeasured ones are 0)."
            )
    adata = ad.concat(parts, join=join, merge=None)
    if join == "outer" and all(with_counts):
        measured = pd.Series(0, index=adata.var_names)
        for p in parts:
            measured[p.var_names] += 1
        adata.var["n_samples_measured"] = measured.to_numpy()
    if all(with_counts) and adata.n_vars < max(p.n_vars for p in parts):
        logger.info(
            "load_cohort: %d genes are measured in every sample (of up to %d).",
            adata.n_vars,
            max(p.n_vars for p in parts),
        )
    for col in ("sample_id", "patient"):
        adata.obs[col] = pd.Categorical(adata.obs[col])
    samples = set(adata.obs["sample_id"].astype(str))
    adata.uns[UNS_KEY] = {
        "embeddings": {key: prov or {}},
        "cohort": {
            "model": name,
            "out_dir": str(Path(out_dir).absolute()),
            "samples": [s for s in fingerprints if s in samples],
            "missing": missing,
            "fingerprints": {s: f for s, f in fingerprints.items() if s in samples},
        },
    }
    return adata


def _sample_part(row: dict, emb, key: str, with_counts: bool) -> ad.AnnData:
    """One sample's rows of :func:`load_cohort`: its embeddings, centres and (``with_counts``) raw counts."""
    sid = row["sample_id"]
    patient = row.get("patient") or emb.provenance.get("patient") or sid
    obs = pd.DataFrame(
        {"sample_id": sid, "patient": str(patient), "barcode": emb.barcodes},
        index=[f"{sid}_{b}" for b in emb.barcodes],
    )
    c = read_counts(row) if with_counts else None
    if c is not None:
        absent = pd.Index(emb.barcodes).difference(c.obs_names)
        if len(absent):
            raise ValueError(
                f"sample {sid!r}: {len(absent)} embedded spots have no counts row, e.g. "
                f"{list(absent[:3])}; the embedding file and the counts belong to different data."
            )
        c = c[emb.barcodes]
        part = ad.AnnData(X=c.X, obs=obs, var=c.var)
    else:
        part = ad.AnnData(obs=obs)
    part.obsm[key] = emb.embeddings
    part.obsm["spatial"] = (
        emb.centers if emb.centers is not None else np.full((len(obs), 2), np.nan, dtype=np.float64)
    )
    return part
