"""Run the HEST-Benchmark: embed every sample once (cached), then probe every fold.

``protocol="hest"`` follows ``hest/bench/benchmark.py`` to the letter: folds as the split CSVs give them, the
test samples of a fold pooled into one set of spots, the 50 genes of ``var_50genes.json``, ``log1p`` of raw
counts, StandardScaler -> PCA(256) -> Ridge(lsqr, alpha = 100 / (256 * 50), no intercept) fitted on the
training spots only, Pearson per gene on the pooled test spots; per task the mean and (population) std over
folds of the per-fold mean Pearson, per gene the mean over folds.

``protocol="strict"`` keeps the folds but re-selects the 50 genes on each training fold only (largest variance
of log1p counts over the training spots, among genes measured in every sample of the task) and uses
``"ridge"`` (intercept, alpha per gene tuned by group-wise inner CV over training samples/patients).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import pandas as pd

from .._progress import tqdm
from ..io import read_hest_bench, read_patches
from ..tl import pearson_per_gene, target_matrix, top_variable_genes
from ..tl.linear import (
    HEST_N_COMPONENTS,
    check_embeddings,
    combine_stats,
    fit_hest_ridge_from_stats,
    fit_hest_ridge_sklearn,
    fit_ridge_cv,
    moment_stats,
)

logger = logging.getLogger(__name__)

PROTOCOLS = ("hest", "strict")


def _embed_patches(patches_path: str, model: str, *, weights=None, device=None) -> np.ndarray:
    """Encoder call for one patch file (the only place the benchmark touches the encoder)."""
    from ..pp import embed

    return np.asarray(embed(str(patches_path), model=model, weights=weights, device=device), dtype=np.float32)


def _cache_fingerprint(patches_path, model, weights) -> str:
    """What the cached embeddings were computed from: the patch file (path, size, mtime), model and weights."""
    st = Path(patches_path).stat()
    return f"{Path(patches_path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{model}|{weights}"


def _cached_embeddings(cache: Path, patches_path, model, weights, device) -> tuple[np.ndarray, np.ndarray]:
    fingerprint = _cache_fingerprint(patches_path, model, weights)
    if cache.is_file():
        with h5py.File(cache, "r") as f:
            stale = f.attrs.get("fingerprint") != fingerprint
            if not stale:
                X = f["embeddings"][:]
                bc = np.array([b.decode() for b in f["barcodes"][:]])
        if not stale:
            logger.info("Using cached embeddings %s", cache)
            return X, bc
        logger.warning(
            "Cached embeddings %s were computed from other patches or weights: recomputing.", cache
        )
    X = _embed_patches(patches_path, model, weights=weights, device=device)
    bc = read_patches(patches_path).barcodes
    if X.shape[0] != len(bc):
        raise ValueError(f"Encoder returned {X.shape[0]} embeddings for {len(bc)} patches in {patches_path}.")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.h5")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("embeddings", data=X)
        f.create_dataset("barcodes", data=np.array([b.encode() for b in bc]))
        f.attrs["model"] = model
        f.attrs["patches_path"] = str(patches_path)
        f.attrs["fingerprint"] = fingerprint
    os.replace(tmp, cache)
    return X, bc


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _list_tasks(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "splits").is_dir())


def _load_task(root, task, model, emb_dir, weights, device):
    """Per sample: embeddings (patch order), the count table aligned to them, the patient id."""
    sdata = read_hest_bench(root, task)
    info = sdata.attrs["hest_bench"]
    samples = {}
    for sid, ppath in tqdm(info["patches"].items(), desc=f"{task}: embeddings", leave=False):
        X, bc = _cached_embeddings(Path(emb_dir) / task / model / f"{sid}.h5", ppath, model, weights, device)
        dtype = np.asarray(X).dtype  # HEST feeds its scikit-learn pipeline the stored (float32) embeddings
        X = check_embeddings(X, name=f"embeddings of sample {sid!r} ({task})")
        table = sdata.tables[sid]
        missing = pd.Index(bc).difference(table.obs_names)
        if len(missing):
            raise ValueError(
                f"{task}/{sid}: {len(missing)} patch barcodes have no expression row, e.g. {list(missing[:3])}."
            )
        table = table[bc]  # HEST subsets the expression by the embedding barcodes, in their order
        patient = str(table.obs["patient"].iloc[0]) if "patient" in table.obs else sid
        samples[sid] = {"X": X, "table": table, "patient": patient, "dtype": dtype}
    return info, samples


def _fold_arrays(samples, ids, genes, what):
    Xs, Ys, groups = [], [], []
    for sid in ids:
        s = samples[sid]
        Xs.append(s["X"])
        Ys.append(target_matrix(s["table"], genes, target="log1p").astype(np.float64))
        groups.append(np.full(s["X"].shape[0], s["patient"]))
    return np.vstack(Xs), np.vstack(Ys), np.concatenate(groups)


def _check_fold(n_train, n_genes, task, i):
    if n_train < n_genes:
        raise ValueError(
            f"{task} fold {i}: {n_train} training spots for {n_genes} genes; need at least as many spots as "
            "genes. Check the split files."
        )


def _run_hest(task, info, samples, solver, seed):
    genes = list(info["genes"])
    stats = {}
    folds = []
    for i, split in enumerate(info["splits"]):
        _check_fold(sum(samples[s]["X"].shape[0] for s in split["train"]), len(genes), task, i)
        X_te, Y_te, _ = _fold_arrays(samples, split["test"], genes, "test")
        if solver == "sklearn":
            X_tr, Y_tr, _ = _fold_arrays(samples, split["train"], genes, "train")
            dtype = np.result_type(*(samples[s]["dtype"] for s in [*split["train"], *split["test"]]))
            pipe = fit_hest_ridge_sklearn(X_tr.astype(dtype), Y_tr, n_components=HEST_N_COMPONENTS, seed=seed)
            pred = pipe.predict(X_te.astype(dtype))
        else:
            for sid in split["train"]:
                if sid not in stats:  # moments of each sample computed once, pooled per fold
                    X, Y, _ = _fold_arrays(samples, [sid], genes, "train")
                    stats[sid] = moment_stats(X, Y)
            lin = fit_hest_ridge_from_stats(combine_stats([stats[s] for s in split["train"]]))
            pred = lin.predict(X_te)
        folds.append({"genes": genes, "pearson": pearson_per_gene(Y_te, pred)})
    return folds


def _strict_genes(samples, train_ids, n_genes):
    """Top-``n_genes`` variance of log1p counts over the training spots, among genes measured in every sample."""
    common = None
    for sid in samples:
        names = samples[sid]["table"].var_names
        common = names if common is None else common.intersection(names, sort=False)
    if len(common) < n_genes:
        raise ValueError(f"Only {len(common)} genes are measured in every sample; cannot select {n_genes}.")
    return top_variable_genes([samples[s]["table"] for s in train_ids], n_genes, target="log1p", genes=common)


def _run_strict(task, info, samples, n_genes):
    folds = []
    for i, split in enumerate(info["splits"]):
        genes = _strict_genes(samples, split["train"], n_genes)
        X_tr, Y_tr, g_tr = _fold_arrays(samples, split["train"], genes, "train")
        _check_fold(X_tr.shape[0], len(genes), task, i)
        X_te, Y_te, _ = _fold_arrays(samples, split["test"], genes, "test")
        groups = g_tr if len(np.unique(g_tr)) >= 2 else None
        lin, _ = fit_ridge_cv(X_tr, Y_tr, groups=groups)
        folds.append({"genes": genes, "pearson": pearson_per_gene(Y_te, lin.predict(X_te))})
    return folds


def _summarise(task, model, protocol, folds):
    per_split = [float(np.mean(f["pearson"])) for f in folds]
    by_gene: dict[str, list[float]] = {}
    for f in folds:
        for g, r in zip(f["genes"], f["pearson"]):
            by_gene.setdefault(g, []).append(float(r))
    row = {
        "task": task,
        "model": model,
        "protocol": protocol,
        "pearson_mean": float(np.mean(per_split)),
        "pearson_std": float(np.std(per_split)),
        "n_folds": len(folds),
    }
    per_gene = pd.DataFrame(
        [
            {"task": task, "model": model, "protocol": protocol, "gene": g, "pearson": float(np.mean(v))}
            for g, v in by_gene.items()
        ]
    )
    kfold = {  # the shape of HEST's results_kfold.json
        "pearson_corrs": sorted(
            [
                {"name": g, "pearson_corrs": v, "mean": float(np.mean(v)), "std": float(np.std(v))}
                for g, v in by_gene.items()
            ],
            key=lambda d: d["mean"],
            reverse=True,
        ),
        "pearson_mean": row["pearson_mean"],
        "pearson_std": row["pearson_std"],
        "mean_per_split": per_split,
    }
    return row, per_gene, kfold


def run(
    root: str | os.PathLike,
    *,
    tasks: str | Sequence[str] | None = None,
    model: str = "h-optimus-1",
    protocol: Literal["hest", "strict", "both"] = "hest",
    embeddings_dir: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    device: str | None = None,
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    solver: Literal["fast", "sklearn"] = "fast",
    n_genes: int = 50,
) -> pd.DataFrame:
    """Run the HEST-Benchmark for one encoder.

    Parameters
    ----------
    root
        Folder holding the task folders (as written by :func:`hopt_st.bench.download`).
    tasks
        Tasks to run; default every task folder under ``root``.
    model
        Encoder name in :mod:`hopt_st.models`.
    protocol
        See the module docstring.
    embeddings_dir
        Cache of embeddings, one ``<task>/<model>/<sample>.h5`` per sample (reused when present). Default
        ``out_dir/embeddings`` or, without ``out_dir``, ``~/.cache/hopt_st/hest_bench``.
    weights, device
        Passed to the encoder.
    out_dir
        Where to write ``<task>/<model>/<protocol>/results_kfold.json`` (and ``split{i}/results.json``),
        ``<protocol>/dataset_results.json`` (HEST's shapes), ``results.csv`` and ``results.md``.
    seed
        Seed (PCA of the scikit-learn solver; recorded in the provenance).
    solver
        ``"hest"`` protocol: the fast implementation or HEST's scikit-learn pipeline itself.
    n_genes
        Genes per fold for ``"strict"``.

    Returns
    -------
    pandas.DataFrame
        One row per (task, model, protocol): ``task, model, protocol, pearson_mean, pearson_std, n_folds``.
        ``attrs["per_gene"]``: columns ``task, model, protocol, gene, pearson`` (mean over folds);
        ``attrs["average"]``: ``{protocol: mean over tasks}``; ``attrs["folds"]``: per fold its genes and mean Pearson; ``attrs["provenance"]``.
    """
    from .. import __version__

    protocols = list(PROTOCOLS) if protocol == "both" else [protocol]
    if any(p not in PROTOCOLS for p in protocols):
        raise ValueError(f"protocol={protocol!r} must be 'hest', 'strict' or 'both'.")
    if solver not in ("fast", "sklearn"):
        raise ValueError(f"solver={solver!r} must be 'fast' or 'sklearn'.")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"HEST-Benchmark root {str(root)!r} does not exist; see hopt_st.bench.download."
        )
    tasks = _list_tasks(root) if tasks is None else ([tasks] if isinstance(tasks, str) else list(tasks))
    if not tasks:
        raise FileNotFoundError(f"No task folder (with a splits/ folder) under {str(root)!r}.")
    if embeddings_dir is None:
        embeddings_dir = (
            Path(out_dir) / "embeddings" if out_dir else Path.home() / ".cache" / "hopt_st" / "hest_bench"
        )
    rows, per_gene, kfolds, fold_rows = [], [], {}, []
    for task in tqdm(tasks, desc="HEST-Benchmark tasks"):
        info, samples = _load_task(root, task, model, embeddings_dir, weights, device)
        for p in protocols:
            folds = (
                _run_hest(task, info, samples, solver, seed)
                if p == "hest"
                else _run_strict(task, info, samples, n_genes)
            )
            row, pg, kfold = _summarise(task, model, p, folds)
            rows.append(row)
            per_gene.append(pg)
            kfolds[(task, p)] = (kfold, folds)
            for i, f in enumerate(folds):
                fold_rows.append(
                    {
                        "task": task,
                        "protocol": p,
                        "fold": i,
                        "genes": list(f["genes"]),
                        "pearson_mean": float(np.mean(f["pearson"])),
                    }
                )
            logger.info("%s / %s / %s: mean Pearson %.4f", task, model, p, row["pearson_mean"])
    df = pd.DataFrame(rows, columns=["task", "model", "protocol", "pearson_mean", "pearson_std", "n_folds"])
    df.attrs["per_gene"] = pd.concat(per_gene, ignore_index=True)
    df.attrs["folds"] = fold_rows
    df.attrs["average"] = {p: float(df.loc[df.protocol == p, "pearson_mean"].mean()) for p in protocols}
    weights_sha = None
    if weights is not None and Path(weights).is_file():
        weights_sha = _sha256(weights)
    df.attrs["provenance"] = {
        "hopt_st_version": __version__,
        "model": model,
        "weights": None if weights is None else str(weights),
        "weights_sha256": weights_sha,
        "protocol": protocol,
        "solver": solver,
        "seed": seed,
        "n_components": HEST_N_COMPONENTS,
        "tasks": tasks,
        "root": str(root),
        "embeddings_dir": str(embeddings_dir),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if out_dir is not None:
        _write_outputs(Path(out_dir), df, kfolds, model, protocols)
    return df


def _write_outputs(out: Path, df, kfolds, model, protocols):
    out.mkdir(parents=True, exist_ok=True)
    for (task, p), (kfold, folds) in kfolds.items():
        d = out / task / model / p
        d.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(folds):
            (d / f"split{i}").mkdir(exist_ok=True)
            res = {
                "pearson_corrs": [
                    {"name": g, "pearson_corr": float(r)} for g, r in zip(f["genes"], f["pearson"])
                ],
                "pearson_mean": float(np.mean(f["pearson"])),
                "pearson_std": float(np.std(f["pearson"])),
            }
            (d / f"split{i}" / "results.json").write_text(json.dumps(res, indent=4, sort_keys=True))
        (d / "results_kfold.json").write_text(json.dumps(kfold, indent=4, sort_keys=True))
    for p in protocols:
        sub = df[df.protocol == p]
        dataset_results = {
            "results": [
                {
                    "dataset_name": r.task,
                    "results": [
                        {"encoder_name": model, "pearson_mean": r.pearson_mean, "pearson_std": r.pearson_std}
                    ],
                }
                for r in sub.itertuples()
            ],
            "average": {model: float(sub.pearson_mean.mean())},
        }
        (out / p).mkdir(exist_ok=True)
        (out / p / "dataset_results.json").write_text(json.dumps(dataset_results, indent=4, sort_keys=True))
    df.to_csv(out / "results.csv", index=False)
    df.attrs["per_gene"].to_csv(out / "results_per_gene.csv", index=False)
    (out / "provenance.json").write_text(json.dumps(df.attrs["provenance"], indent=2))
    (out / "results.md").write_text(markdown_table(df) + "\n")


def markdown_table(df: pd.DataFrame) -> str:
    """Results as a Markdown table, tasks as columns (like HEST's README), one row per model and protocol,
    ``mean ± std`` over folds and an ``Average`` column (mean over tasks)."""
    tasks = list(dict.fromkeys(df["task"]))
    header = "| model | protocol | " + " | ".join(tasks) + " | Average |"
    sep = "|" + "---|" * (len(tasks) + 3)
    lines = [header, sep]
    for (m, p), sub in df.groupby(["model", "protocol"], sort=False):
        cells = []
        for t in tasks:
            r = sub[sub.task == t]
            cells.append("" if r.empty else f"{r.pearson_mean.iloc[0]:.3f} ± {r.pearson_std.iloc[0]:.3f}")
        lines.append(f"| {m} | {p} | " + " | ".join(cells) + f" | {sub.pearson_mean.mean():.3f} |")
    return "\n".join(lines)
