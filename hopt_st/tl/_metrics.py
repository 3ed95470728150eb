"""Per-gene Pearson correlation, the score every regressor and the benchmark report."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def pearson_per_gene(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Pearson correlation between measured and predicted expression, gene by gene.

    Computed in float64 with the same definition as :func:`scipy.stats.pearsonr`
    (agreement to ~1e-12); a gene whose measured or predicted values are constant gets NaN,
    as with scipy.

    Parameters
    ----------
    y_true
        Measured expression, ``(n_spots, n_genes)`` or ``(n_spots,)``.
    y_pred
        Predicted expression, same shape.

    Returns
    -------
    numpy.ndarray
        Shape (n_genes,), float64.
    """
    a = np.asarray(y_true, dtype=np.float64)
    b = np.asarray(y_pred, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"y_true has shape {a.shape} but y_pred has shape {b.shape}; they must match.")
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(
            f"y_true / y_pred have shape {a.shape}: a Pearson correlation needs at least 2 spots (rows) of "
            "(n_spots, n_genes) values; score on more spots."
        )
    const = (a == a[:1]).all(axis=0) | (b == b[:1]).all(axis=0)
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    na = np.linalg.norm(a, axis=0)
    nb = np.linalg.norm(b, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.einsum("ij,ij->j", a, b) / (na * nb)
    r[const] = np.nan  # constant input: undefined, NaN as in scipy
    return np.clip(r, -1.0, 1.0)


def mean_pearson(estimator, X, y) -> float:
    """Scorer: the mean over genes of the Pearson r between ``y`` and ``estimator.predict(X)``.

    A scikit-learn scorer (signature ``(estimator, X, y)``): pass it as ``scoring=`` to ``GridSearchCV`` or
    ``cross_val_score``, or call it directly. Genes whose measured or predicted values are constant are left
    out of the mean. :meth:`ExpressionRegressor.score` is R² instead, as for every scikit-learn regressor.

    Parameters
    ----------
    estimator
        A fitted regressor (e.g. :class:`hopt_st.tl.ExpressionRegressor`).
    X
        Embeddings ``(n_spots, dim)``.
    y
        Measured expression ``(n_spots, n_genes)`` or ``(n_spots,)``, in the regressor's target space.

    Returns
    -------
    float
        Mean Pearson r (NaN when no gene varies).
    """
    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(estimator.predict(X), dtype=np.float64).reshape(y.shape)
    r = pearson_per_gene(y, pred)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
