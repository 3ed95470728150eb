"""Linear probes from embeddings to expression, and their building blocks (public; used by :mod:`hopt_st.bench`).

Two estimators live here:

* HEST's linear probe (``"ridge-hest"``): the arithmetic of HEST's own benchmark code (github.com/mahmoodlab/HEST
  at commit ``afd42c3``: ``src/hest/bench/benchmark.py`` ``predict_single_split`` and ``src/hest/bench/trainer.py``
  ``train_test_reg``). scikit-learn's ``StandardScaler`` -> ``PCA(256, random_state=seed)`` with its default
  ``svd_solver="auto"`` (the *randomized* solver for 1536-d embeddings), fitted on the training spots in the
  embeddings' own dtype (float32); the scores are wrapped in ``torch.Tensor`` (float32), which makes scikit-learn
  convert them to **float64** for ``Ridge(solver="lsqr", alpha=100 / (256 * 50), fit_intercept=False,
  max_iter=1000)`` (tol 1e-4): one ``scipy.sparse.linalg.lsqr`` per gene, stopped by its tolerance tests well
  before the minimiser. HEST's seed is 1. :func:`hest_probe` computes it three ways:

  - ``"exact"`` (default): scikit-learn's own scaler and PCA objects, then scipy's LSQR per gene with the very
    arguments scikit-learn passes (:func:`hest_ridge_coef`). LSQR stopped early amplifies any rounding
    difference (a one-ulp change in one matrix product moves a gene's Pearson by ~1e-4), so only HEST's own
    operations give HEST's numbers; these agree with HEST's code to ~1e-15.
  - ``"sklearn"``: scikit-learn's ``Ridge`` too (:func:`fit_hest_ridge_sklearn`); the reference.
  - ``"fast"``: from per-sample moments (:func:`moment_stats`, :func:`combine_stats`), so a fold costs
    ``O(d^2)`` whatever its number of spots: the randomized PCA's power iterations run on the ``d x d``
    covariance (same random test matrix, same number of iterations, same span in exact arithmetic) and LSQR runs
    in the ``k + 1`` coordinates of the PCA basis (:func:`hest_ridge_solve`). Its PCA differs from HEST's by
    HEST's float32 rounding, which LSQR's early stop then amplifies (``benchmarks/regression.py`` prints the
    deviation); where scikit-learn would use an exact PCA solver, or the randomized one on transposed data, it
    runs the exact path (:func:`moments_replay_pca`).

* ``"ridge"``: ridge with an intercept and one alpha per gene chosen by exact leave-one-out error
  (scikit-learn's ``RidgeCV``) or, when groups are given, by group-aware inner cross-validation (ours).

Every fit returns a :class:`LinearMap` ``y = (x - x_mean) @ coef + intercept`` (except :func:`hest_probe`, which
returns HEST's predictions themselves).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.linalg

logger = logging.getLogger(__name__)

HEST_N_COMPONENTS = 256
#: HEST's default seed (``BenchmarkConfig.seed``), used for ``PCA(random_state=seed)``
HEST_SEED = 1
HEST_MAX_ITER = 1000
#: ``Ridge``'s default ``tol`` (HEST leaves it), LSQR's ``atol`` and ``btol``
HEST_TOL = 1e-4
#: how :func:`hest_probe` computes HEST's probe
HEST_SOLVERS = ("exact", "sklearn", "fast")
DEFAULT_ALPHAS = np.logspace(-2, 6, 17)


def check_embeddings(X, name: str = "embeddings", *, keep_dtype: bool = False) -> np.ndarray:
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


def sklearn_pca_solver(n_samples: int, n_features: int, n_components: int) -> str:
    """The solver ``PCA(svd_solver="auto")`` picks (scikit-learn >= 1.5, ``PCA._fit``)."""
    if n_features <= 1_000 and n_samples >= 10 * n_features:
        return "covariance_eigh"
    if max(n_samples, n_features) <= 500:
        return "full"
    if 1 <= n_components < 0.8 * min(n_samples, n_features):
        return "randomized"
    return "full"


# ----------------------------------------------------------------------------------------------------------
# LSQR (scipy.sparse.linalg.lsqr) on PCA scores, all genes at once
# ----------------------------------------------------------------------------------------------------------
@dataclass
class LsqrResult:
    """Solutions of :func:`_lsqr_pca`, one column per right-hand side, with scipy's ``itn`` and ``istop``."""

    x: np.ndarray  # (n_features, n_rhs)
    itn: np.ndarray  # (n_rhs,)
    istop: np.ndarray  # (n_rhs,)


def _sym_ortho(a, b):
    """scipy's ``_sym_ortho`` (stable Givens rotation), elementwise, with its branches."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    c, s, r = np.empty_like(a), np.empty_like(a), np.empty_like(a)
    zb = b == 0
    za = (a == 0) & ~zb
    big_b = ~zb & ~za & (np.abs(b) > np.abs(a))
    rest = ~zb & ~za & ~big_b
    c[zb], s[zb], r[zb] = np.sign(a[zb]), 0.0, np.abs(a[zb])
    c[za], s[za], r[za] = 0.0, np.sign(b[za]), np.abs(b[za])
    tau = a[big_b] / b[big_b]
    s_ = np.sign(b[big_b]) / np.sqrt(1 + tau * tau)
    c[big_b], s[big_b], r[big_b] = s_ * tau, s_, b[big_b] / s_
    tau = b[rest] / a[rest]
    c_ = np.sign(a[rest]) / np.sqrt(1 + tau * tau)
    c[rest], s[rest], r[rest] = c_, c_ * tau, a[rest] / c_
    return c, s, r


def _ERRSTATE():
    """Degenerate columns give inf/nan, as in scipy, without warnings."""
    return np.errstate(divide="ignore", invalid="ignore")


def _lsqr_pca(s, c, p, bnorm, *, damp, atol, btol, conlim, iter_lim) -> LsqrResult:
    """scipy's ``lsqr`` (x0 = 0) on ``A = U diag(s)`` (orthonormal ``U``) for every right-hand side at once.

    Every LSQR u-vector lies in ``span(U) + span(b_perp)``; it is held as its coordinates ``uc`` (k, n_rhs) on
    ``U`` and ``up`` (n_rhs,) on each right-hand side's part outside ``span(U)`` (``b = U c + p b_perp``), so
    nothing of size n_samples is formed. Scalar recurrences and stopping tests are scipy's (1.17); columns leave
    when their tests stop them.
    """
    g = len(bnorm)
    n_features = len(s)
    s = s[:, None]
    eps = np.finfo(np.float64).eps
    out = LsqrResult(np.zeros((n_features, g)), np.zeros(g, dtype=int), np.zeros(g, dtype=int))
    ctol = 1 / conlim if conlim > 0 else 0
    dampsq = damp**2
    with _ERRSTATE():
        beta = bnorm.copy()
        f = np.where(beta > 0, 1 / beta, 1.0)
        uc, up = f * c, f * p
        v = s * uc
        alfa = np.sqrt(np.einsum("ij,ij->j", v, v))
        v = np.where(alfa > 0, 1 / alfa, 1.0) * v
    w = v.copy()
    z0 = np.zeros(g)
    st = {  # per-column scalars, in scipy's names
        "alfa": alfa, "beta": beta, "bnorm": bnorm, "rhobar": alfa.copy(), "phibar": beta.copy(),
        "anorm": z0.copy(), "ddnorm": z0.copy(), "res2": z0.copy(), "xxnorm": z0.copy(), "z": z0.copy(),
        "cs2": -np.ones(g), "sn2": z0.copy(), "cols": np.arange(g),
    }  # fmt: skip
    x = np.zeros((n_features, g))
    keep = (alfa * beta) != 0  # arnorm == 0: x = 0 is the answer
    itn = 0
    while True:
        if not keep.all():
            st = {k: a[keep] for k, a in st.items()}
            uc, up, v, w, x = uc[:, keep], up[keep], v[:, keep], w[:, keep], x[:, keep]
        if not len(st["cols"]) or itn >= iter_lim:
            break
        itn += 1
        alfa, beta, anorm = st["alfa"], st["beta"], st["anorm"]
        with _ERRSTATE():
            uc, up = s * v - alfa * uc, -alfa * up  # A v - alfa u
            beta = np.sqrt(np.einsum("ij,ij->j", uc, uc) + up * up)
            bpos = beta > 0
            f = np.where(bpos, 1 / beta, 1.0)
            uc, up = f * uc, f * up
            anorm = np.where(bpos, np.sqrt(anorm**2 + alfa**2 + beta**2 + dampsq), anorm)
            vn = s * uc - beta * v  # A^T u - beta v
            an = np.sqrt(np.einsum("ij,ij->j", vn, vn))
            vn = np.where(an > 0, 1 / an, 1.0) * vn
            v = np.where(bpos, vn, v)
            alfa = np.where(bpos, an, alfa)
            rhobar, phibar = st["rhobar"], st["phibar"]
            if damp > 0:
                rhobar1 = np.sqrt(rhobar**2 + dampsq)
                cs1 = rhobar / rhobar1
                sn1 = damp / rhobar1
                psi = sn1 * phibar
                phibar = cs1 * phibar
            else:
                rhobar1, psi = rhobar, 0.0
            cs, sn, rho = _sym_ortho(rhobar1, beta)
            theta = sn * alfa
            rhobar = -cs * alfa
            phi = cs * phibar
            phibar = sn * phibar
            tau = sn * phi
            t1 = phi / rho
            t2 = -theta / rho
            dk = (1 / rho) * w
            x = x + t1 * w
            w = v + t2 * w
            ddnorm = st["ddnorm"] + np.sqrt(np.einsum("ij,ij->j", dk, dk)) ** 2
            delta = st["sn2"] * rho
            gambar = -st["cs2"] * rho
            rhs = phi - delta * st["z"]
            zbar = rhs / gambar
            xnorm = np.sqrt(st["xxnorm"] + zbar**2)
            gamma = np.sqrt(gambar**2 + theta**2)
            cs2 = gambar / gamma
            sn2 = theta / gamma
            z = rhs / gamma
            xxnorm = st["xxnorm"] + z**2
            acond = anorm * np.sqrt(ddnorm)
            res2 = st["res2"] + psi**2
            rnorm = np.sqrt(phibar**2 + res2)
            arnorm = alfa * np.abs(tau)
            bn = st["bnorm"]
            test1 = rnorm / bn
            test2 = arnorm / (anorm * rnorm + eps)
            test3 = 1 / (acond + eps)
            t1 = test1 / (1 + anorm * xnorm / bn)
            rtol = btol + atol * anorm * xnorm / bn
        istop = np.zeros(len(bn), dtype=int)
        for code, hit in (
            (7, np.full(len(bn), itn >= iter_lim)),
            (6, 1 + test3 <= 1),
            (5, 1 + test2 <= 1),
            (4, 1 + t1 <= 1),
            (3, test3 <= ctol),
            (2, test2 <= atol),
            (1, test1 <= rtol),
        ):
            istop[hit] = code
        st.update(
            alfa=alfa, beta=beta, anorm=anorm, rhobar=rhobar, phibar=phibar, ddnorm=ddnorm, res2=res2,
            xxnorm=xxnorm, z=z, cs2=cs2, sn2=sn2,
        )  # fmt: skip
        keep = istop == 0
        done = st["cols"][~keep]
        out.x[:, done], out.itn[done], out.istop[done] = x[:, ~keep], itn, istop[~keep]
    return out


def hest_ridge_solve(
    s,
    ZtY,
    ynorm2,
    alpha: float,
    *,
    tol: float = HEST_TOL,
    iter_lim: int = HEST_MAX_ITER,
    conlim: float = 1e8,
) -> np.ndarray:
    """Ridge without intercept on orthogonal PCA scores ``Z`` (``Z^T Z = diag(s**2)``), one column per gene.

    What ``Ridge(solver="lsqr", tol=tol, max_iter=iter_lim)`` computes: LSQR with ``damp = sqrt(alpha)``,
    ``atol = btol = tol``, stopped by its usual tests. Because ``Z = U diag(s)`` has orthonormal ``U``, every LSQR
    vector lives in ``span(U) + span(y_perp)``; the iteration runs exactly in those k+1 coordinates (all genes at
    once), so it costs O(k * n_genes) per step instead of O(n_spots * k * n_genes).

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
    pos = s > 0
    c = np.zeros_like(ZtY)
    c[pos] = ZtY[pos] / s[pos, None]  # coordinates of y on U
    bnorm = np.sqrt(np.asarray(ynorm2, dtype=np.float64))
    bperp = np.sqrt(np.clip(bnorm**2 - np.sum(c * c, axis=0), 0.0, None))
    res = _lsqr_pca(
        s, c, bperp, bnorm, damp=np.sqrt(alpha), atol=tol, btol=tol, conlim=conlim, iter_lim=iter_lim
    )
    return res.x


# ----------------------------------------------------------------------------------------------------------
# HEST's probe
# ----------------------------------------------------------------------------------------------------------
def _as_torch_tensor_values(Z) -> np.ndarray:
    """What ``Ridge`` gets from HEST's ``torch.Tensor(scores)``: float32 values, converted to float64."""
    return np.asarray(Z, dtype=np.float32).astype(np.float64)


def hest_pca(X_train, X_test=None, *, n_components: int = HEST_N_COMPONENTS, seed: int = HEST_SEED):
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
    k = hest_n_components(X_train.shape[0], X_train.shape[1], n_components)
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


def hest_ridge_coef(
    Z_train, Y_train, *, tol: float = HEST_TOL, max_iter: int = HEST_MAX_ITER, n_jobs: int | None = None
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
    sqrt_alpha = np.sqrt(np.asarray(hest_alpha(Z.shape[1], g), dtype=np.float64))

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
    n_components: int = HEST_N_COMPONENTS,
    seed: int = HEST_SEED,
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
        ``"exact"``, ``"sklearn"`` or ``"fast"``, see the module docstring.
    n_jobs
        ``"exact"``: threads solving genes in parallel (see :func:`hest_ridge_coef`).

    Returns
    -------
    (numpy.ndarray, int)
        Predictions (n_test, n_genes), float64 as HEST's ``reg.predict``, and the number of PCA components used.
    """
    if solver not in HEST_SOLVERS:
        raise ValueError(f"solver={solver!r} must be one of {HEST_SOLVERS}.")
    X_train = np.asarray(X_train)
    Y_train = np.asarray(Y_train, dtype=np.float64)
    k = min(n_components, *X_train.shape)
    if solver == "fast" and moments_replay_pca(*X_train.shape, n_components):
        lin = fit_hest_ridge_from_stats(
            moment_stats(X_train, Y_train), n_components=n_components, seed=seed, dtype=X_train.dtype
        )
        return lin.predict(X_test), k
    if solver == "sklearn":
        pipe = fit_hest_ridge_sklearn(X_train, Y_train, n_components=n_components, seed=seed)
        return pipe.predict(np.asarray(X_test)), k
    Z_train, Z_test, _ = hest_pca(X_train, X_test, n_components=n_components, seed=seed)
    coef = hest_ridge_coef(Z_train, Y_train, n_jobs=n_jobs)
    return _as_torch_tensor_values(Z_test) @ coef.T, k


def fit_hest_ridge_sklearn(X, Y, *, n_components: int = HEST_N_COMPONENTS, seed: int = HEST_SEED):
    """HEST's pipeline with scikit-learn's own objects (the reference; slow): ``StandardScaler -> PCA ->
    float32 scores as float64 (HEST's torch.Tensor) -> Ridge(lsqr)``. Returns the fitted Pipeline."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    X = np.asarray(X)  # the caller's dtype: HEST runs the pipeline on float32 embeddings
    if X.dtype.kind != "f":
        X = X.astype(np.float64)
    k = hest_n_components(X.shape[0], X.shape[1], n_components)
    pipe = Pipeline(
        [
            ("scaler", StandardScaler()),
            ("PCA", PCA(n_components=k, random_state=seed)),
            ("torch_tensor", FunctionTransformer(_as_torch_tensor_values)),
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


def _randomized_pca_from_gram(C, R, k: int, n_samples: int, seed: int, dtype):
    """scikit-learn's randomized PCA (``_randomized_svd``, not transposed) of data ``A`` given only
    ``C = A^T A`` and ``R = A^T Y``: singular values, right singular vectors (d, k) and ``U^T Y`` (k, g).

    Same Gaussian test matrix (``RandomState(seed).normal(size=(d, k + 10))``, cast to the data's dtype), same
    number of power iterations; the normalisations in between only change the basis of each iterate, not its
    span, so ``A (A^T A)^q Omega`` spans what scikit-learn's range finder spans. ``Q = A W T`` with
    ``T = E diag(lambda)^-1/2`` from ``W^T C W = E diag(lambda) E^T`` is an orthonormal basis of it, and
    ``B = Q^T A = T^T W^T C``, ``Q^T Y = T^T W^T R`` are all the SVD step needs.
    """
    d = C.shape[0]
    n_random = k + 10
    n_iter = 7 if k < 0.1 * min(n_samples, d) else 4
    omega = np.random.RandomState(seed).normal(size=(d, n_random))
    if np.dtype(dtype) == np.float32:
        omega = omega.astype(np.float32)
    W = omega.astype(np.float64)
    for _ in range(n_iter):
        W, _ = np.linalg.qr(C @ W)
    CW = C @ W
    G = W.T @ CW
    lam, E = np.linalg.eigh((G + G.T) / 2)
    ok = lam > lam.max() * n_random * np.finfo(np.float64).eps
    T = E[:, ok] / np.sqrt(lam[ok])
    Uhat, s, Vt = np.linalg.svd(T.T @ CW.T, full_matrices=False)
    c = Uhat[:, :k].T @ (T.T @ (W.T @ R))
    return s[:k], Vt[:k].T, c


def fit_hest_ridge_from_stats(
    stats: MomentStats,
    *,
    n_components: int = HEST_N_COMPONENTS,
    seed: int = HEST_SEED,
    dtype=np.float32,
) -> LinearMap:
    """HEST's ridge probe from pooled moments (``solver="fast"``, see the module docstring).

    Parameters
    ----------
    stats
        Moments of the training spots (:func:`moment_stats`, :func:`combine_stats`).
    n_components
        PCA dimension (256).
    seed
        ``PCA(random_state=seed)``.
    dtype
        dtype of the embeddings HEST would run its PCA on (float32: the random test matrix is cast to it).
    """
    d = stats.css.shape[0]
    g = stats.cxy.shape[1]
    k = hest_n_components(stats.n, d, n_components)
    scale = _standard_scale(np.diag(stats.css) / stats.n)
    C = stats.css / np.outer(scale, scale)
    R = stats.cxy / scale[:, None]
    solver = sklearn_pca_solver(stats.n, d, k)
    if solver == "randomized" and stats.n >= d:
        s, V, c = _randomized_pca_from_gram(C, R, k, stats.n, seed, dtype)
    else:
        if solver == "randomized":  # scikit-learn's range finder then works on A^T: not replayed from moments
            logger.info(
                "ridge-hest fast: %d spots < %d dims, exact PCA instead of scikit-learn's randomized PCA.",
                stats.n,
                d,
            )
        lam, V = scipy.linalg.eigh(C, subset_by_index=[d - k, d - 1], driver="evr", check_finite=False)
        lam, V = np.clip(lam[::-1], 0.0, None), V[:, ::-1]
        s = np.sqrt(lam)
        c = np.divide(V.T @ R, s[:, None], out=np.zeros((k, g)), where=s[:, None] > 0)
    W = hest_ridge_solve(s, s[:, None] * c, stats.syy, hest_alpha(k, g))
    coef = (V @ W) / scale[:, None]
    return LinearMap(x_mean=stats.mean, coef=coef, intercept=np.zeros(g))


def moments_replay_pca(n_samples: int, n_features: int, n_components: int = HEST_N_COMPONENTS) -> bool:
    """Whether ``solver="fast"`` can replay HEST's PCA from moments: scikit-learn picks its randomized solver and
    does not transpose the data (at least as many spots as dimensions; the case of 1536-d encoders). Its exact
    solvers run in float32 on the data (``"full"``: SVD, ``"covariance_eigh"``: float32 covariance), whose
    rounding in the trailing components moves HEST's scores by ~1e-4; and a transposed randomized solver draws
    its test matrix in spot space. There ``"fast"`` runs the exact path."""
    k = min(n_components, n_samples, n_features)
    return sklearn_pca_solver(n_samples, n_features, k) == "randomized" and n_samples >= n_features


def fit_hest_ridge(X, Y, *, n_components: int = HEST_N_COMPONENTS, seed: int = HEST_SEED) -> LinearMap:
    """HEST's ridge probe (standardise, PCA, ridge without intercept) as a :class:`LinearMap`, computed from the
    moments of ``(X, Y)`` (``solver="fast"`` of :func:`hest_probe`), or HEST's own arithmetic unless
    :func:`moments_replay_pca`."""
    X = np.asarray(X)
    if moments_replay_pca(*X.shape, n_components):
        return fit_hest_ridge_from_stats(
            moment_stats(X, Y), n_components=n_components, seed=seed, dtype=X.dtype
        )
    Z, _, pipe = hest_pca(X, n_components=n_components, seed=seed)
    coef = hest_ridge_coef(Z, Y)  # (g, k) on the PCA scores
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
