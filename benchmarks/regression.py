"""HEST-Benchmark probe: hopt_st vs a restatement of HEST's pipeline with scikit-learn's own objects
(tests/hest_reference.py: StandardScaler -> PCA(256) -> float32 scores -> Ridge(solver="lsqr"), HEST's settings at
github.com/mahmoodlab/HEST afd42c3), same data, same process, same BLAS threads. The comparison with HEST's own
code is kept outside the project (it cannot be copied in: CC BY-NC-SA 4.0).

Two cases, both with 4 samples and leave-one-sample-out folds (as HEST's patient-level splits):

* ``d=1536``: scikit-learn's PCA(256) picks its randomized solver (every 1536-d encoder on HEST's tasks);
* ``d=300``: fewer training spots than 10 x 300, so it picks the exact "full" solver.

For each case, rounds interleave the reference pipeline, ``solver="exact"`` (the default) and
``solver="fast"``; timings are compute only (data in memory). Prints min / median seconds per method, the speed
ratio against the reference, and the largest deviation from its numbers: task mean, fold means and per-gene
Pearson. A last case runs end to end on files: the reference reading the embedding and count files in every
fold (as HEST's benchmark does) against ``bench.run`` on the same folder and embedding files.

    python benchmarks/regression.py [--rounds 3] [--spots-1536 8000] [--spots-300 2800]
    python benchmarks/regression.py --smoke      # small cases, one round (for the test suite)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hest_reference  # noqa: E402

from hopt_st.tl import pearson_per_gene  # noqa: E402
from hopt_st.tl._hest_fast import (  # noqa: E402
    combine_stats,
    fit_from_stats,
    moment_stats,
    replays_pca,
    sklearn_pca_solver,
)
from hopt_st.tl.linear import hest_probe  # noqa: E402

REF = "reference"


def make_data(n_spots, dim, n_samples=4, n_genes=50, seed=0):
    """Embeddings with a decaying spectrum (low-rank signal + noise + per-sample shift) and log1p counts."""
    rng = np.random.default_rng(seed)
    rank = 64
    basis = rng.normal(size=(rank, dim)) * np.linspace(3, 0.3, rank)[:, None]
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


def _folds(data):
    for i in range(len(data)):
        train = [d for j, d in enumerate(data) if j != i]
        yield np.concatenate([d[0] for d in train]), np.concatenate([d[1] for d in train]), data[i]


def run_reference(data):
    """HEST's settings with scikit-learn's objects (StandardScaler, PCA(256, random_state=1), Ridge lsqr), scipy's
    pearsonr per gene."""
    return [
        hest_reference.scores(Yte, hest_reference.probe(Xtr, Ytr, Xte))["pearson"]
        for Xtr, Ytr, (Xte, Yte) in _folds(data)
    ]


def run_exact(data):
    return [pearson_per_gene(Yte, hest_probe(Xtr, Ytr, Xte)[0]) for Xtr, Ytr, (Xte, Yte) in _folds(data)]


def run_fast(data):
    """As bench.run(solver="fast"): moments once per sample, pooled per fold."""
    stats = [moment_stats(X, Y) for X, Y in data]
    out = []
    for i, (Xte, Yte) in enumerate(data):
        n = sum(len(d[1]) for j, d in enumerate(data) if j != i)
        if replays_pca(n, Xte.shape[1]):
            lin = fit_from_stats(combine_stats([s for j, s in enumerate(stats) if j != i]))
            out.append(pearson_per_gene(Yte, lin.predict(Xte)))
        else:  # scikit-learn's exact PCA solvers: "fast" runs the exact path
            Xtr = np.concatenate([d[0] for j, d in enumerate(data) if j != i])
            Ytr = np.concatenate([d[1] for j, d in enumerate(data) if j != i])
            out.append(pearson_per_gene(Yte, hest_probe(Xtr, Ytr, Xte)[0]))
    return out


def deviation(ref, got):
    """max |delta| of the task mean, of the fold means and of the per-gene Pearson (every fold)."""
    fm_r, fm_g = np.array([r.mean() for r in ref]), np.array([g.mean() for g in got])
    return (
        abs(fm_r.mean() - fm_g.mean()),
        np.abs(fm_r - fm_g).max(),
        max(np.abs(r - g).max() for r, g in zip(ref, got)),
    )


def bench_case(dim, n_spots, rounds, n_samples=4):
    data = make_data(n_spots, dim, n_samples=n_samples)
    n_train = sum(len(d[1]) for d in data[1:])
    solver = sklearn_pca_solver(n_train, dim, 256)
    print(
        f"\nd={dim}: {n_spots} spots, {n_samples} samples, {n_samples} folds (n_train={n_train}); "
        f"scikit-learn PCA solver: {solver}"
    )
    methods = {REF: run_reference, "hopt_st exact": run_exact, "hopt_st fast": run_fast}
    times = {m: [] for m in methods}
    results = {}
    for _ in range(rounds):  # interleaved rounds
        for name, fn in methods.items():
            t = time.perf_counter()
            results[name] = fn(data)
            times[name].append(time.perf_counter() - t)
    ref = results[REF]
    print(
        f"  {'method':<14} {'min s':>8} {'median s':>9} {'x ref (min/median)':>20}   max |delta| vs reference: task mean, fold mean, per gene"
    )
    t_min, t_med = min(times[REF]), statistics.median(times[REF])
    for name in methods:
        tm, td = min(times[name]), statistics.median(times[name])
        dev = "" if name == REF else "   {:.1e}, {:.1e}, {:.1e}".format(*deviation(ref, results[name]))
        print(f"  {name:<14} {tm:8.2f} {td:9.2f} {t_min / tm:9.1f} / {t_med / td:<8.1f}{dev}")
    print(f"  task mean Pearson (reference): {np.mean([r.mean() for r in ref]):.6f}")


def write_task(root: Path, dim: int, n_samples: int, n_spots: int, model: str, seed=0) -> Path:
    """A task folder in HEST's layout that the reference and bench.run both read (split CSVs, var_50genes.json,
    count files, patch files with the patch index, embedding files), leave-one-sample-out folds."""
    import json

    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    tdir = root / "bench" / "TASK"
    for sub in ("splits", "patches", "adata"):
        (tdir / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"S{i}" for i in range(n_samples)]
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(64, dim)) * np.linspace(3, 0.3, 64)[:, None]
    B = rng.normal(size=(64, 100)) * 0.15
    for sid in ids:
        z = rng.normal(size=(n_spots, 64))
        X = (z @ basis + rng.normal(size=(n_spots, dim)) * 0.5 + 1.0).astype(np.float32)
        counts = rng.poisson(np.exp(np.clip(z @ B, -4, 4))).astype(np.float32)
        bc = [f"{sid}_{j:06d}" for j in range(n_spots)]  # one width: HEST's writer needs one dtype
        coords = np.stack([np.arange(n_spots) * 224, np.zeros(n_spots)], 1).astype(np.int64)
        with h5py.File(tdir / "patches" / f"{sid}.h5", "w") as f:
            f["img"] = np.zeros((n_spots, 8, 8, 3), np.uint8)
            f["coords"] = coords
            f["barcode"] = np.array([b.encode() for b in bc])[:, None]
        a = ad.AnnData(X=sp.csr_matrix(counts))
        a.obs_names, a.var_names = bc, [f"G{g}" for g in range(100)]
        a.write_h5ad(tdir / "adata" / f"{sid}.h5ad")
        emb = root / "emb" / "TASK" / model / f"{sid}.h5"
        emb.parent.mkdir(parents=True, exist_ok=True)
        hest_reference.write_embedding_file(emb, X, bc, coords)
    for i, test in enumerate(ids):
        for name, members in (("train", [s for s in ids if s != test]), ("test", [test])):
            pd.DataFrame(
                {
                    "sample_id": members,
                    "patches_path": [f"patches/{s}.h5" for s in members],
                    "expr_path": [f"adata/{s}.h5ad" for s in members],
                }
            ).to_csv(tdir / "splits" / f"{name}_{i}.csv", index=False)
    (tdir / "var_50genes.json").write_text(json.dumps({"genes": [f"G{g}" for g in range(0, 100, 2)][:50]}))
    return root


def bench_files(dim, n_samples, n_spots, rounds, workdir=None):
    """End to end on files: the reference (which re-reads every sample's files in every fold, as HEST does) vs
    bench.run."""
    import logging
    import tempfile

    from hopt_st import bench

    logging.getLogger("hopt_st").setLevel(logging.ERROR)
    model = "enc"
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = write_task(Path(tmp), dim, n_samples, n_spots, model)
        n_train = (n_samples - 1) * n_spots
        print(
            f"\nend to end on files, d={dim}: {n_samples} samples x {n_spots} spots, {n_samples} leave-one-out folds "
            f"(n_train={n_train}); PCA solver: {sklearn_pca_solver(n_train, dim, 256)}"
        )
        ref_name = "reference on files"
        times = {ref_name: [], "bench.run exact": [], "bench.run fast": []}
        res = {}
        for _ in range(rounds):
            t = time.perf_counter()
            res[ref_name] = hest_reference.run_task(root / "bench" / "TASK", root / "emb" / "TASK" / model)
            times[ref_name].append(time.perf_counter() - t)
            for solver in ("exact", "fast"):
                t = time.perf_counter()
                df = bench.run(root / "bench", model=model, embeddings_dir=root / "emb", solver=solver)
                times[f"bench.run {solver}"].append(time.perf_counter() - t)
                res[f"bench.run {solver}"] = df
        ref = res[ref_name]
        t_min, t_med = min(times[ref_name]), statistics.median(times[ref_name])
        print(
            f"  {'method':<19} {'min s':>8} {'median s':>9} {'x ref (min/median)':>20}   max |delta| vs reference: task mean, fold mean"
        )
        for name, ts in times.items():
            tm, td = min(ts), statistics.median(ts)
            dev = ""
            if name != ref_name:
                df = res[name]
                folds = [f["pearson_mean"] for f in df.attrs["folds"]]
                dev = f"   {abs(df.pearson_mean.iloc[0] - ref['mean']):.1e}, "
                dev += f"{np.abs(np.array(folds) - [f['mean'] for f in ref['folds']]).max():.1e}"
            print(f"  {name:<19} {tm:8.2f} {td:9.2f} {t_min / tm:9.1f} / {t_med / td:<8.1f}{dev}")
        assert len(ref["genes"]) == 50


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--spots-1536", type=int, default=8000)
    ap.add_argument("--spots-300", type=int, default=2800)
    ap.add_argument("--files-samples", type=int, default=6, help="end-to-end case: samples (= folds)")
    ap.add_argument("--files-spots", type=int, default=1500, help="end-to-end case: spots per sample")
    ap.add_argument("--smoke", action="store_true", help="small cases, one round (for the test suite)")
    ap.add_argument(
        "--workdir", default=None, help="folder for the end-to-end case's files (default: system temp)"
    )
    a = ap.parse_args(argv)
    if a.smoke:
        a.rounds, a.files_samples, a.files_spots = 1, 2, 280
    from threadpoolctl import threadpool_info

    blas = [(i["internal_api"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]
    print(f"BLAS: {blas}; {a.rounds} interleaved rounds per case")
    if a.smoke:  # two folds, scikit-learn's randomized PCA (330-d, 510 training spots); files: its full one
        bench_case(330, 1020, a.rounds, n_samples=2)
    else:
        bench_case(1536, a.spots_1536, a.rounds)
        bench_case(300, a.spots_300, a.rounds)
    bench_files(1536 if not a.smoke else 300, a.files_samples, a.files_spots, a.rounds, a.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
