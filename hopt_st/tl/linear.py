"""Linear probes from embeddings to expression.

Public: :func:`hest_probe` (HEST-Benchmark's probe on arrays), :func:`fit_ridge_cv` (ridge with a per-gene
penalty) and :class:`LinearMap` (what the fits return). :class:`hopt_st.tl.ExpressionRegressor` uses them
(``"ridge-hest"`` and ``"ridge"``), and so does :func:`hopt_st.bench.run`.

* HEST's linear probe: its settings are facts read in HEST's benchmark (github.com/mahmoodlab/HEST at commit
  ``afd42c3``: ``src/hest/bench/benchmark.py:314-315``, ``src/hest/bench/trainer.py:8-20``): scikit-learn's
  ``StandardScaler`` -> ``PCA(256, random_state=seed)`` with its default ``svd_solver="auto"`` (the
  *randomized* solver for 1536-d embeddings), fitted on the training spots in the embeddings' own dtype
  (float32); the scores are wrapped in ``torch.Tensor`` (float32), which makes scikit-learn convert them to
  **float64** for ``Ridge(solver="lsqr", alpha=100 / (256 * 50), fit_intercept=False, max_iter=1000)`` (tol
  1e-4): one ``scipy.sparse.linalg.lsqr`` per gene, stopped by its tolerance tests well before the minimiser.
  HEST's seed is 1 (``benchmark.py:76``). The default, ``solver="exact"``, runs scikit-learn's own scaler and
  PCA objects, then scipy's LSQR per gene with the arguments scikit-learn passes. LSQR stopped early amplifies
  any rounding difference (a one-ulp change in one matrix product moves a gene's Pearson by ~1e-4), so only
  HEST's own operations give HEST's numbers; these agree with HEST's code to ~1e-15. ``solver="fast"``
  (opt-in) works from per-sample moments; its deviation is documented in ``hopt_st/tl/_hest_fast.py``.

* Ridge with an intercept and one alpha per gene chosen by exact leave-one-out error (scikit-learn's
  ``RidgeCV``) or, when groups are given, by group-aware inner cross-validation (ours).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["LinearMap", "fit_ridge_cv", "hest_probe"]

_HEST_N_COMPONENTS = 256
#: HEST's default seed (``BenchmarkConfig.seed``), used for ``PCA(random_state=seed)``
_HEST_SEED = 1
_HEST_MAX_ITER = 1000
#: ``Ridge``'s default ``tol`` (HEST leaves it), LSQR's ``atol`` and ``btol``
_HEST_TOL = 1e-4
#: how :func:`hest_probe` computes HEST's probe
_HEST_SOLVERS = ("exact", "fast")
_DEFAULT_ALPHAS = np.logspace(-2, 6, 17)


def _check_embeddings(X, name: str = "embeddings", *, keep_dtype: bool = False) -> np.ndarray:
    """Embeddings as float64 (or, with ``keep_dtype``, in their own floating dtype), refusing NaN/inf and
    non-2D input with a clear message."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n_spots, dim) array, got shape {X.shape}.")
    if not (keep_dtype and X.dtype.kind == "f"):
        X = X.astype(np.float64, copy=False)
    bad = ~np.isfinite(X)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(
            f"{name} has NaN or infinite values in {len(rows)} spots (e.g. rows {rows[:5].tolist()}); "
            "re-compute the embeddings or drop those spots before fitting."
        )
    return X


def _hest_alpha(n_features: int, n_genes: int) -> float:
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


def _standard_scale(var: np.ndarray) -> np.ndarray:
    """Feature scale as scikit-learn's StandardScaler sets it (population std; ~0 -> 1)."""
    scale = np.sqrt(var)
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
    return scale


#: PCA sizes already reported as capped (the notice is said once per process, then logged at DEBUG)
_CAPPED_REPORTED: set[int] = set()


def _hest_n_components(n_samples: int, n_features: int, n_components: int = _HEST_N_COMPONENTS) -> int:
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


# ----------------------------------------------------------------------------------------------------------
# HEST's probe
# ----------------------------------------------------------------------------------------------------------
def _as_torch_tensor_values(Z) -> np.ndarray:
    """What ``Ridge`` gets from HEST's ``torch.Tensor(scores)``: float32 values, converted to float64."""
    return np.asarray(Z, dtype=np.float32).astype(np.float64)


def _hest_pca(X_train, X_test=None, *, n_components: int = _HEST_N_COMPONENTS, seed: int = _HEST_SEED):
    """HEST's ``Pipeline([StandardScaler(), PCA(n_components, random_state=seed)])`` fitted on ``X_train``.

    scikit-learn's own objects, on the embeddings in their own dtype (float32 as stored), as HEST runs them;
    ``n_components`` is capped at ``min(n_spots, dim)`` (HEST's code raises there).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray or None, sklearn.pipeline.Pipeline)
        Training scores (``fit_transform``) and test scores (``transform``), both float32 as HEST's
        ``torch.Tensor`` holds them, and the fitted pipeline.
    """
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    X_train = np.asarray(X_train)
    k = _hest_n_components(X_train.shape[0], X_train.shape[1], n_components)
    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=k, random_state=seed))])
    Z_train = np.asarray(pipe.fit_transform(X_train), dtype=np.float32)
    Z_test = None if X_test is None else np.asarray(pipe.transform(np.asarray(X_test)), dtype=np.float32)
    return Z_train, Z_test, pipe


def _blas_thread_count_invariant(Z: np.ndarray) -> bool:
    """Whether the BLAS calls LSQR makes on ``Z`` (``Z @ v``, ``Z.T @ u``, ``u @ u``) give the same bits with one
    thread as with the current number: then genes may be solved in parallel, one BLAS thread each, without
    changing a single bit of the result. (Thread partitioning depends on the shapes only, so random vectors of
    the right shapes probe it.)"""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    v, u = rng.standard_normal(Z.shape[1]), rng.standard_normal(Z.shape[0])

    def ops():
        return Z.dot(v), Z.T.dot(u), np.linalg.norm(u), np.linalg.norm(v)

    ref = ops()
    with threadpool_limits(limits=1, user_api="blas"):
        one = ops()
    return all(np.array_equal(a, b) for a, b in zip(ref, one))


def _hest_ridge_coef(
    Z_train, Y_train, *, tol: float = _HEST_TOL, max_iter: int = _HEST_MAX_ITER, n_jobs: int | None = None
) -> np.ndarray:
    """HEST's ``Ridge(solver="lsqr", alpha=100 / (k * g), fit_intercept=False, max_iter)`` on float32 scores
    ``Z_train`` (k columns), in float64 as HEST's ``torch.Tensor`` input makes scikit-learn run it.

    The very calls scikit-learn's ``_solve_lsqr`` makes: one ``scipy.sparse.linalg.lsqr`` per gene, on the same
    C-ordered float64 matrix. LSQR stopped at tol=1e-4 amplifies rounding differences chaotically (a one-ulp
    change in a matrix product moves per-gene Pearson by ~1e-4 after ~40 iterations), so equality with HEST
    needs the identical operations, not merely the same algorithm. Genes are solved in ``n_jobs`` threads (default:
    CPU count) with one BLAS thread each, but only when those BLAS calls give bit-identical results with one
    thread as with the current number; otherwise one after another.

    Returns
    -------
    numpy.ndarray
        ``coef_`` (g, k), float64.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    from scipy.sparse.linalg import lsqr
    from threadpoolctl import threadpool_limits

    Z = _as_torch_tensor_values(Z_train)
    Y = np.asarray(Y_train, dtype=np.float64)
    g = Y.shape[1]
    sqrt_alpha = np.sqrt(np.asarray(_hest_alpha(Z.shape[1], g), dtype=np.float64))

    def solve(i):
        return lsqr(Z, Y[:, i], damp=sqrt_alpha, atol=tol, btol=tol, iter_lim=max_iter)[0]

    jobs = min(g, os.cpu_count() or 1) if n_jobs is None else min(g, max(1, int(n_jobs)))
    if jobs > 1 and _blas_thread_count_invariant(Z):
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(jobs) as pool:
            coefs = list(pool.map(solve, range(g)))
    else:
        coefs = [solve(i) for i in range(g)]
    return np.array(coefs).reshape(g, Z.shape[1])


def hest_probe(
    X_train,
    Y_train,
    X_test,
    *,
    n_components: int = _HEST_N_COMPONENTS,
    seed: int = _HEST_SEED,
    solver: str = "exact",
    n_jobs: int | None = None,
) -> tuple[np.ndarray, int]:
    """HEST's linear probe: fit on ``(X_train, Y_train)``, predict ``X_test``, as HEST's code does.

    Parameters
    ----------
    X_train, X_test
        Embeddings (n_spots, dim), in the dtype HEST reads them in (the embedding files' own, float32).
    Y_train
        Targets (n_spots, n_genes), float64 ``log1p`` counts in HEST.
    n_components
        PCA dimension (HEST's ``latent_dim``, 256).
    seed
        ``PCA(random_state=seed)`` (HEST's ``seed``, 1).
    solver
        ``"exact"`` (default: HEST's own operations, its numbers to ~1e-15) or ``"fast"`` (opt-in: from
        moments, ~1e-4 per gene off HEST's; see ``hopt_st/tl/_hest_fast.py``).
    n_jobs
        ``"exact"``: threads solving genes in parallel (one BLAS thread each, only where that changes no bit).

    Returns
    -------
    (numpy.ndarray, int)
        Predictions (n_test, n_genes), float64 as HEST's ``reg.predict``, and the number of PCA components used.
    """
    if solver not in _HEST_SOLVERS:
        raise ValueError(f"solver={solver!r} must be one of {_HEST_SOLVERS}.")
    X_train = np.asarray(X_train)
    Y_train = np.asarray(Y_train, dtype=np.float64)
    k = min(n_components, *X_train.shape)
    if solver == "fast":
        from ._hest_fast import fit_if_replayable

        lin = fit_if_replayable(X_train, Y_train, n_components=n_components, seed=seed)
        if lin is not None:
            return lin.predict(X_test), k
    Z_train, Z_test, _ = _hest_pca(X_train, X_test, n_components=n_components, seed=seed)
    coef = _hest_ridge_coef(Z_train, Y_train, n_jobs=n_jobs)
    return _as_torch_tensor_values(Z_test) @ coef.T, k


def _fit_hest_exact(X, Y, *, n_components: int = _HEST_N_COMPONENTS, seed: int = _HEST_SEED) -> LinearMap:
    """HEST's probe fitted with HEST's own operations (``solver="exact"``), as a :class:`LinearMap`.

    The coefficients are HEST's; applying them as one affine map skips HEST's float32 rounding of the test
    scores, which moves predictions by about 1e-7 of their size (not amplified: nothing iterates after it).
    """
    X = np.asarray(X)
    Z, _, pipe = _hest_pca(X, n_components=n_components, seed=seed)
    coef = _hest_ridge_coef(Z, Y)  # (g, k) on the PCA scores
    scaler, pca = pipe["scaler"], pipe["PCA"]
    comps = pca.components_.astype(np.float64) / scaler.scale_  # scores = (x - mean) @ comps.T
    return LinearMap(
        x_mean=scaler.mean_ + scaler.scale_ * pca.mean_.astype(np.float64),
        coef=comps.T @ coef.T,
        intercept=np.zeros(coef.shape[0]),
    )


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
    alphas = np.asarray(_DEFAULT_ALPHAS if alphas is None else alphas, dtype=np.float64)
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
