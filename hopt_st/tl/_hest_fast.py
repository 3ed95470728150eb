"""``solver="fast"`` of HEST's linear probe: from per-sample moments, opt-in (private).

The default, ``solver="exact"`` (:func:`hopt_st.tl.linear.hest_probe`), runs scikit-learn's scaler and PCA and
scipy's LSQR on the training spots as HEST's benchmark does, and matches HEST's numbers to ~1e-15. This module
computes the same probe from the first and second moments of each sample's embeddings and targets
(:func:`moment_stats`, pooled by :func:`combine_stats`), so a fold costs ``O(d^2)`` whatever its number of spots
and each sample's moments are computed once for all folds.

How it deviates from HEST (and why it is not the default)
    scikit-learn's randomized PCA (its choice for 1536-d embeddings) is replayed on the ``d x d`` covariance:
    the same Gaussian test matrix (``RandomState(seed)``, cast to the embeddings' dtype), the same number of
    power iterations, hence the same subspace in exact arithmetic; LSQR then runs in the ``k + 1`` coordinates of
    the PCA basis (:func:`ridge_solve`), with scipy's recurrences and stopping tests. What differs is rounding:
    HEST's PCA runs in float32 on the spots, this one in float64 on the moments. LSQR stopped early at
    ``tol=1e-4`` amplifies that difference: per-gene Pearson moves by ~1e-4, the task mean by up to ~3e-4 on
    small folds (``benchmarks/regression.py`` prints the deviation). Where scikit-learn would pick an exact PCA
    solver, or run the randomized one on transposed data (fewer spots than dimensions), the moments cannot
    replay it and callers run the exact path instead (:func:`replays_pca`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .linear import (
    _HEST_MAX_ITER,
    _HEST_N_COMPONENTS,
    _HEST_SEED,
    _HEST_TOL,
    LinearMap,
    _hest_alpha,
    _hest_n_components,
    _standard_scale,
)

logger = logging.getLogger(__name__)


@dataclass
class MomentStats:
    """First and second moments of one block of spots (one sample), enough to fit HEST's probe."""

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


def sklearn_pca_solver(n_samples: int, n_features: int, n_components: int) -> str:
    """The solver ``PCA(svd_solver="auto")`` picks (scikit-learn >= 1.5, ``PCA._fit``)."""
    if n_features <= 1_000 and n_samples >= 10 * n_features:
        return "covariance_eigh"
    if max(n_samples, n_features) <= 500:
        return "full"
    if 1 <= n_components < 0.8 * min(n_samples, n_features):
        return "randomized"
    return "full"


def replays_pca(n_samples: int, n_features: int, n_components: int = _HEST_N_COMPONENTS) -> bool:
    """Whether the moments can replay HEST's PCA: scikit-learn picks its randomized solver and does not transpose
    the data (at least as many spots as dimensions; the case of 1536-d encoders). Its exact solvers run in
    float32 on the data, and a transposed randomized solver draws its test matrix in spot space."""
    k = min(n_components, n_samples, n_features)
    return sklearn_pca_solver(n_samples, n_features, k) == "randomized" and n_samples >= n_features


# ----------------------------------------------------------------------------------------------------------
# LSQR (scipy.sparse.linalg.lsqr, x0 = 0) on A = U diag(s) with orthonormal U, every right-hand side at once
# ----------------------------------------------------------------------------------------------------------
@dataclass
class LsqrResult:
    """Solutions of :func:`_lsqr_pca`, one column per right-hand side, with scipy's ``itn`` and ``istop``."""

    x: np.ndarray  # (n_features, n_rhs)
    itn: np.ndarray  # (n_rhs,)
    istop: np.ndarray  # (n_rhs,)


def _sym_ortho(a, b):
    """A stable Givens rotation ``(c, s, r)`` with ``c a + s b = r``, elementwise, branch by branch as scipy's."""
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


def _quiet():
    """Degenerate columns give inf/nan, as in scipy, without warnings."""
    return np.errstate(divide="ignore", invalid="ignore")


def _colnorm(a):
    return np.sqrt(np.einsum("ij,ij->j", a, a))


def _lsqr_init(s, c, p, bnorm):
    """First Golub-Kahan step. The u-vectors are held as coordinates ``uc`` (k, n_rhs) on ``U`` and ``up``
    (n_rhs,) on each right-hand side's part outside ``span(U)``, so nothing of size n_samples is formed."""
    g = len(bnorm)
    with _quiet():
        beta = bnorm.copy()
        f = np.where(beta > 0, 1 / beta, 1.0)
        uc, up = f * c, f * p
        v = s * uc
        alfa = _colnorm(v)
        v = np.where(alfa > 0, 1 / alfa, 1.0) * v
    z0 = np.zeros(g)
    st = {  # per-column scalars (named as in Paige & Saunders' LSQR)
        "alfa": alfa, "beta": beta, "bnorm": bnorm, "rhobar": alfa.copy(), "phibar": beta.copy(),
        "anorm": z0.copy(), "ddnorm": z0.copy(), "res2": z0.copy(), "xxnorm": z0.copy(), "z": z0.copy(),
        "cs2": -np.ones(g), "sn2": z0.copy(), "cols": np.arange(g),
    }  # fmt: skip
    vec = {"uc": uc, "up": up, "v": v, "w": v.copy(), "x": np.zeros((len(s), g))}
    return st, vec, (alfa * beta) != 0  # alfa * beta == 0: x = 0 is the answer


def _bidiag_step(st, vec, s, dampsq):
    """Continue the bidiagonalisation: new ``beta``, ``u``, ``alfa``, ``v`` and ``anorm``."""
    alfa, anorm = st["alfa"], st["anorm"]
    uc, up = s * vec["v"] - alfa * vec["uc"], -alfa * vec["up"]  # A v - alfa u
    beta = np.sqrt(np.einsum("ij,ij->j", uc, uc) + up * up)
    bpos = beta > 0
    f = np.where(bpos, 1 / beta, 1.0)
    vec["uc"], vec["up"] = f * uc, f * up
    anorm = np.where(bpos, np.sqrt(anorm**2 + alfa**2 + beta**2 + dampsq), anorm)
    vn = s * vec["uc"] - beta * vec["v"]  # A^T u - beta v
    an = _colnorm(vn)
    vn = np.where(an > 0, 1 / an, 1.0) * vn
    vec["v"] = np.where(bpos, vn, vec["v"])
    return beta, np.where(bpos, an, alfa), anorm


def _rotate_and_update(st, vec, beta, alfa, damp):
    """Eliminate the damping and the subdiagonal (plane rotations), update ``x`` and ``w``, and return the
    quantities the stopping tests need."""
    rhobar, phibar = st["rhobar"], st["phibar"]
    if damp > 0:
        rhobar1 = np.sqrt(rhobar**2 + damp**2)
        cs1 = rhobar / rhobar1
        psi = (damp / rhobar1) * phibar
        phibar = cs1 * phibar
    else:
        rhobar1, psi = rhobar, 0.0
    cs, sn, rho = _sym_ortho(rhobar1, beta)
    theta = sn * alfa
    rhobar = -cs * alfa
    phi = cs * phibar
    phibar = sn * phibar
    tau = sn * phi
    t1, t2 = phi / rho, -theta / rho
    dk = (1 / rho) * vec["w"]
    vec["x"] = vec["x"] + t1 * vec["w"]
    vec["w"] = vec["v"] + t2 * vec["w"]
    ddnorm = st["ddnorm"] + _colnorm(dk) ** 2
    delta, gambar = st["sn2"] * rho, -st["cs2"] * rho
    rhs = phi - delta * st["z"]
    zbar = rhs / gambar
    xnorm = np.sqrt(st["xxnorm"] + zbar**2)
    gamma = np.sqrt(gambar**2 + theta**2)
    z = rhs / gamma
    st.update(
        alfa=alfa, beta=beta, rhobar=rhobar, phibar=phibar, ddnorm=ddnorm, res2=st["res2"] + psi**2,
        xxnorm=st["xxnorm"] + z**2, z=z, cs2=gambar / gamma, sn2=theta / gamma,
    )  # fmt: skip
    return tau, xnorm


def _stop_codes(st, tau, xnorm, itn, *, atol, btol, ctol, iter_lim):
    """scipy's ``istop`` per column (0: go on)."""
    eps = np.finfo(np.float64).eps
    anorm, bn = st["anorm"], st["bnorm"]
    acond = anorm * np.sqrt(st["ddnorm"])
    rnorm = np.sqrt(st["phibar"] ** 2 + st["res2"])
    arnorm = st["alfa"] * np.abs(tau)
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
    return istop


def _lsqr_pca(s, c, p, bnorm, *, damp, atol, btol, conlim, iter_lim) -> LsqrResult:
    """scipy's ``lsqr`` (x0 = 0) on ``A = U diag(s)`` for every right-hand side ``b = U c + p b_perp`` at once;
    columns leave when scipy's tests (1.17) stop them."""
    g = len(bnorm)
    s = s[:, None]
    out = LsqrResult(np.zeros((len(s), g)), np.zeros(g, dtype=int), np.zeros(g, dtype=int))
    ctol = 1 / conlim if conlim > 0 else 0
    st, vec, keep = _lsqr_init(s, c, p, bnorm)
    itn = 0
    while True:
        if not keep.all():
            st = {k: a[keep] for k, a in st.items()}
            vec = {k: (a[keep] if a.ndim == 1 else a[:, keep]) for k, a in vec.items()}
        if not len(st["cols"]) or itn >= iter_lim:
            break
        itn += 1
        with _quiet():
            beta, alfa, st["anorm"] = _bidiag_step(st, vec, s, damp**2)
            tau, xnorm = _rotate_and_update(st, vec, beta, alfa, damp)
            istop = _stop_codes(st, tau, xnorm, itn, atol=atol, btol=btol, ctol=ctol, iter_lim=iter_lim)
        keep = istop == 0
        done = st["cols"][~keep]
        out.x[:, done], out.itn[done], out.istop[done] = vec["x"][:, ~keep], itn, istop[~keep]
    return out


def ridge_solve(s, ZtY, ynorm2, alpha: float, *, tol=_HEST_TOL, iter_lim=_HEST_MAX_ITER, conlim=1e8):
    """Ridge without intercept on orthogonal PCA scores ``Z`` (``Z^T Z = diag(s**2)``), one column per gene, as
    ``Ridge(solver="lsqr", tol=tol, max_iter=iter_lim)`` computes it: LSQR with ``damp = sqrt(alpha)``,
    ``atol = btol = tol``, in the k+1 coordinates of ``span(U) + span(y_perp)`` (O(k * n_genes) per step).

    ``s``: (k,) singular values of Z; ``ZtY``: (k, g) ``Z^T Y``; ``ynorm2``: (g,) uncentred ``||y||^2``.
    Returns the (k, g) coefficients on the PCA scores.
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


def randomized_pca_from_gram(C, R, k: int, n_samples: int, seed: int, dtype):
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


def fit_from_stats(
    stats: MomentStats, *, n_components: int = _HEST_N_COMPONENTS, seed: int = _HEST_SEED, dtype=np.float32
) -> LinearMap:
    """HEST's probe from pooled moments, as a :class:`~hopt_st.tl.linear.LinearMap`.

    ``dtype``: that of the embeddings HEST would run its PCA on (float32: the random test matrix is cast to
    it). Where :func:`replays_pca` is False the PCA is an exact eigendecomposition of the moments (callers that
    promise HEST's numbers run the exact path there instead).
    """
    d = stats.css.shape[0]
    g = stats.cxy.shape[1]
    k = _hest_n_components(stats.n, d, n_components)
    scale = _standard_scale(np.diag(stats.css) / stats.n)
    C = stats.css / np.outer(scale, scale)
    R = stats.cxy / scale[:, None]
    if replays_pca(stats.n, d, n_components):
        s, V, c = randomized_pca_from_gram(C, R, k, stats.n, seed, dtype)
    else:
        lam, V = scipy.linalg.eigh(C, subset_by_index=[d - k, d - 1], driver="evr", check_finite=False)
        lam, V = np.clip(lam[::-1], 0.0, None), V[:, ::-1]
        s = np.sqrt(lam)
        c = np.divide(V.T @ R, s[:, None], out=np.zeros((k, g)), where=s[:, None] > 0)
    W = ridge_solve(s, s[:, None] * c, stats.syy, _hest_alpha(k, g))
    coef = (V @ W) / scale[:, None]
    return LinearMap(x_mean=stats.mean, coef=coef, intercept=np.zeros(g))


def fit_if_replayable(
    X, Y, *, n_components: int = _HEST_N_COMPONENTS, seed: int = _HEST_SEED
) -> LinearMap | None:
    """``solver="fast"`` on stacked spots: :func:`fit_from_stats` of their moments, or ``None`` where the moments
    cannot replay HEST's PCA (:func:`replays_pca`; the caller runs the exact path then)."""
    if not replays_pca(*X.shape, n_components):
        return None
    return fit_from_stats(moment_stats(X, Y), n_components=n_components, seed=seed, dtype=X.dtype)
