"""HEST protocol fit+evaluate: hopt_st's fast solver vs HEST's scikit-learn pipeline, same data, same run.

Inputs the size of a large task: ~12,000 spots x 1,536 dims x 50 genes, 4 samples = 4 leave-one-out folds.
Embeddings have a decaying spectrum (low-rank signal + noise) like foundation-model features.
Prints both timings, the ratio, and the mean Pearson of each.

    python benchmarks/regression.py [--spots 12000] [--dim 1536]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import pearsonr

from hopt_st.tl._metrics import pearson_per_gene
from hopt_st.tl.linear import combine_stats, fit_hest_ridge_from_stats, fit_hest_ridge_sklearn, moment_stats


def make_data(n_spots, dim, n_genes, n_samples, seed=0):
    rng = np.random.default_rng(seed)
    rank = 64
    basis = rng.normal(size=(rank, dim)) * (np.linspace(3, 0.3, rank)[:, None])
    B = rng.normal(size=(rank, n_genes)) * 0.15
    per = n_spots // n_samples
    data = []
    for _ in range(n_samples):
        z = rng.normal(size=(per, rank))
        X = (z @ basis + rng.normal(size=(per, dim)) * 0.5 + rng.normal(size=dim) * 0.2 + 1.0).astype(
            np.float32
        )
        Y = np.log1p(rng.poisson(np.exp(np.clip(z @ B, -4, 4)))).astype(np.float64)
        data.append((X, Y))
    return data


def run_fast(data):
    stats = [moment_stats(X, Y) for X, Y in data]
    means = []
    for i in range(len(data)):
        lin = fit_hest_ridge_from_stats(combine_stats([s for j, s in enumerate(stats) if j != i]))
        means.append(np.mean(pearson_per_gene(data[i][1], lin.predict(data[i][0]))))
    return float(np.mean(means))


def run_sklearn(data, seed=0):
    means = []
    for i in range(len(data)):
        X = np.vstack([d[0] for j, d in enumerate(data) if j != i])
        Y = np.vstack([d[1] for j, d in enumerate(data) if j != i])
        pred = fit_hest_ridge_sklearn(X, Y, seed=seed).predict(data[i][0])
        Yt = data[i][1]
        means.append(np.mean([pearsonr(Yt[:, g], pred[:, g])[0] for g in range(Yt.shape[1])]))
    return float(np.mean(means))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spots", type=int, default=12000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--genes", type=int, default=50)
    ap.add_argument("--folds", type=int, default=4)
    a = ap.parse_args()
    data = make_data(a.spots, a.dim, a.genes, a.folds)
    # warm-up both paths on a small problem (BLAS/LAPACK thread pools, first-touch allocations)
    small = make_data(2000, a.dim, a.genes, a.folds, seed=1)
    run_fast(small)
    run_sklearn(small)
    t = time.perf_counter()
    r_fast = run_fast(data)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    r_ref = run_sklearn(data)
    t_ref = time.perf_counter() - t
    print(f"data: {a.spots} spots x {a.dim} dims x {a.genes} genes, {a.folds} folds")
    print(
        f"sklearn pipeline (StandardScaler->PCA(256)->Ridge lsqr): {t_ref:8.2f} s  mean Pearson {r_ref:.6f}"
    )
    print(
        f"hopt_st fast (moments + eigh + reduced LSQR):           {t_fast:8.2f} s  mean Pearson {r_fast:.6f}"
    )
    print(f"speed-up: {t_ref / t_fast:.1f}x   |delta mean Pearson|: {abs(r_fast - r_ref):.2e}")


if __name__ == "__main__":
    main()
