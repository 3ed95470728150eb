"""HEST's result files: the dicts HEST's benchmark builds, and its folder layout, written atomically.

Keys, nesting, sorting and aggregation follow github.com/mahmoodlab/HEST at commit ``afd42c3``
(``src/hest/bench/trainer.py`` ``train_test_reg``; ``src/hest/bench/benchmark.py`` ``predict_single_split``,
``merge_fold_results``, ``predict_folds``, ``benchmark_grid``). One results tree (HEST's
``<results_dir>/<exp_code>``) per protocol::

    <tree>/dataset_results.json, dataset_results.csv
    <tree>/<task>/enc_results.json
    <tree>/<task>/<encoder>/results_kfold.json
    <tree>/<task>/<encoder>/split<i>/config.json, results.json, summary.json

Every JSON is written as HEST writes it (``sort_keys=True, indent=4``, no rounding, NaN as ``NaN``). A tree may
hold several encoders: ``enc_results.json`` and ``dataset_results.*`` are rebuilt from every
``<task>/<encoder>/results_kfold.json`` present. A result that is not comparable with HEST's (fewer than 256
embedding dimensions, the strict protocol) carries one extra key, ``"not_hest_comparable"``: the reason.
"""

from __future__ import annotations

import json
from collections import defaultdict
from operator import itemgetter
from pathlib import Path

import numpy as np
import pandas as pd

from .._atomic import atomic_write_bytes
from ..tl import pearson_per_gene

NOT_COMPARABLE_KEY = "not_hest_comparable"


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, indent=4)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (folders created) through a temporary file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))


def probe_results(genes, preds_all: np.ndarray, y_test: np.ndarray) -> dict:
    """``train_test_reg``'s ``results`` dict for one fold: per gene (HEST's gene order) the mean squared error,
    R² and Pearson of ``preds_all`` against ``y_test``; their mean/std (ddof 0) and quartiles."""
    pearson = pearson_per_gene(y_test, preds_all)
    residual_ss = np.sum((y_test - preds_all) ** 2, axis=0)
    total_ss = np.sum((y_test - y_test.mean(axis=0)) ** 2, axis=0)
    errors = (residual_ss / y_test.shape[0]).tolist()
    with np.errstate(divide="ignore", invalid="ignore"):  # a constant gene: HEST gets -inf / NaN too
        r2_scores = (1.0 - residual_ss / total_ss).tolist()
    return {
        "l2_errors": errors,
        "r2_scores": r2_scores,
        "pearson_corrs": [{"name": g, "pearson_corr": float(r)} for g, r in zip(genes, pearson)],
        "pearson_mean": float(np.mean(pearson)),
        "pearson_std": float(np.std(pearson)),
        "l2_error_q1": float(np.percentile(errors, 25)),
        "l2_error_q2": float(np.median(errors)),
        "l2_error_q3": float(np.percentile(errors, 75)),
        "r2_score_q1": float(np.percentile(r2_scores, 25)),
        "r2_score_q2": float(np.median(r2_scores)),
        "r2_score_q3": float(np.percentile(r2_scores, 75)),
    }


def kfold_results(folds: list[dict]) -> dict:
    """``merge_fold_results`` of the folds' :func:`probe_results`, genes sorted by mean Pearson (descending,
    stable) as ``predict_folds`` writes ``results_kfold.json``: the task score is the mean of fold means."""
    per_gene: dict[str, list[float]] = defaultdict(
        list
    )  # gene -> its Pearson in each fold, genes in first-seen order
    for fold in folds:
        for entry in fold["pearson_corrs"]:
            per_gene[entry["name"]].append(entry["pearson_corr"])
    genes = [
        {"name": gene, "pearson_corrs": rs, "mean": float(np.mean(rs)), "std": float(np.std(rs))}
        for gene, rs in per_gene.items()
    ]
    fold_means = [fold["pearson_mean"] for fold in folds]
    return {
        "pearson_corrs": sorted(genes, key=itemgetter("mean"), reverse=True),
        "pearson_mean": float(np.mean(fold_means)),
        "pearson_std": float(np.std(fold_means)),
        "mean_per_split": fold_means,
    }


def write_encoder_results(
    tree: Path, task: str, encoder: str, folds: list[dict], config: dict, note: str | None
) -> dict:
    """Write ``<tree>/<task>/<encoder>/split<i>/{config,results,summary}.json`` and ``results_kfold.json``.

    ``folds``: per fold ``{"results": probe_results(...), "n_train", "n_test"}``. Returns the k-fold dict.
    """
    edir = tree / task / encoder
    extra = {} if note is None else {NOT_COMPARABLE_KEY: note}
    for i, fold in enumerate(folds):
        sdir = edir / f"split{i}"
        summary = {"n_train": fold["n_train"], "n_test": fold["n_test"], **fold["results"], **extra}
        atomic_write_text(sdir / "config.json", _dumps(config))
        atomic_write_text(sdir / "results.json", _dumps({**fold["results"], **extra}))
        atomic_write_text(sdir / "summary.json", _dumps(summary))
    kfold = {**kfold_results([f["results"] for f in folds]), **extra}
    atomic_write_text(edir / "results_kfold.json", _dumps(kfold))
    return kfold


def _encoder_entries(tree: Path, task: str) -> list[dict]:
    """``enc_results.json`` entries from every ``<tree>/<task>/<encoder>/results_kfold.json``, sorted by
    ``pearson_mean`` descending as ``benchmark_grid`` sorts them."""
    entries = []
    for kf in sorted((tree / task).glob("*/results_kfold.json")):
        res = json.loads(kf.read_text())
        entry = {
            "encoder_name": kf.parent.name,
            "pearson_mean": res["pearson_mean"],
            "pearson_std": res["pearson_std"],
        }
        if NOT_COMPARABLE_KEY in res:
            entry[NOT_COMPARABLE_KEY] = res[NOT_COMPARABLE_KEY]
        entries.append(entry)
    return sorted(entries, key=itemgetter("pearson_mean"), reverse=True)


def rebuild_aggregates(tree: Path, tasks: list[str]) -> None:
    """Write ``<task>/enc_results.json`` for ``tasks`` and ``dataset_results.{json,csv}`` over every task of the
    tree (order: the existing ``dataset_results.json``'s, then ``tasks``), as ``benchmark_grid`` builds them."""
    order: list[str] = []
    old = tree / "dataset_results.json"
    if old.is_file():
        try:
            order = [d["dataset_name"] for d in json.loads(old.read_text()).get("results", [])]
        except (ValueError, KeyError, TypeError):
            order = []
    order += [t for t in tasks if t not in order]
    order = [t for t in order if (tree / t).is_dir()]
    per_task = []
    for task in order:
        entries = _encoder_entries(tree, task)
        if task in tasks or not (tree / task / "enc_results.json").is_file():
            atomic_write_text(tree / task / "enc_results.json", _dumps({"results": entries}))
        per_task.append({"dataset_name": task, "results": entries})
    task_means: dict[str, list[float]] = defaultdict(list)  # encoder -> its task means
    rows = []  # dataset_results.csv: one row per task, "<encoder>_mean" / "_std" columns
    for task_entry in per_task:
        row = {"dataset": task_entry["dataset_name"]}
        for enc in task_entry["results"]:
            task_means[enc["encoder_name"]].append(enc["pearson_mean"])
            row.update({f"{enc['encoder_name']}_{k}": enc[f"pearson_{k}"] for k in ("mean", "std")})
            if NOT_COMPARABLE_KEY in enc:
                row[f"{enc['encoder_name']}_{NOT_COMPARABLE_KEY}"] = enc[NOT_COMPARABLE_KEY]
        rows.append(row)
    average = {enc: float(np.mean(means)) for enc, means in task_means.items()}
    average = dict(sorted(average.items(), key=lambda item: item[1], reverse=True))
    atomic_write_text(tree / "dataset_results.csv", pd.DataFrame(rows).to_csv())
    atomic_write_text(tree / "dataset_results.json", _dumps({"results": per_task, "average": average}))
