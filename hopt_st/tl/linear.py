"""Linear probes from embeddings to expression, and their building blocks (public; used by :mod:`hopt_st.bench`).

Two estimators live here:

* HEST's linear probe (``"ridge-hest"``): ``StandardScaler`` -> ``PCA(256)`` -> ``Ridge(solver="lsqr",
  alpha=100 / (n_components * n_genes), fit_intercept=False, max_iter=1000)``, the pipeline of
  ``hest/bench/benchmark.py`` + ``hest/bench/trainer.py``. It is solved here in closed form: the PCA scores are
  orthogonal, so the ridge system is diagonal in the PCA basis and the whole fit reduces to one eigen-decomposition
  of the standardised covariance. The covariance can be assembled from per-sample moments
  (:func:`moment_stats`, :func:`combine_stats`), so folds that are unions of samples cost one small eigh each.
  ``solver="sklearn"`` runs the scikit-learn pipeline itself (the reference).
* ``"ridge"``: ridge with an intercept and one alpha per gene chosen by exact leave-one-out error
  (scikit-learn's ``RidgeCV``) or, when groups are given, by group-aware inner cross-validation (ours).

Every fit returns a :class:`LinearMap` ``y = (x - x_mean) @ coef + intercept``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.linalg

logger = logging.getLogger(__name__)

HEST_N_COMPONENTS = 256
HEST_MAX_ITER = 1000
DEFAULT_ALPHAS = np.logspace(-2, 6, 17)


def check_embeddings(X, name: str = "embeddings") -> np.ndarray:
    """Embeddings as float64, refusing NaN/inf and non-2D input with a clear message."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n_spots, dim) array, got shape {X.shape}.")
    X = X.astype(np.float64, copy=False)
    bad = ~np.isfinite(X)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(
            f"{name} has NaN or infinite values in {len(rows)} spots (e.g. rows {rows[:5].tolist()}); "
            "re-compute the embeddings or drop those spots before fitting."
        )
    return X


def hest_alpha(n_features: int, n_genes: int) -> float:
    """HEST's ridge penalty ``100 / (n_features * n_genes)``; n_features is the PCA output dimension."""
    return 100.0 / (n_features * n_genes)


@dataclass
class LinearMap:
    """Affine map from embeddings to expression: ``(x - x_mean) @ coef + intercept``."""

    x_mean: np.ndarray  # (d,)
    coef: np.ndarray  # (d, g)
    intercept: np.ndarray  # (g,)

    def predict(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return (X - self.x_mean) @ self.coef + self.intercept


@dataclass
class MomentStats:
    """First and second moments of one block of spots (one sample), enough to fit ``ridge-hest``."""

    n: int
    mean: np.ndarray  # (d,) mean embedding
    css: np.ndarray  # (d, d) centred sum of squares
    cxy: np.ndarray  # (d, g) sum over spots of (x - mean) y^T
    sy: np.ndarray  # (g,) sum of y
    syy: np.ndarray  # (g,) sum of y**2


def moment_stats(X, Y) -> MomentStats:
    """Moments of one block of spots in float64 (centred within the block, so no cancellation)."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    mean = X.mean(axis=0)
    Xc = X - mean
    return MomentStats(
        n=X.shape[0], mean=mean, css=Xc.T @ Xc, cxy=Xc.T @ Y, sy=Y.sum(axis=0), syy=np.sum(Y * Y, axis=0)
    )


def combine_stats(stats: list[MomentStats]) -> MomentStats:
    """Pool the moments of several blocks (parallel-axis rule), as if computed on the stacked spots."""
    n = sum(s.n for s in stats)
    mean = sum(s.n * s.mean for s in stats) / n
    css = np.zeros_like(stats[0].css)
    cxy = np.zeros_like(stats[0].cxy)
    for s in stats:
        dm = s.mean - mean
        css += s.css + s.n * np.outer(dm, dm)
        cxy += s.cxy + np.outer(dm, s.sy)
    return MomentStats(
        n=n, mean=mean, css=css, cxy=cxy, sy=sum(s.sy for s in stats), syy=sum(s.syy for s in stats)
    )


def _standard_scale(var: np.ndarray) -> np.ndarray:
    """Feature scale as scikit-learn's StandardScaler sets it (population std; ~0 -> 1)."""
    scale = np.sqrt(var)
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
    return scale


#: PCA sizes already reported as capped (the notice is said once per process, then logged at DEBUG)
_CAPPED_REPORTED: set[int] = set()


def hest_n_components(n_samples: int, n_features: int, n_components: int = HEST_N_COMPONENTS) -> int:
    """Number of PCA components used; HEST asks for 256 and scikit-learn errors when that exceeds
    ``min(n_samples, n_features)``. We cap instead (and log it, once per process), so small data still runs."""
    k = min(n_components, n_samples, n_features)
    if k < n_components:
        level = logging.DEBUG if n_components in _CAPPED_REPORTED else logging.WARNING
        _CAPPED_REPORTED.add(n_components)
        logger.log(
            level,
            "ridge-hest: PCA(%d) needs at least %d spots and features, got %d spots x %d features; "
            "using %d components (HEST's scikit-learn pipeline would raise here).",
            n_components,
            n_components,
            n_samples,
            n_features,
            k,
        )
    return k


def fit_hest_ridge_from_stats(stats: MomentStats, *, n_components: int = HEST_N_COMPONENTS) -> LinearMap:
    """HEST's ridge probe from pooled moments.

    With standardised training data ``S`` and PCA basis ``V`` (top-k eigenvectors of ``S^T S``), the scores
    ``Z = S V`` satisfy ``Z^T Z = diag(lambda)``; ``Z^T Y = V^T D^-1 sum (x - mean) y^T`` and ``||y||^2`` are all
    the ridge needs (see :func:`hest_ridge_solve`).
    """
    d = stats.css.shape[0]
    g = stats.cxy.shape[1]
    k = hest_n_components(stats.n, d, n_components)
    scale = _standard_scale(np.diag(stats.css) / stats.n)
    cov = stats.css / np.outer(scale, scale)
    lam, V = scipy.linalg.eigh(cov, subset_by_index=[d - k, d - 1], driver="evr", check_finite=False)
    lam, V = lam[::-1], V[:, ::-1]
    lam = np.clip(lam, 0.0, None)
    ZtY = V.T @ (stats.cxy / scale[:, None])
    W = hest_ridge_solve(np.sqrt(lam), ZtY, stats.syy, hest_alpha(k, g))
    coef = (V @ W) / scale[:, None]
    return LinearMap(x_mean=stats.mean, coef=coef, intercept=np.zeros(g))


def fit_hest_ridge(X, Y, *, n_components: int = HEST_N_COMPONENTS) -> LinearMap:
    """HEST's ridge probe (standardise, PCA, ridge without intercept), see :func:`hest_ridge_solve`."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    n, d = X.shape
    if n >= d:
        return fit_hest_ridge_from_stats(moment_stats(X, Y), n_components=n_components)
    # fewer spots than features: thin SVD of the standardised data
    k = hest_n_components(n, d, n_components)
    mean = X.mean(axis=0)
    scale = _standard_scale(X.var(axis=0))
    S = (X - mean) / scale
    U, s, Vt = np.linalg.svd(S, full_matrices=False)
    U, s, Vt = U[:, :k], s[:k], Vt[:k]
    W = hest_ridge_solve(s, s[:, None] * (U.T @ Y), np.sum(Y * Y, axis=0), hest_alpha(k, Y.shape[1]))
    return LinearMap(x_mean=mean, coef=(Vt.T @ W) / scale[:, None], intercept=np.zeros(Y.shape[1]))


def _givens(a, b):
    """Stable plane rotation (c, s, r) with [c s; -s c] [a; b] = [r; 0], elementwise."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    r = np.hypot(a, b)
    safe = np.where(r > 0, r, 1.0)
    c = np.where(r > 0, a / safe, 1.0)
    s = np.where(r > 0, b / safe, 0.0)
    return c, s, r


def hest_ridge_solve(
    s,
    ZtY,
    ynorm2,
    alpha: float,
    *,
    tol: float = 1e-4,
    iter_lim: int = HEST_MAX_ITER,
    conlim: float = 1e8,
) -> np.ndarray:
    """Ridge without intercept on orthogonal PCA scores ``Z`` (``Z^T Z = diag(s**2)``), one column per gene.

    Reproduces what ``Ridge(solver="lsqr", tol=1e-4, max_iter=1000)`` returns: LSQR (Paige & Saunders) with
    ``damp = sqrt(alpha)``, ``atol = btol = tol``, stopped by its usual tests, which on PCA scores typically
    happens after a few dozen iterations, well before the minimiser (the difference in Pearson is ~1e-3, far
    above the 1e-6 this reproduction aims at). Because ``Z = U diag(s)`` has orthonormal ``U``, every LSQR
    vector lives in ``span(U) + span(y_perp)``; the iteration runs exactly in those k+1 coordinates
    (all genes at once), so it costs O(k * n_genes) per step instead of O(n_spots * k).

    Parameters
    ----------
    s
        (k,) singular values of Z.
    ZtY
        (k, g) ``Z^T Y``.
    ynorm2
        (g,) ``||y||^2`` per gene (uncentred: the ridge has no intercept).
    alpha
        Ridge penalty.

    Returns
    -------
    numpy.ndarray
        (k, g) coefficients on the PCA scores.
    """
    s = np.asarray(s, dtype=np.float64)
    ZtY = np.asarray(ZtY, dtype=np.float64)
    k, g = ZtY.shape
    eps = np.finfo(np.float64).eps
    pos = s > 0
    c = np.zeros_like(ZtY)
    c[pos] = ZtY[pos] / s[pos, None]  # coordinates of y on U
    bnorm = np.sqrt(np.asarray(ynorm2, dtype=np.float64))
    bperp = np.sqrt(np.clip(bnorm**2 - np.sum(c * c, axis=0), 0.0, None))
    damp = np.sqrt(alpha)
    dampsq = alpha
    ctol = 1.0 / conlim if conlim > 0 else 0.0

    def rmat(uU):  # A^T u
        return s[:, None] * uU

    x = np.zeros((k, g))
    beta = bnorm.copy()
    inv = np.where(beta > 0, 1.0 / np.where(beta > 0, beta, 1.0), 0.0)
    uU, up = c * inv, bperp * inv
    v = rmat(uU)
    alfa = np.linalg.norm(v, axis=0)
    v = v * np.where(alfa > 0, 1.0 / np.where(alfa > 0, alfa, 1.0), 0.0)
    w = v.copy()
    rhobar, phibar = alfa.copy(), beta.copy()
    anorm = np.zeros(g)
    ddnorm = np.zeros(g)
    res2 = np.zeros(g)
    xxnorm = np.zeros(g)
    z = np.zeros(g)
    cs2 = -np.ones(g)
    sn2 = np.zeros(g)
    active = (alfa * beta) != 0
    itn = 0
    while itn < iter_lim and active.any():
        itn += 1
        # bidiagonalisation: beta u = A v - alfa u ; alfa v = A^T u - beta v
        uU = s[:, None] * v - alfa * uU
        up = -alfa * up
        beta_new = np.sqrt(np.sum(uU * uU, axis=0) + up * up)
        bpos = beta_new > 0
        ib = np.where(bpos, 1.0 / np.where(bpos, beta_new, 1.0), 0.0)
        uU, up = uU * ib, up * ib
        anorm = np.where(bpos, np.sqrt(anorm**2 + alfa**2 + beta_new**2 + dampsq), anorm)
        v_new = rmat(uU) - beta_new * v
        alfa_new = np.linalg.norm(v_new, axis=0)
        v_new = v_new * np.where(alfa_new > 0, 1.0 / np.where(alfa_new > 0, alfa_new, 1.0), 0.0)
        v = np.where(bpos, v_new, v)
        alfa = np.where(bpos, alfa_new, alfa)
        beta = beta_new
        # eliminate the damping parameter
        rhobar1 = np.sqrt(rhobar**2 + dampsq)
        cs1 = rhobar / rhobar1
        sn1 = damp / rhobar1
        psi = sn1 * phibar
        phibar = cs1 * phibar
        # eliminate the subdiagonal element
        cs, sn, rho = _givens(rhobar1, beta)
        theta = sn * alfa
        rhobar = -cs * alfa
        phi = cs * phibar
        phibar = sn * phibar
        tau = sn * phi
        t1 = phi / rho
        t2 = -theta / rho
        dk = w / rho
        x = np.where(active, x + t1 * w, x)
        w = v + t2 * w
        ddnorm = ddnorm + np.sum(dk * dk, axis=0)
        # estimate norm(x)
        delta = sn2 * rho
        gambar = -cs2 * rho
        rhs = phi - delta * z
        zbar = rhs / gambar
        xnorm = np.sqrt(xxnorm + zbar**2)
        gamma = np.sqrt(gambar**2 + theta**2)
        cs2 = gambar / gamma
        sn2 = theta / gamma
        z = rhs / gamma
        xxnorm = xxnorm + z**2
        # convergence tests
        acond = anorm * np.sqrt(ddnorm)
        res2 = res2 + psi**2
        rnorm = np.sqrt(phibar**2 + res2)
        arnorm = alfa * np.abs(tau)
        test1 = rnorm / bnorm
        test2 = arnorm / (anorm * rnorm + eps)
        test3 = 1.0 / (acond + eps)
        tt1 = test1 / (1 + anorm * xnorm / bnorm)
        rtol = tol + tol * anorm * xnorm / bnorm
        stop = (
            (itn >= iter_lim)
            | (1 + test3 <= 1)
            | (1 + test2 <= 1)
            | (1 + tt1 <= 1)
            | (test3 <= ctol)
            | (test2 <= tol)
            | (test1 <= rtol)
        )
        active = active & ~stop
    return x


def fit_hest_ridge_sklearn(X, Y, *, n_components: int = HEST_N_COMPONENTS, seed: int = 0):
    """The scikit-learn pipeline HEST runs (reference; slow). Returns an object with ``predict``."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X)  # the caller's dtype: HEST runs the pipeline on float32 embeddings
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    k = hest_n_components(X.shape[0], X.shape[1], n_components)
    pipe = Pipeline(
        [
            ("scaler", StandardScaler()),
            ("pca", PCA(n_components=k, random_state=seed)),
            (
                "ridge",
                Ridge(
                    solver="lsqr",
                    alpha=hest_alpha(k, Y.shape[1]),
                    random_state=seed,
                    fit_intercept=False,
                    max_iter=HEST_MAX_ITER,
                ),
            ),
        ]
    )
    return pipe.fit(X, np.asarray(Y, dtype=np.float64))


# ----------------------------------------------------------------------------------------------------------
# ridge with intercept and per-gene alpha
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Spectral:
    mean: np.ndarray
    scale: np.ndarray
    V: np.ndarray  # (d, r)
    s: np.ndarray  # (r,) singular values of the standardised data
    U: np.ndarray  # (n, r)
    y_mean: np.ndarray
    UtY: np.ndarray  # (r, g)


def _spectral(X: np.ndarray, Y: np.ndarray) -> _Spectral:
    n, d = X.shape
    mean = X.mean(axis=0)
    scale = _standard_scale(X.var(axis=0))
    S = (X - mean) / scale
    if n >= d:
        lam, V = np.linalg.eigh(S.T @ S)
        keep = lam > 1e-10 * max(lam.max(), 1e-300)
        lam, V = lam[keep], V[:, keep]
        s = np.sqrt(lam)
        U = (S @ V) / s
    else:
        U, s, Vt = np.linalg.svd(S, full_matrices=False)
        keep = s > 1e-5 * max(s.max(), 1e-300)
        U, s, V = U[:, keep], s[keep], Vt[keep].T
    y_mean = Y.mean(axis=0)
    return _Spectral(mean, scale, V, s, U, y_mean, U.T @ (Y - y_mean))


def _map_for_alphas(sp: _Spectral, alpha_per_gene: np.ndarray) -> LinearMap:
    filt = sp.s[:, None] / (sp.s[:, None] ** 2 + alpha_per_gene[None, :])  # (r, g)
    coef = (sp.V @ (filt * sp.UtY)) / sp.scale[:, None]
    return LinearMap(x_mean=sp.mean, coef=coef, intercept=sp.y_mean.copy())


def _loo_ridge_sklearn(X: np.ndarray, Y: np.ndarray, alphas: np.ndarray) -> tuple[LinearMap, np.ndarray]:
    """scikit-learn's ``StandardScaler`` + ``RidgeCV(alpha_per_target=True)`` (efficient leave-one-out),
    returned as a :class:`LinearMap` on the raw embeddings."""
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    ridge = RidgeCV(alphas=alphas, alpha_per_target=True).fit(scaler.transform(X), Y)
    coef = (
        np.asarray(ridge.coef_, dtype=np.float64).reshape(Y.shape[1], X.shape[1]).T / scaler.scale_[:, None]
    )
    lin = LinearMap(
        x_mean=np.asarray(scaler.mean_, dtype=np.float64),
        coef=coef,
        intercept=np.atleast_1d(np.asarray(ridge.intercept_, dtype=np.float64)),
    )
    return lin, np.atleast_1d(np.asarray(ridge.alpha_, dtype=np.float64))


def fit_ridge_cv(X, Y, *, alphas=None, groups=None, n_splits: int = 5) -> tuple[LinearMap, np.ndarray]:
    """Ridge with intercept on standardised embeddings, alpha chosen per gene.

    Without groups, alpha minimises the exact leave-one-out squared error: this is scikit-learn's
    ``StandardScaler`` followed by ``RidgeCV(alphas, alpha_per_target=True)`` (its closed-form leave-one-out).
    With groups (e.g. sample or patient ids), alpha minimises the squared error of a group-wise inner
    cross-validation (:class:`sklearn.model_selection.GroupKFold`), so neighbouring, correlated spots never sit
    on both sides of the choice; the final ridge is refit on all spots from one SVD.

    Returns
    -------
    (LinearMap, numpy.ndarray)
        The fitted map and the chosen alpha per gene.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    alphas = np.asarray(DEFAULT_ALPHAS if alphas is None else alphas, dtype=np.float64)
    if groups is None:
        return _loo_ridge_sklearn(X, Y, alphas)
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(
            f"groups has {n_groups} distinct value; group-aware alpha selection needs at least 2 "
            "(pass groups=None to use leave-one-out instead)."
        )
    err = np.zeros((len(alphas), Y.shape[1]))
    for tr, va in GroupKFold(n_splits=min(n_splits, n_groups)).split(X, Y, groups):
        spi = _spectral(X[tr], Y[tr])
        Sva = ((X[va] - spi.mean) / spi.scale) @ spi.V  # (n_va, r)
        for i, a in enumerate(alphas):
            filt = spi.s / (spi.s**2 + a)
            pred = spi.y_mean + Sva @ (filt[:, None] * spi.UtY)
            err[i] += np.sum((Y[va] - pred) ** 2, axis=0)
    best = alphas[np.argmin(err, axis=0)]
    return _map_for_alphas(_spectral(X, Y), best), best
