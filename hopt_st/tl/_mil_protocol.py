"""The slide-level protocol of H-optimus-1's evaluation: hyperparameters chosen by cross-validation inside the
training data, folds split by patient, a fixed seed; :func:`fit_mil` and :func:`cross_validate_mil`.

For ABMIL the grid is (learning rate, steps): one training run per learning rate and inner fold scores every
step count of the grid (predictions are taken after each), so the grid costs ``len(lrs)`` runs of
``max(steps)`` steps per inner fold. For mean pooling the grid is the penalty ``alpha``. Scores: AUC-ROC
(binary), one-vs-rest macro AUC (multi-class), mean Pearson over genes (continuous targets, e.g. bulk
expression, per gene in ``attrs["per_gene"]``).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
from sklearn.base import clone
from tqdm.auto import tqdm

from ..io._bags import ArrayBags, Bags, as_bags, read_labels
from ._metrics import pearson_per_gene
from ._mil import ABMIL, MeanPoolMIL, bag_means, infer_task

logger = logging.getLogger(__name__)

#: columns of the table :func:`cross_validate_mil` returns
MIL_RESULT_COLUMNS = ["task", "mil", "fold", "metric", "score", "n_train", "n_test", "hyperparameters"]
DEFAULT_LRS = (1e-4, 3e-4, 1e-3)
DEFAULT_STEPS = (250, 500, 1000, 2000)
DEFAULT_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)
METRICS = {"binary": "auc", "multiclass": "auc_ovr_macro", "regression": "pearson_mean"}


def score(task: str, y, pred: np.ndarray, classes=None) -> float:
    """The protocol's score: AUC-ROC (binary, ``pred`` the probabilities), one-vs-rest macro AUC
    (multi-class), mean Pearson over targets (regression). NaN when undefined (one class only)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if task == "regression":
        y2 = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        return float(np.nanmean(pearson_per_gene(y2, np.asarray(pred).reshape(len(y), -1))))
    if len(np.unique(y)) < 2:
        return float("nan")
    if task == "binary":
        return float(roc_auc_score(np.asarray(y) == classes[1], pred[:, 1]))
    present = np.isin(classes, np.unique(y))
    if present.sum() < len(classes):  # a class absent from this fold: AUC over the classes present
        p = pred[:, present] / pred[:, present].sum(1, keepdims=True)
        return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=classes[present]))
    return float(roc_auc_score(y, pred, multi_class="ovr", average="macro", labels=classes))


def patient_folds(y, groups, n_splits: int, seed: int, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` (train, test) index pairs, no patient in two folds; stratified by class when classifying."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise ValueError(
            f"{n_groups} patients cannot make {n_splits} folds split by patient: use fewer folds (n_splits) "
            "or more patients."
        )
    if task == "regression":
        splitter = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(groups)), groups=groups))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(groups)), np.asarray(y).astype(str), groups=groups))


def _template(mil, task: str, seed: int):
    if isinstance(mil, str):
        if mil == "abmil":
            return ABMIL(task=task, seed=seed)
        if mil == "meanpool":
            return MeanPoolMIL(task=task, seed=seed)
        raise ValueError(f"mil = {mil!r} must be 'abmil', 'meanpool' or an ABMIL / MeanPoolMIL instance.")
    if isinstance(mil, ABMIL | MeanPoolMIL):
        return clone(mil).set_params(task=task, seed=seed)
    raise TypeError(f"mil must be 'abmil', 'meanpool' or an ABMIL / MeanPoolMIL; got {type(mil).__name__}.")


def _grid(est, lrs, steps, alphas) -> list[dict]:
    """Candidate settings, each ``{"fit": params of one training run, "eval": step counts it scores}``."""
    if isinstance(est, ABMIL):
        return [{"fit": {"lr": float(lr)}, "eval": sorted(int(s) for s in steps)} for lr in lrs]
    return [{"fit": {"alpha": float(a)}, "eval": [0]} for a in alphas]


def fit_mil(
    bags,
    y,
    groups=None,
    *,
    mil="abmil",
    lrs=DEFAULT_LRS,
    steps=DEFAULT_STEPS,
    alphas=DEFAULT_ALPHAS,
    n_splits: int = 5,
    task: str = "auto",
    seed: int = 0,
    progress: bool = False,
):
    """Choose hyperparameters by ``n_splits``-fold cross-validation split by patient, then fit on all of ``bags``.

    Parameters
    ----------
    bags
        :class:`hopt_st.io.Bags` (or a list of arrays).
    y
        One target per bag: classes, or continuous values (``(n,)`` or ``(n, n_genes)``).
    groups
        Patient of each bag (default ``bags.patients``): no patient is in two folds.
    mil
        ``"abmil"``, ``"meanpool"``, or an :class:`ABMIL` / :class:`MeanPoolMIL` whose other parameters are kept.
    lrs, steps
        ABMIL's grid: learning rates x numbers of steps.
    alphas
        Mean pooling's grid of penalties.
    n_splits
        Folds of the inner cross-validation.
    task
        ``"auto"``, ``"binary"``, ``"multiclass"`` or ``"regression"``.
    seed
        Seed of the folds and of every model.
    progress
        Show a progress bar.

    Returns
    -------
    ABMIL or MeanPoolMIL
        Fitted with the best setting (ties: the earlier in the grid), with ``cv_results_`` (a DataFrame: one
        row per setting, its mean inner score) and ``best_params_``.
    """
    bags = as_bags(bags)
    y = np.asarray(y)
    task = infer_task(y) if task == "auto" else task
    groups = np.asarray(bags.patients if groups is None else groups).astype(str)
    est = _template(mil, task, seed)
    grid = _grid(est, lrs, steps, alphas)
    folds = patient_folds(y, groups, n_splits, seed, task)
    scored = bags
    if isinstance(est, MeanPoolMIL):  # mean pooling only needs each bag's mean: read every bag once
        scored = ArrayBags(
            [m[None, :] for m in bag_means(bags)], bags.sample_ids, bags.patients, bags.provenance
        )
    rows = []
    bar = tqdm(total=len(grid) * len(folds), desc=f"inner CV {type(est).__name__}", disable=not progress)
    for cand in grid:
        per_fold: dict[int, list[float]] = {s: [] for s in cand["eval"]}
        for train, val in folds:
            model = clone(est).set_params(**cand["fit"])
            path = model.fit_path(scored.subset(train), y[train], scored.subset(val), cand["eval"])
            for s, pred in path.items():
                per_fold[s].append(score(task, y[val], pred, getattr(model, "classes_", None)))
            bar.update(1)
        for s, scores in per_fold.items():
            params = dict(cand["fit"], **({"steps": s} if isinstance(est, ABMIL) else {}))
            rows.append({"params": params, "score": float(np.nanmean(scores)), "fold_scores": scores})
    bar.close()
    cv = pd.DataFrame(rows)
    best = int(np.nanargmax(cv["score"].to_numpy())) if cv["score"].notna().any() else 0
    best_params = cv["params"][best]
    final = clone(est).set_params(**best_params).fit(scored if isinstance(est, MeanPoolMIL) else bags, y)
    final.cv_results_, final.best_params_ = cv, best_params
    logger.info(
        "fit_mil %s: best %s (inner CV score %.3f)", type(est).__name__, best_params, cv["score"][best]
    )
    return final


class _MeanBags(ArrayBags):
    """Each slide's mean embedding (:func:`bag_means`, float64) as a bag of one tile, kept in float64: the mean of
    such a bag is that mean to the bit, so mean pooling fits and scores on it exactly as on the slides, which
    :func:`cross_validate_mil` then reads once for all its folds."""

    def __init__(self, means: np.ndarray, sample_ids, patients, provenance):
        # Bags' own set-up only: ArrayBags' would make float32 copies
        Bags.__init__(self, [str(s) for s in sample_ids], sample_ids, patients)
        self._arrays = [row[None, :] for row in np.asarray(means, dtype=np.float64)]
        self._provenance = dict(provenance or {})

    def subset(self, idx) -> _MeanBags:
        idx = np.flatnonzero(idx) if np.asarray(idx).dtype == bool else np.asarray(idx)
        return _MeanBags(
            np.vstack([self._arrays[i] for i in idx]) if len(idx) else np.zeros((0, 0)),
            [self.sample_ids[i] for i in idx],
            [self.patients[i] for i in idx],
            self._provenance,
        )


def _targets(labels: pd.DataFrame, target) -> tuple[str, list[str]]:
    cols = [target] if isinstance(target, str) else list(target)
    missing = [c for c in cols if c not in labels.columns]
    if missing:
        raise ValueError(
            f"target columns {missing} are not in the label table; its columns are {list(labels.columns)}."
        )
    return ("+".join(cols) if len(cols) > 1 else cols[0]), cols


def cross_validate_mil(
    bags: Bags,
    labels,
    target,
    *,
    mil=("abmil", "meanpool"),
    lrs=DEFAULT_LRS,
    steps=DEFAULT_STEPS,
    alphas=DEFAULT_ALPHAS,
    n_splits: int = 5,
    inner_splits: int = 5,
    task: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """The slide-level protocol: ``n_splits`` outer folds split by patient; in each, hyperparameters chosen
    by ``inner_splits``-fold cross-validation on the training slides only (:func:`fit_mil`), then the test
    slides scored.

    Parameters
    ----------
    bags
        :class:`hopt_st.io.Bags`, in the order of ``labels`` (e.g. ``Bags.from_cohort(out_dir, model, labels)``).
    labels
        Label table (:func:`hopt_st.io.read_labels`): ``sample_id``, ``patient`` and the target column(s).
    target
        A label column (binary or multi-class; continuous with ``task="regression"`` or non-integer values),
        or a list of continuous columns (bulk expression: one per gene).
    mil
        One or several of ``"abmil"``, ``"meanpool"`` (or estimator instances).
    lrs, steps, alphas, inner_splits, task, seed
        As :func:`fit_mil`.
    n_splits
        Outer folds.
    progress
        Show a progress bar over folds.

    Returns
    -------
    pandas.DataFrame
        Tidy, one row per MIL model and fold: ``task`` (the target), ``mil``, ``fold``, ``metric`` (``auc``,
        ``auc_ovr_macro`` or ``pearson_mean``), ``score``, ``n_train``, ``n_test``, ``hyperparameters``
        (JSON of the setting chosen inside the fold). ``attrs["predictions"]``: each test slide's fold,
        target and prediction; ``attrs["per_gene"]`` (regression): Pearson per gene, model and fold.
    """
    labels = read_labels(labels)
    bags = as_bags(bags)
    if list(bags.sample_ids) != list(labels["sample_id"]):
        raise ValueError(
            "bags and labels list different slides or another order: build the bags from the label table "
            "(Bags.from_cohort(out_dir, model, labels))."
        )
    name, cols = _targets(labels, target)
    keep = labels[cols].notna().all(axis=1).to_numpy()
    if not keep.all():
        logger.warning("cross_validate_mil: %d slides without a %s label are left out.", (~keep).sum(), name)
    labels, bags = labels[keep].reset_index(drop=True), bags.subset(np.flatnonzero(keep))
    y = labels[cols].to_numpy()
    y = y[:, 0] if len(cols) == 1 else y.astype(np.float64)
    if len(cols) > 1 and task == "auto":
        task = "regression"
    task = infer_task(y) if task == "auto" else task
    if task == "regression":
        y = y.astype(np.float64)
    groups = labels["patient"].to_numpy().astype(str)
    folds = patient_folds(y, groups, n_splits, seed, task)
    mils = [mil] if isinstance(mil, str | ABMIL | MeanPoolMIL) else list(mil)
    rows, preds, per_gene = [], [], []
    means = None  # mean pooling's input, each slide read once for every fold and MeanPoolMIL of this call
    bar = tqdm(total=len(mils) * len(folds), desc=f"MIL CV {name}", disable=not progress)
    for m in mils:
        mname = m if isinstance(m, str) else type(m).__name__.lower()
        source = bags
        if isinstance(_template(m, task, seed), MeanPoolMIL):
            if means is None:
                means = _MeanBags(bag_means(bags), bags.sample_ids, bags.patients, bags.provenance)
            source = means
        for k, (train, test) in enumerate(folds):
            est = fit_mil(
                source.subset(train),
                y[train],
                groups[train],
                mil=m,
                lrs=lrs,
                steps=steps,
                alphas=alphas,
                n_splits=inner_splits,
                task=task,
                seed=seed,
            )
            test_bags = source.subset(test)
            if task == "regression":
                pred = est.predict(test_bags).reshape(len(test), -1)
            else:
                pred = est.predict_proba(test_bags)
            s = score(task, y[test], pred, getattr(est, "classes_", None))
            rows.append(
                {
                    "task": name,
                    "mil": mname,
                    "fold": k,
                    "metric": METRICS[task],
                    "score": s,
                    "n_train": len(train),
                    "n_test": len(test),
                    "hyperparameters": json.dumps(est.best_params_, sort_keys=True),
                }
            )
            for j, i in enumerate(test):
                rec = {"task": name, "mil": mname, "fold": k, "sample_id": bags.sample_ids[i]}
                if task == "regression":
                    rec.update({f"y_{c}": y[i, c] if y.ndim == 2 else y[i] for c in range(pred.shape[1])})
                    rec.update({f"pred_{c}": pred[j, c] for c in range(pred.shape[1])})
                else:
                    rec["y"] = y[i]
                    rec.update({f"p_{cls}": pred[j, c] for c, cls in enumerate(est.classes_)})
                preds.append(rec)
            if task == "regression":
                r = pearson_per_gene(y[test].reshape(len(test), -1), pred)
                per_gene += [
                    {"task": name, "mil": mname, "fold": k, "gene": g, "pearson": float(v)}
                    for g, v in zip(cols, r)
                ]
            bar.update(1)
            logger.info(
                "MIL CV %s %s fold %d: %s %.3f (%s)", name, mname, k, METRICS[task], s, est.best_params_
            )
    bar.close()
    df = pd.DataFrame(rows, columns=MIL_RESULT_COLUMNS)
    df.attrs["predictions"] = pd.DataFrame(preds)
    df.attrs["per_gene"] = pd.DataFrame(per_gene, columns=["task", "mil", "fold", "gene", "pearson"])
    return df


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of the score over folds, per task and MIL model."""
    g = results.groupby(["task", "mil", "metric"], sort=False)["score"]
    return g.agg(score_mean="mean", score_std="std", n_folds="count").reset_index()
