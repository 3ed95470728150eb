"""An independent restatement of HEST-Benchmark's linear probe, for tests and benchmarks (not part of hopt_st).

Written here from facts about HEST's benchmark (github.com/mahmoodlab/HEST at commit ``HEST_COMMIT``); no line of
HEST's code is in it. It calls scikit-learn's and scipy's public objects (``StandardScaler``, ``PCA``, ``Ridge``,
``pearsonr``) with HEST's settings, and never :func:`hopt_st.tl.hest_probe` or :mod:`hopt_st.bench`, so a test
comparing the two compares two implementations. The facts, with their place at that commit:

* defaults: ``seed = 1``, ``latent_dim = 256``, ``normalize = True``, ``gene_list = "var_50genes.json"``
  (``src/hest/bench/benchmark.py:76,99,104,106``);
* the probe: ``StandardScaler`` then ``PCA(n_components=256, random_state=seed)`` with scikit-learn's default
  solver, fitted on the training spots in the embeddings' dtype; both score matrices wrapped in
  ``torch.Tensor`` (float32) (``benchmark.py:314-315``); then
  ``Ridge(solver="lsqr", alpha=100 / (n_components * n_genes), random_state=seed, fit_intercept=False,
  max_iter=1000)`` (``src/hest/bench/trainer.py:8-20``), which scikit-learn runs in float64;
* targets: the counts of the embedding file's barcodes and the task's genes, as float64, ``log1p``
  (``src/hest/bench/st_dataset.py:13-16,33,37-45``; ``benchmark.py:296-298``);
* scores: per gene ``scipy.stats.pearsonr`` on the pooled test spots, squared error and R² (``trainer.py:66-80``);
  the fold score is the mean over genes, the task score the mean (and population std) of the fold means
  (``benchmark.py:331-352``); folds are ``splits/train_<i>.csv`` / ``test_<i>.csv`` for ``i`` below half the
  number of files in ``splits/`` (``benchmark.py:361-365``);
* embedding files (``embed_tiles``, ``benchmark.py:190-214``, through ``save_hdf5``,
  ``src/hest/bench/utils/file_utils.py:18-60``): datasets ``embeddings`` (n, d), ``barcodes`` (n, 1) bytes and
  ``coords`` (n, 2), each resizable along the first axis and grown one batch of ``batch_size`` (128) spots at a
  time.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

HEST_COMMIT = "afd42c3143092c51e6bcc0f1df65bbf58a467e5e"
SEED = 1
N_COMPONENTS = 256

#: the keys of HEST's ``config.json`` (``vars(args)`` of ``BenchmarkConfig``, ``benchmark.py:69-109``)
CONFIG_KEYS = sorted(
    "seed overwrite bench_data_root embed_dataroot weights_root results_dir batch_size num_workers "
    "private_weights_root exp_code gene_list method alpha kfold benchmark_encoders normalize dimreduce "
    "latent_dim encoders datasets config".split()
)
#: per-fold result keys (``trainer.py:87-97``); ``summary.json`` adds ``n_train`` and ``n_test``
FOLD_KEYS = sorted(
    "l2_errors r2_scores pearson_corrs pearson_mean pearson_std l2_error_q1 l2_error_q2 l2_error_q3 "
    "r2_score_q1 r2_score_q2 r2_score_q3".split()
)


def result_files(task: str, encoder: str, n_folds: int) -> set[str]:
    """The JSON and CSV files HEST's ``benchmark_grid`` leaves in its results folder for one task and encoder
    (``benchmark.py:120-174, 275-327, 355-382``; its ``inference_dump.pkl`` pickles are left out)."""
    files = {"dataset_results.json", "dataset_results.csv", f"{task}/enc_results.json"}
    files.add(f"{task}/{encoder}/results_kfold.json")
    for i in range(n_folds):
        files.update(f"{task}/{encoder}/split{i}/{name}.json" for name in ("config", "results", "summary"))
    return files


def write_embedding_file(path, embeddings, barcodes, coords, batch_size: int = 128) -> Path:
    """An embedding file in HEST's layout, grown batch by batch as HEST's embedding step grows it."""
    embeddings = np.asarray(embeddings)
    names = np.array([[b if isinstance(b, bytes) else str(b).encode()] for b in barcodes])
    columns = {"embeddings": embeddings, "barcodes": names, "coords": np.asarray(coords)}
    with h5py.File(path, "w") as f:
        for start in range(0, len(embeddings), batch_size):
            for key, full in columns.items():
                part = full[start : start + batch_size]
                if key in f:
                    f[key].resize(f[key].shape[0] + len(part), axis=0)
                    f[key][-len(part) :] = part
                else:
                    f.create_dataset(key, data=part, chunks=True, maxshape=(None, *part.shape[1:]))
    return Path(path)


def read_embedding_file(path) -> dict[str, np.ndarray]:
    """Every dataset of an embedding file, as arrays."""
    with h5py.File(path, "r") as f:
        return {key: f[key][()] for key in f}


def probe(X_train, Y_train, X_test, *, seed: int = SEED, n_components: int = N_COMPONENTS) -> np.ndarray:
    """HEST's probe: scaler and PCA on the training spots, float32 scores, a ridge fitted by LSQR; the test
    predictions (float64)."""
    reduce = make_pipeline(StandardScaler(), PCA(n_components=n_components, random_state=seed))
    train_scores = np.float32(reduce.fit_transform(X_train)).astype(np.float64)
    test_scores = np.float32(reduce.transform(X_test)).astype(np.float64)
    Y_train = np.asarray(Y_train, dtype=np.float64)
    penalty = 100 / (train_scores.shape[1] * Y_train.shape[1])
    ridge = Ridge(alpha=penalty, solver="lsqr", fit_intercept=False, max_iter=1000, random_state=seed)
    return ridge.fit(train_scores, Y_train).predict(test_scores)


def scores(Y_test, pred) -> dict[str, np.ndarray]:
    """Per gene (columns): Pearson (scipy), mean squared error and R² of ``pred`` against ``Y_test``."""
    Y_test, pred = np.asarray(Y_test, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    r = np.array([pearsonr(Y_test[:, j], pred[:, j])[0] for j in range(Y_test.shape[1])])
    sq = ((Y_test - pred) ** 2).sum(axis=0)
    centred = ((Y_test - Y_test.mean(axis=0)) ** 2).sum(axis=0)
    return {"pearson": r, "l2": sq / len(Y_test), "r2": 1 - sq / centred}


def _targets(h5ad_path, barcodes, genes) -> np.ndarray:
    counts = ad.read_h5ad(h5ad_path)[list(barcodes), list(genes)].X
    counts = counts.toarray() if scipy.sparse.issparse(counts) else np.asarray(counts)
    return np.log1p(counts.astype(np.float64))


def _split(task_dir: Path, csv: Path, emb_dir: Path, genes) -> tuple[np.ndarray, np.ndarray]:
    X, Y = [], []
    for row in pd.read_csv(csv).itertuples():
        assets = read_embedding_file(emb_dir / f"{row.sample_id}.h5")
        X.append(assets["embeddings"])
        Y.append(_targets(task_dir / row.expr_path, assets["barcodes"].ravel().astype(str), genes))
    return np.concatenate(X), np.concatenate(Y)


def run_task(task_dir, emb_dir, *, genes_file: str = "var_50genes.json") -> dict:
    """HEST's numbers for one task from embedding files in ``emb_dir`` (``<sample_id>.h5``): per fold the
    per-gene scores and sizes, then the task mean and std of the fold means."""
    import json

    task_dir, emb_dir = Path(task_dir), Path(emb_dir)
    genes = json.loads((task_dir / genes_file).read_text())["genes"]
    folds = []
    for i in range(len(list((task_dir / "splits").iterdir())) // 2):
        X_tr, Y_tr = _split(task_dir, task_dir / "splits" / f"train_{i}.csv", emb_dir, genes)
        X_te, Y_te = _split(task_dir, task_dir / "splits" / f"test_{i}.csv", emb_dir, genes)
        fold = scores(Y_te, probe(X_tr, Y_tr, X_te))
        folds.append(
            {**fold, "mean": float(np.mean(fold["pearson"])), "n_train": len(X_tr), "n_test": len(X_te)}
        )
    means = [f["mean"] for f in folds]
    return {"genes": genes, "folds": folds, "mean": float(np.mean(means)), "std": float(np.std(means))}
