"""Run the HEST-Benchmark: embed each sample once (cached in the files :func:`hopt_st.pp.embed_cohort` writes,
HEST's embedding-file layout), then probe every fold.

``protocol="hest"`` is HEST's own benchmark, to its arithmetic (github.com/mahmoodlab/HEST at ``afd42c3``,
``src/hest/bench/benchmark.py`` + ``trainer.py`` + ``st_dataset.py``; see :mod:`hopt_st.tl.linear`): folds as
the split files give them, the samples of each side pooled in split-file order (spots in embedding-file
order), the genes of ``var_50genes.json``, float64 ``log1p`` of the stored counts, ``StandardScaler -> PCA(256,
random_state=seed) -> Ridge(lsqr, alpha = 100 / (256 * 50), no intercept)`` fitted on the training spots,
Pearson per gene on the pooled test spots; per task the mean and (population) std over folds of the fold means.

``protocol="strict"`` keeps the folds but re-selects the 50 genes on each training fold only (largest variance
of log1p counts over the training spots, among genes measured in every sample of the task) and uses
``"ridge"`` (intercept, alpha per gene tuned by group-wise inner CV over training samples/patients).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._atomic import path_inside
from .._progress import tqdm
from ..io import read_cohort, read_embeddings, read_hest_bench
from ..io._cohort import model_dirname
from ..io._embeddings import written_by_hopt_st
from ..models._weights import weights_sha256
from ..tl import target_matrix, top_variable_genes
from ..tl._hest_fast import combine_stats, fit_from_stats, moment_stats, replays_pca
from ..tl.linear import _HEST_N_COMPONENTS as HEST_N_COMPONENTS
from ..tl.linear import _HEST_SEED as HEST_SEED
from ..tl.linear import _HEST_SOLVERS as HEST_SOLVERS
from ..tl.linear import _check_embeddings as check_embeddings
from ..tl.linear import fit_ridge_cv, hest_probe
from ._download import KNOWN_N_FOLDS, match_task
from ._results import atomic_write_text, probe_results, rebuild_aggregates, write_encoder_results

logger = logging.getLogger(__name__)

PROTOCOLS = ("hest", "strict")
RESULT_COLUMNS = [
    "task",
    "model",
    "protocol",
    "pearson_mean",
    "pearson_std",
    "n_folds",
    "hest_comparable",
    "note",
]


# ------------------------------------------------------------------------------------------------- embeddings
class _Embedder:
    """The model of a run, resolved (spec, weight file and its sha256) only when a sample needs embedding or a
    file of hopt_st's needs checking: a run over files HEST wrote looks nothing up, for any model name."""

    def __init__(self, model: str, weights, device):
        self.name, self.weights, self.device = model, weights, device
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from ..pp._cohort import cohort_model

            self._model = cohort_model(self.name, self.weights)
        return self._model

    @property
    def weights_sha256(self) -> str | None:
        """The weight file's sha256 once resolved; ``None`` before, or for a model without weights."""
        sha = None if self._model is None else self._model.weights_sha256
        return None if sha == "none" else sha

    def job(self, row: dict, path: Path, overwrite: bool):
        from ..pp._cohort import sample_job

        return sample_job(row, self.model, path, device=self.device, overwrite=overwrite)


def _sample_embeddings(
    path: Path, row: dict, embedder: _Embedder, overwrite: bool = False
) -> tuple[np.ndarray, np.ndarray, str]:
    """One sample's embeddings and barcodes, and where they came from (``"file"``, ``"cache"``, ``"computed"``).

    The file at ``path`` is the one :func:`hopt_st.pp.embed_cohort` writes for this sample (same writer, same
    fingerprint), so either reuses the other's. A file hopt_st did not write (e.g. HEST's own) is read as it
    is and never replaced; an error names it when it cannot be read. A file of hopt_st's is reused when its
    fingerprint matches; one with another fingerprint is refused as ``embed_cohort`` refuses it (naming the
    parts that differ) unless ``overwrite``; an unreadable one is recomputed with a warning.
    """
    from ..pp._cohort import embed_sample, other_fingerprint_message

    job = None
    if path.exists():
        ours = written_by_hopt_st(path)
        try:
            emb = read_embeddings(path, dtype=None)  # HEST feeds its pipeline the stored dtype
        except ValueError as err:
            if not ours:
                raise
            logger.warning("Cached embeddings %s are unreadable; recomputing them. (%s)", path, err)
        else:
            if not ours and emb.fingerprint is None:
                logger.info("Using embeddings %s as they are (not written by hopt_st, never replaced).", path)
                return emb.embeddings, emb.barcodes, "file"
            try:
                job = embedder.job(row, path, overwrite=True)  # only ever a file of ours: stale or unreadable
            except KeyError as err:  # an unregistered model: the file cannot be checked
                raise ValueError(
                    f"{str(path)!r} was written by hopt_st, but its model cannot be checked: {err.args[0]} "
                    "Register the model, or delete the file to use HEST's (or your own) embeddings there."
                ) from None
            if emb.fingerprint == job.fingerprint:
                logger.info("Using cached embeddings %s", path)
                return emb.embeddings, emb.barcodes, "cache"
            if not overwrite:
                raise ValueError(other_fingerprint_message(path, job))
            logger.warning("Embeddings %s were computed with another fingerprint: replacing them.", path)
    embed_sample(job or embedder.job(row, path, overwrite=path.exists()))
    emb = read_embeddings(path, dtype=None)
    return emb.embeddings, emb.barcodes, "computed"


# ------------------------------------------------------------------------------------------------- tasks
def _task_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "splits").is_dir())


def _resolve_tasks(root: Path, tasks) -> list[str]:
    """Task folder names under ``root`` for the requested tasks (any case, README aliases; default: all)."""
    if (root / "splits").is_dir():  # root is a task folder itself
        present, base = [root.name], root.parent
    else:
        present, base = _task_folders(root), root
    if tasks is None:
        if not present:
            raise FileNotFoundError(
                f"No task folder (with a splits/ folder) under {str(root)!r}: pass the folder of a HEST-Benchmark "
                "download (hs.bench.download(root) writes ROOT/<task>/splits, patches, adata, var_50genes.json)."
            )
        return present
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks or any(not str(t).strip() for t in tasks):
        raise ValueError(f"tasks={tasks!r}: give task names, e.g. ['IDC', 'CCRCC'], or None for all tasks.")
    found = []
    for t in tasks:
        folder = match_task(str(t), present)
        if folder is None:
            raise FileNotFoundError(
                f"HEST-Benchmark task {t!r} not found under {str(base)!r}; task folders present: {present}. "
                "Download it with hopt_st.bench.download(root, [task])."
            )
        found.append(folder)
    return list(dict.fromkeys(found))


def _check_fold_count(task: str, info: dict) -> None:
    """Folds come from the train_<i>/test_<i> pairs on disk; say so when HEST or the manifest would count otherwise."""
    n = len(info["splits"])
    sdir = Path(info["root"]) / "splits"
    hest_n = len(os.listdir(sdir)) // 2
    if hest_n != n:
        logger.warning(
            "%s: %d train/test split pairs in %s, but HEST's code counts len(os.listdir(splits)) // 2 = %d folds "
            "(other files in that folder?).",
            task,
            n,
            sdir,
            hest_n,
        )
    known = KNOWN_N_FOLDS.get(task)
    if known is not None and known != n:
        logger.warning(
            "%s: %d folds on disk, but hest-bench's %s has %d (data_manifests/hest_bench); the download may be "
            "incomplete or from another revision.",
            task,
            n,
            task,
            known,
        )


def _hest_targets(table, genes, where: str) -> np.ndarray:
    """HEST's targets (``load_adata(..., normalize=True).values``): the stored counts of ``genes``, as float64,
    then ``log1p``."""
    idx = table.var_names.get_indexer(genes)
    missing = [g for g, i in zip(genes, idx) if i < 0]
    if missing:
        raise ValueError(
            f"{where}: {len(missing)} genes of var_50genes.json are not in the expression file, e.g. {missing[:5]}."
        )
    M = table.X[:, idx]
    M = M.toarray() if sp.issparse(M) else np.asarray(M)
    return np.log1p(M.astype(np.float64))


def _load_task(root, task, emb_dir, embedder: _Embedder, overwrite: bool = False):
    """Per sample: embeddings (stored dtype, embedding-file order), its expression rows, HEST's targets, patient.

    The embedding files are ``<emb_dir>/<task>/<model>/<sample>.h5``: what
    ``hopt_st.pp.embed_cohort(<task folder>, model, <emb_dir>/<task>)`` writes."""
    sdata = read_hest_bench(root, task)
    info = sdata.attrs["hest_bench"]
    patch_files = pd.DataFrame(
        {"sample_id": list(info["patches"]), "source": list(info["patches"].values()), "kind": "patches"}
    )
    rows = read_cohort(patch_files).to_dict("records")  # the rows embed_cohort reads from the task folder
    _check_scorable(task, info, sdata)  # before any embedding is computed
    folder = Path(emb_dir) / task / model_dirname(embedder.name)
    samples, sources = {}, {}
    for row in tqdm(rows, desc=f"{task}: embeddings", leave=False):
        sid = row["sample_id"]
        efile = folder / f"{sid}.h5"
        X, bc, sources[sid] = _sample_embeddings(efile, row, embedder, overwrite)
        X = check_embeddings(X, name=f"embeddings of sample {sid!r} ({efile})", keep_dtype=True)
        table = sdata.tables[sid]
        missing = pd.Index(bc).difference(table.obs_names)
        if len(missing):
            raise ValueError(
                f"{efile}: {len(missing)} barcodes have no row in the expression file of sample {sid!r} "
                f"({task}), e.g. {list(missing[:3])}: the embeddings belong to other patches."
            )
        table = table[bc]  # HEST subsets the expression by the embedding barcodes, in their order
        patient = str(table.obs["patient"].iloc[0]) if "patient" in table.obs else sid
        Y = _hest_targets(table, info["genes"], f"sample {sid!r} ({task})")
        samples[sid] = {"X": X, "Y": Y, "table": table, "patient": patient}
    return info, samples, sources


def _check_scorable(task, info, sdata) -> None:
    """Every fold's test spots give every gene a Pearson r (at least 2 spots, no gene with one value over all of
    them), else a ValueError naming the task, fold, samples and genes -- not a NaN task mean."""
    genes = list(info["genes"])
    targets: dict[str, np.ndarray] = {}
    for i, split in enumerate(info["splits"]):
        test = [str(s) for s in split["test"]]
        for s in test:
            if s not in targets:
                targets[s] = _hest_targets(sdata.tables[s], genes, f"sample {s!r} ({task})")
        Y = np.concatenate([targets[s] for s in test], axis=0)
        if len(Y) < 2:
            raise ValueError(
                f"{task} fold {i}: the test sample(s) {test} hold {len(Y)} spot; a Pearson correlation needs at "
                f"least 2 test spots. Add samples to splits/test_{i}.csv, or leave {task} out (tasks=/--tasks)."
            )
        const = np.flatnonzero((Y == Y[:1]).all(axis=0))
        if const.size:
            named = {genes[j]: float(np.expm1(Y[0, j])) for j in const[:10]}
            raise ValueError(
                f"{task} fold {i}: gene(s) {named} (gene: its one count) have the same value at every test spot "
                f"of sample(s) {test}, so their Pearson r is undefined and the task's mean would be NaN. Remove "
                f"them from the task's var_50genes.json, or give fold {i} test samples that express them."
            )


def _check_embeddings_vary(task, i, samples, ids) -> None:
    """Refuse a fold whose training embeddings are all one vector: no regressor can learn from them."""
    first = next(iter(samples[s]["X"] for s in ids if len(samples[s]["X"])), None)
    if first is None:
        return
    if all(np.array_equal(samples[s]["X"], np.broadcast_to(first[:1], samples[s]["X"].shape)) for s in ids):
        raise ValueError(
            f"{task} fold {i}: the embeddings of every training spot of {list(ids)} are one and the same vector, "
            "so every prediction is the same and every Pearson r undefined (NaN). The encoder ignores the "
            "image: check its weights (--weights) and that the patches are not blank, then delete these "
            "embedding files and run again."
        )


# ------------------------------------------------------------------------------------------------- protocols
def _check_fold(n_train, n_genes, task, i):
    if n_train < n_genes:
        raise ValueError(
            f"{task} fold {i}: {n_train} training spots for {n_genes} genes; need at least as many spots as "
            "genes. Check the split files."
        )


def _stack(samples, ids, key):
    return np.concatenate([samples[s][key] for s in ids], axis=0)  # HEST: np.concatenate(..., axis=0)


def _fold(genes, pred, Y_te, n_train, k):
    return {
        "genes": list(genes),
        "results": probe_results(genes, pred, Y_te),
        "n_train": int(n_train),
        "n_test": int(len(Y_te)),
        "n_components": k,
    }


def _run_hest(task, info, samples, solver, seed):
    genes = list(info["genes"])
    stats = {}
    folds = []
    for i, split in enumerate(info["splits"]):
        n_train = sum(len(samples[s]["Y"]) for s in split["train"])
        _check_fold(n_train, len(genes), task, i)
        X_te, Y_te = _stack(samples, split["test"], "X"), _stack(samples, split["test"], "Y")
        if solver == "fast" and replays_pca(n_train, X_te.shape[1]):
            for sid in split["train"]:
                if sid not in stats:  # moments of each sample computed once, pooled per fold
                    stats[sid] = moment_stats(samples[sid]["X"], samples[sid]["Y"])
            dtype = np.result_type(*(samples[s]["X"].dtype for s in split["train"]))
            lin = fit_from_stats(combine_stats([stats[s] for s in split["train"]]), seed=seed, dtype=dtype)
            pred, k = lin.predict(X_te), min(HEST_N_COMPONENTS, n_train, X_te.shape[1])
        else:
            X_tr, Y_tr = _stack(samples, split["train"], "X"), _stack(samples, split["train"], "Y")
            pred, k = hest_probe(X_tr, Y_tr, X_te, seed=seed)  # "fast" cannot replay this PCA: exact path
        folds.append(_fold(genes, pred, Y_te, n_train, k))
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


def _strict_arrays(samples, ids, genes):
    X = np.vstack([samples[s]["X"] for s in ids]).astype(np.float64)
    Y = np.vstack([target_matrix(samples[s]["table"], genes, target="log1p") for s in ids]).astype(np.float64)
    groups = np.concatenate([np.full(len(samples[s]["X"]), samples[s]["patient"]) for s in ids])
    return X, Y, groups


def _run_strict(task, info, samples, n_genes):
    folds = []
    for i, split in enumerate(info["splits"]):
        genes = _strict_genes(samples, split["train"], n_genes)
        X_tr, Y_tr, g_tr = _strict_arrays(samples, split["train"], genes)
        _check_fold(X_tr.shape[0], len(genes), task, i)
        X_te, Y_te, _ = _strict_arrays(samples, split["test"], genes)
        lin, _ = fit_ridge_cv(X_tr, Y_tr, groups=g_tr if len(np.unique(g_tr)) >= 2 else None)
        folds.append(_fold(genes, lin.predict(X_te), Y_te, len(Y_tr), None))
    return folds


def _comparability(protocol: str, folds, dim: int) -> str | None:
    """Why a result cannot be compared with HEST's own numbers, or ``None``."""
    if protocol == "strict":
        return "protocol 'strict' (genes and ridge penalty chosen on the training folds), not HEST's protocol"
    k = min(f["n_components"] for f in folds)
    if k < HEST_N_COMPONENTS:
        why = (
            f"the embeddings have {dim} dimensions" if dim < HEST_N_COMPONENTS else "a fold has too few spots"
        )
        return (
            f"PCA capped at {k} components because {why} (HEST's code needs {HEST_N_COMPONENTS} and raises), "
            f"and the ridge penalty is 100 / ({k} * n_genes)"
        )
    return None


def _summarise(task, model, protocol, folds, note):
    kres = [f["results"] for f in folds]
    per_split = [r["pearson_mean"] for r in kres]
    row = {
        "task": task,
        "model": model,
        "protocol": protocol,
        "pearson_mean": float(np.mean(per_split)),
        "pearson_std": float(np.std(per_split)),
        "n_folds": len(folds),
        "hest_comparable": note is None,
        "note": note or "",
    }
    by_gene: dict[str, list[float]] = {}
    for r in kres:
        for item in r["pearson_corrs"]:
            by_gene.setdefault(item["name"], []).append(item["pearson_corr"])
    per_gene = pd.DataFrame(
        [
            {"task": task, "model": model, "protocol": protocol, "gene": g, "pearson": float(np.mean(v))}
            for g, v in by_gene.items()
        ]
    )
    fold_rows = [
        {
            "task": task,
            "protocol": protocol,
            "fold": i,
            "genes": f["genes"],
            "pearson_mean": f["results"]["pearson_mean"],
            "n_train": f["n_train"],
            "n_test": f["n_test"],
            "n_components": f["n_components"],
        }
        for i, f in enumerate(folds)
    ]
    return row, per_gene, fold_rows


# ------------------------------------------------------------------------------------------------- run
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
    seed: int = HEST_SEED,
    solver: Literal["exact", "fast"] = "exact",
    n_genes: int = 50,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Run the HEST-Benchmark for one encoder.

    Parameters
    ----------
    root
        Folder holding the task folders (as written by :func:`hopt_st.bench.download`), or one task folder.
    tasks
        Tasks to run, by folder name or HEST's README name, any case (``"ccRCC"`` finds the folder ``CCRCC``,
        ``"LUAD"`` finds ``LUNG``); default every task folder under ``root``. Results use the folder names.
    model
        Encoder name: a :mod:`hopt_st.models` name, or any name when its embeddings are already in
        ``embeddings_dir`` (nothing is then looked up or computed).
    protocol
        ``"hest"``, ``"strict"`` or ``"both"``; see the module docstring.
    embeddings_dir
        HEST's ``embed_dataroot``: one ``<task>/<model>/<sample>.h5`` per sample, in HEST's embedding-file layout
        (datasets ``embeddings``, ``barcodes`` (N, 1), ``coords``). Files HEST (or anyone) wrote are read as they
        are and never replaced. Missing ones are computed and written there by the per-sample task of
        :func:`hopt_st.pp.embed_cohort` (atomically, with its fingerprint and provenance attributes; the
        encoder is built once per run), so ``embed_cohort(<root>/<task>, model, <embeddings_dir>/<task>)``
        writes exactly the files this reads, e.g. on a Dask cluster beforehand, and either reuses the other's
        files until the patch files (name, size, modification time), model or weights change; a stale file of
        hopt_st's is refused without ``overwrite`` and an unreadable one recomputed. Default ``out_dir/embeddings`` or, without ``out_dir``,
        ``~/.cache/hopt_st/hest_bench``.
    weights, device
        Passed to the encoder (``weights``: default the model's Hugging Face file).
    out_dir
        Where to write results: one results tree per protocol in HEST's layout, ``<out_dir>/<protocol>/``
        (``dataset_results.json``, ``dataset_results.csv``, ``<task>/enc_results.json``,
        ``<task>/<model>/results_kfold.json``, ``<task>/<model>/split<i>/{config,results,summary}.json``; a tree
        may hold several models), and beside them ``results.csv``, ``results_per_gene.csv``, ``results.md`` and
        ``provenance.json`` (all models run into ``out_dir``).
    seed
        ``PCA(random_state=seed)``; HEST's default is 1.
    solver
        ``"hest"`` protocol: ``"exact"`` (default; HEST's arithmetic, equal to its code to rounding) or
        ``"fast"`` (opt-in: from per-sample moments; cost independent of the number of spots, differs from
        HEST's code by its float32 rounding, amplified by LSQR's early stop; see ``hopt_st/tl/_hest_fast.py``).
    n_genes
        Genes per fold for ``"strict"``.
    overwrite
        Replace results of this model for these tasks and protocols already in ``out_dir``, and embedding files
        of hopt_st's in ``embeddings_dir`` computed with another fingerprint (without it they are refused, as
        :func:`hopt_st.pp.embed_cohort` refuses them, naming the part that differs: model, weights, geometry
        or source files). Files hopt_st did not write are never replaced.

    Returns
    -------
    pandas.DataFrame
        One row per (task, model, protocol): ``task, model, protocol, pearson_mean, pearson_std, n_folds,
        hest_comparable, note`` (``hest_comparable`` is False, with the reason in ``note``, when the number cannot
        be compared with HEST's: embeddings with fewer than 256 dimensions, or the strict protocol).
        ``attrs["per_gene"]``: columns ``task, model, protocol, gene, pearson`` (mean over folds);
        ``attrs["average"]``: ``{protocol: mean over tasks}``; ``attrs["folds"]``: per fold its genes, mean
        Pearson, ``n_train``, ``n_test`` and PCA components; ``attrs["provenance"]``.
    """
    from .. import __version__

    protocols = list(PROTOCOLS) if protocol == "both" else [protocol]
    if any(p not in PROTOCOLS for p in protocols):
        raise ValueError(f"protocol={protocol!r} must be 'hest', 'strict' or 'both'.")
    if solver not in HEST_SOLVERS:
        raise ValueError(f"solver={solver!r} must be one of {HEST_SOLVERS}.")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"HEST-Benchmark root {str(root)!r} does not exist; see hopt_st.bench.download."
        )
    task_list = _resolve_tasks(root, tasks)
    if (
        out_dir is not None
    ):  # results go to <out_dir>/<protocol>/<task>/<model>: never outside out_dir (rule 4)
        for p in protocols:
            for t in task_list:
                path_inside(Path(out_dir) / p / t, model, what="results")
    if out_dir is not None and not overwrite:
        done = [
            f"{p}/{t}/{model}"
            for p in protocols
            for t in task_list
            if (Path(out_dir) / p / t / model / "results_kfold.json").exists()
        ]
        if done:
            raise ValueError(
                f"Results of model {model!r} already exist in {str(out_dir)!r} ({done}); pass overwrite=True "
                "(--overwrite) to replace them, or choose another out_dir."
            )
    if embeddings_dir is None:
        embeddings_dir = (
            Path(out_dir) / "embeddings" if out_dir else Path.home() / ".cache" / "hopt_st" / "hest_bench"
        )
    rows, per_gene, fold_rows, results, sources, dims = [], [], [], {}, {}, {}
    embedder = _Embedder(model, weights, device)
    for task in tqdm(task_list, desc="HEST-Benchmark tasks"):
        info, samples, sources[task] = _load_task(root, task, embeddings_dir, embedder, overwrite)
        _check_fold_count(task, info)
        for i, split in enumerate(info["splits"]):  # the embeddings of every protocol: checked once
            _check_embeddings_vary(task, i, samples, split["train"])
        dims[task] = int(next(iter(samples.values()))["X"].shape[1])
        for p in protocols:
            folds = (
                _run_hest(task, info, samples, solver, seed)
                if p == "hest"
                else _run_strict(task, info, samples, n_genes)
            )
            note = _comparability(p, folds, dims[task])
            row, pg, fr = _summarise(task, model, p, folds, note)
            rows.append(row)
            per_gene.append(pg)
            fold_rows.extend(fr)
            results[(task, p)] = (folds, note)
            logger.info("%s / %s / %s: mean Pearson %.4f", task, model, p, row["pearson_mean"])
            if note:
                logger.warning("%s / %s / %s is not HEST-comparable: %s.", task, model, p, note)
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    df.attrs["per_gene"] = pd.concat(per_gene, ignore_index=True)
    df.attrs["folds"] = fold_rows
    df.attrs["average"] = {p: float(df.loc[df.protocol == p, "pearson_mean"].mean()) for p in protocols}
    df.attrs["provenance"] = _provenance(
        __version__, embedder, protocol, solver, seed, task_list, root, embeddings_dir, sources, df
    )
    if out_dir is not None:
        config = {
            "bench_data_root": str(root),
            "embed_dataroot": str(embeddings_dir),
            "results_dir": str(out_dir),
            "weights_root": None if weights is None else str(weights),
            "overwrite": overwrite,
            "seed": seed,
            "encoders": [model],
            "datasets": task_list,
        }
        _write_outputs(Path(out_dir), df, results, model, protocols, task_list, config, n_genes)
    return df


def _provenance(version, embedder, protocol, solver, seed, tasks, root, emb_dir, sources, df) -> dict:
    import scipy
    import sklearn

    weights = embedder.weights
    weights_sha = embedder.weights_sha256
    if weights_sha is None and weights is not None and Path(weights).is_file():
        weights_sha = weights_sha256(weights)  # nothing was embedded: hashed here (at most once per process)
    return {
        "hopt_st_version": version,
        "model": embedder.name,
        "weights": None if weights is None else str(weights),
        "weights_sha256": weights_sha,
        "protocol": protocol,
        "solver": solver,
        "seed": seed,
        "n_components": HEST_N_COMPONENTS,
        "tasks": tasks,
        "root": str(root),
        "embeddings_dir": str(emb_dir),
        "embeddings": sources,  # per task and sample: "file" (not ours, read as is), "cache" or "computed"
        "not_hest_comparable": {
            f"{r.task}/{r.protocol}": r.note for r in df.itertuples() if not r.hest_comparable
        },
        "versions": {
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "scikit-learn": sklearn.__version__,
        },
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _hest_config(protocol: str, config: dict, n_genes: int) -> dict:
    """``vars(args)`` of HEST's run (``BenchmarkConfig``'s keys) describing this one."""
    hest = protocol == "hest"
    return {
        "seed": config["seed"],
        "overwrite": config["overwrite"],
        "bench_data_root": config["bench_data_root"],
        "embed_dataroot": config["embed_dataroot"],
        "weights_root": config["weights_root"],
        "results_dir": config["results_dir"],
        "batch_size": None,
        "num_workers": None,
        "private_weights_root": None,
        "exp_code": protocol,
        "gene_list": "var_50genes.json"
        if hest
        else f"top {n_genes} variance of log1p counts on each training fold",
        "method": "ridge" if hest else "ridge with intercept, alpha per gene by inner cross-validation",
        "alpha": None,
        "kfold": False,
        "benchmark_encoders": False,
        "normalize": True,
        "dimreduce": "PCA" if hest else None,
        "latent_dim": HEST_N_COMPONENTS if hest else None,
        "encoders": config["encoders"],
        "datasets": config["datasets"],
        "config": None,
    }


def _merge_table(path: Path, new: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``new`` plus the rows of the CSV at ``path`` (other models, tasks or protocols) that ``new`` does not replace."""
    if not path.is_file():
        return new
    old = pd.read_csv(
        path, keep_default_na=False, na_values={"pearson_mean": [""], "pearson_std": [""], "pearson": [""]}
    )
    replaced = pd.MultiIndex.from_frame(new[keys].astype(str))
    keep = ~pd.MultiIndex.from_frame(old[keys].astype(str)).isin(replaced)
    return pd.concat([old[keep], new], ignore_index=True)


def merge_results(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """:func:`_merge_table` on the results' keys (task, model, protocol), ``hest_comparable`` read back as bool."""
    table = _merge_table(path, new, ["task", "model", "protocol"])
    if "hest_comparable" in table:
        table["hest_comparable"] = table["hest_comparable"].astype(str).str.lower().eq("true")
    return table


def _write_outputs(out: Path, df, results, model, protocols, tasks, config, n_genes):
    for p in protocols:
        tree = out / p
        cfg = _hest_config(p, config, n_genes)
        for task in tasks:
            folds, note = results[(task, p)]
            write_encoder_results(tree, task, model, folds, cfg, note)
        rebuild_aggregates(tree, tasks)
    table = merge_results(out / "results.csv", df)
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    per_gene = _merge_table(
        out / "results_per_gene.csv", df.attrs["per_gene"], ["task", "model", "protocol", "gene"]
    )
    atomic_write_text(out / "results_per_gene.csv", per_gene.to_csv(index=False))
    prov_path = out / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    if not isinstance(prov.get("models"), dict):
        prov = {"models": {}}
    prov["models"][model] = df.attrs["provenance"]
    atomic_write_text(prov_path, json.dumps(prov, indent=2))
    atomic_write_text(out / "results.md", markdown_table(table) + "\n")


def markdown_table(df: pd.DataFrame) -> str:
    """Results as a Markdown table, tasks as columns (like HEST's README), one row per model and protocol,
    ``mean ± std`` over folds and an ``Average`` column (mean over tasks). Results that are not HEST-comparable
    (``hest_comparable`` False) are marked, with the reason below the table."""
    tasks = list(dict.fromkeys(df["task"]))
    header = "| model | protocol | " + " | ".join(tasks) + " | Average |"
    sep = "|" + "---|" * (len(tasks) + 3)
    lines = [header, sep]
    marks: dict[str, str] = {}
    for (m, p), sub in df.groupby(["model", "protocol"], sort=False):
        cells = []
        for t in tasks:
            r = sub[sub.task == t]
            if r.empty:
                cells.append("")
                continue
            cell = f"{r.pearson_mean.iloc[0]:.3f} ± {r.pearson_std.iloc[0]:.3f}"
            if "hest_comparable" in r and not bool(r["hest_comparable"].iloc[0]):
                reason = (str(r["note"].iloc[0]) if "note" in r else "") or "see the results"
                cell += " " + marks.setdefault(reason, "†" * (len(marks) + 1))
            cells += [cell]
        lines.append(f"| {m} | {p} | " + " | ".join(cells) + f" | {sub.pearson_mean.mean():.3f} |")
    if marks:
        lines.append("")
        lines.extend(f"{mark} not HEST-comparable: {reason}." for reason, mark in marks.items())
    return "\n".join(lines)
