"""HEST's own benchmark statements, transcribed for tests and benchmarks (not part of hopt_st).

Source: github.com/mahmoodlab/HEST at commit afd42c3143092c51e6bcc0f1df65bbf58a467e5e (2025-09-01):

* ``src/hest/bench/benchmark.py``: ``benchmark_grid``, ``predict_single_split`` (after the embedding step),
  ``merge_fold_results``, ``predict_folds``;
* ``src/hest/bench/trainer.py``: ``train_test_reg`` (``method="ridge"``);
* ``src/hest/bench/st_dataset.py``: ``normalize_adata`` (``smooth=False``), ``load_adata``;
* ``src/hest/bench/utils/file_utils.py``: ``read_assets_from_h5``, ``save_hdf5``;
* ``src/hest/bench/utils/utils.py``: ``merge_dict``.

Statements are kept as HEST writes them (its names, its order of operations, its dtypes); only logging,
printing, the encoder/embedding step and the pickle dump are left out, and the ``args`` namespace is a plain
object. HEST's ``BenchmarkConfig`` defaults that matter: ``seed=1``, ``normalize=True``, ``dimreduce="PCA"``,
``latent_dim=256``, ``method="ridge"``, ``gene_list="var_50genes.json"``.
"""

from __future__ import annotations

import json
import os
from operator import itemgetter
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import scanpy as sc
import torch
from scipy.stats import pearsonr
from sklearn.discriminant_analysis import StandardScaler
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline

HEST_COMMIT = "afd42c3143092c51e6bcc0f1df65bbf58a467e5e"


def hest_args(**kw) -> SimpleNamespace:
    """``vars(args)`` of a HEST run with ``BenchmarkConfig``'s defaults (benchmark.py), overridden by ``kw``."""
    args = dict(
        seed=1,
        overwrite=False,
        bench_data_root="eval/bench_data",
        embed_dataroot="eval/ST_data_emb",
        weights_root="eval/fm_v1",
        results_dir="eval/ST_pred_results",
        batch_size=128,
        num_workers=1,
        private_weights_root=None,
        exp_code=None,
        gene_list="var_50genes.json",
        method="ridge",
        alpha=None,
        kfold=False,
        benchmark_encoders=False,
        normalize=True,
        dimreduce="PCA",
        latent_dim=256,
        encoders=["resnet50"],
        datasets=["IDC"],
        config=None,
    )
    args.update(kw)
    return SimpleNamespace(**args)


# -- utils/file_utils.py ---------------------------------------------------------------------------------
def save_hdf5(output_fpath, asset_dict, attr_dict=None, mode="a", auto_chunk=True, chunk_size=None):
    with h5py.File(output_fpath, mode) as f:
        for key, val in asset_dict.items():
            data_shape = val.shape
            if len(data_shape) == 1:
                val = np.expand_dims(val, axis=1)
                data_shape = val.shape
            if key not in f:
                data_type = val.dtype
                if data_type == np.object_:
                    data_type = h5py.string_dtype(encoding="utf-8")
                chunks = True if auto_chunk else (chunk_size,) + data_shape[1:]
                dset = f.create_dataset(
                    key, shape=data_shape, chunks=chunks, maxshape=(None,) + data_shape[1:], dtype=data_type
                )
                if attr_dict is not None and key in attr_dict.keys():
                    for attr_key, attr_val in attr_dict[key].items():
                        dset.attrs[attr_key] = attr_val
                dset[:] = val
            else:
                dset = f[key]
                dset.resize(len(dset) + data_shape[0], axis=0)
                assert dset.dtype == val.dtype
                dset[-data_shape[0] :] = val
    return output_fpath


def read_assets_from_h5(h5_path, keys=None, skip_attrs=False, skip_assets=False):
    assets = {}
    attrs = {}
    with h5py.File(h5_path, "r") as f:
        if keys is None:
            keys = list(f.keys())
        for key in keys:
            if not skip_assets:
                assets[key] = f[key][:]
            if not skip_attrs:
                if f[key].attrs is not None:
                    attrs[key] = dict(f[key].attrs)
    return assets, attrs


def embedding_file_as_hest_writes_it(path, embeddings, barcodes, coords, batch_size=128):
    """``embed_tiles`` (benchmark.py) writing ``<embed_dataroot>/<task>/<encoder>/<sample>.h5``: per batch of
    ``batch_size`` patches, ``{'embeddings': ..., 'barcodes': np.array(<collated list of 1-tuples of bytes>),
    'coords': ...}`` through ``save_hdf5`` (mode 'w' for batch 0, then 'a'). hestcore's ``H5HESTDataset`` reads
    ``barcode`` as ``f['barcode'][...].flatten().tolist()`` (bytes), and torch's default_collate turns that list
    of bytes into a list of 1-tuples, hence ``(chunk, 1)`` fixed-length bytes."""
    barcodes = [b.encode() if isinstance(b, str) else b for b in barcodes]
    for batch_idx, start in enumerate(range(0, len(embeddings), batch_size)):
        sl = slice(start, start + batch_size)
        asset_dict = {
            "embeddings": np.asarray(embeddings[sl]),
            "barcodes": np.array([(b,) for b in barcodes[sl]]),
            "coords": np.asarray(coords[sl]),
        }
        save_hdf5(path, asset_dict=asset_dict, mode="w" if batch_idx == 0 else "a")
    return path


# -- utils/utils.py --------------------------------------------------------------------------------------
def merge_dict(main_dict, new_dict, value_fn=None):
    if value_fn is None:

        def value_fn(x):
            return x

    for key, value in new_dict.items():
        if not isinstance(value, list):
            value = [value]
        value = [value_fn(v) for v in value]
        if key in main_dict:
            main_dict[key] = main_dict[key] + value
        else:
            main_dict[key] = value
    return main_dict


# -- st_dataset.py ---------------------------------------------------------------------------------------
def normalize_adata(adata, smooth=False):
    filtered_adata = adata.copy()
    filtered_adata.X = filtered_adata.X.astype(np.float64)
    sc.pp.log1p(filtered_adata)
    return filtered_adata


def load_adata(expr_path, genes=None, barcodes=None, normalize=False):
    adata = sc.read_h5ad(expr_path)
    if barcodes is not None:
        adata = adata[barcodes]
    if genes is not None:
        adata = adata[:, genes]
    if normalize:
        adata = normalize_adata(adata)
    return adata.to_df()


# -- trainer.py ------------------------------------------------------------------------------------------
def train_test_reg(X_train, X_test, y_train, y_test, max_iter=1000, random_state=0, genes=None, alpha=None):
    alpha = 100 / (X_train.shape[1] * y_train.shape[1])
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=random_state, fit_intercept=False, max_iter=max_iter)
    reg.fit(X_train, y_train)
    preds_all = reg.predict(X_test)
    errors = []
    r2_scores = []
    pearson_corrs = []
    pearson_genes = []
    i = 0
    for target in range(y_test.shape[1]):
        preds = preds_all[:, target]
        target_vals = y_test[:, target]
        l2_error = float(np.mean((preds - target_vals) ** 2))
        r2_score = float(
            1 - np.sum((target_vals - preds) ** 2) / np.sum((target_vals - np.mean(target_vals)) ** 2)
        )
        pearson_corr, _ = pearsonr(target_vals, preds)
        errors.append(l2_error)
        r2_scores.append(r2_score)
        pearson_corrs.append(pearson_corr)
        score_dict = {"name": genes[i], "pearson_corr": pearson_corr}
        pearson_genes.append(score_dict)
        i += 1
    results = {
        "l2_errors": list(errors),
        "r2_scores": list(r2_scores),
        "pearson_corrs": pearson_genes,
        "pearson_mean": float(np.mean(pearson_corrs)),
        "pearson_std": float(np.std(pearson_corrs)),
        "l2_error_q1": float(np.percentile(errors, 25)),
        "l2_error_q2": float(np.median(errors)),
        "l2_error_q3": float(np.percentile(errors, 75)),
        "r2_score_q1": float(np.percentile(r2_scores, 25)),
        "r2_score_q2": float(np.median(r2_scores)),
        "r2_score_q3": float(np.percentile(r2_scores, 75)),
    }
    dump = {"preds_all": preds_all, "targets_all": y_test}
    return results, dump


# -- benchmark.py ----------------------------------------------------------------------------------------
def pca_ridge(X_train, X_test, y_train, y_test, args, genes):
    """The probe of ``predict_single_split``: its PCA statement, then ``train_test_reg``."""
    if args.dimreduce == "PCA":
        from sklearn.decomposition import PCA

        pipe = Pipeline(
            [("scaler", StandardScaler()), ("PCA", PCA(n_components=args.latent_dim, random_state=args.seed))]
        )
        X_train, X_test = torch.Tensor(pipe.fit_transform(X_train)), torch.Tensor(pipe.transform(X_test))
    return train_test_reg(X_train, X_test, y_train, y_test, random_state=args.seed, genes=genes)


def predict_single_split(train_split, test_split, args, save_dir, dataset_name, model_name, bench_data_root):
    """``predict_single_split`` after its embedding step (embeddings already in ``embed_dataroot``)."""
    if not os.path.isfile(train_split):
        train_split = os.path.join(bench_data_root, "splits", train_split)
    if not os.path.isfile(test_split):
        test_split = os.path.join(bench_data_root, "splits", test_split)
    train_df = pd.read_csv(train_split)
    test_df = pd.read_csv(test_split)
    embedding_dir = os.path.join(args.embed_dataroot, dataset_name, model_name)
    with open(os.path.join(save_dir, "config.json"), "w") as f:
        json.dump(vars(args), f, sort_keys=True, indent=4)
    all_split_assets = {}
    with open(os.path.join(bench_data_root, args.gene_list)) as f:
        genes = json.load(f)["genes"]
    for split_key, split in zip(["train", "test"], [train_df, test_df]):
        split_assets = {}
        for i in range(len(split)):
            sample_id = split.iloc[i]["sample_id"]
            embed_path = os.path.join(embedding_dir, f"{sample_id}.h5")
            expr_path = os.path.join(bench_data_root, split.iloc[i]["expr_path"])
            assets, _ = read_assets_from_h5(embed_path)
            barcodes = assets["barcodes"].flatten().astype(str).tolist()
            adata = load_adata(expr_path, genes=genes, barcodes=barcodes, normalize=args.normalize)
            assets["adata"] = adata.values
            split_assets = merge_dict(split_assets, assets)
        for key, val in split_assets.items():
            split_assets[key] = np.concatenate(val, axis=0)
        all_split_assets[split_key] = split_assets
    X_train, y_train = all_split_assets["train"]["embeddings"], all_split_assets["train"]["adata"]
    X_test, y_test = all_split_assets["test"]["embeddings"], all_split_assets["test"]["adata"]
    probe_results, linprobe_dump = pca_ridge(X_train, X_test, y_train, y_test, args, genes)
    probe_summary = {}
    probe_summary.update({"n_train": len(y_train), "n_test": len(y_test)})
    probe_summary.update({key: val for key, val in probe_results.items()})
    with open(os.path.join(save_dir, "results.json"), "w") as f:
        json.dump(probe_results, f, sort_keys=True, indent=4)
    with open(os.path.join(save_dir, "summary.json"), "w") as f:
        json.dump(probe_summary, f, sort_keys=True, indent=4)
    return probe_results


def merge_fold_results(arr):
    aggr_dict = {}
    for dict_ in arr:
        for item in dict_["pearson_corrs"]:
            gene_name = item["name"]
            correlation = item["pearson_corr"]
            aggr_dict[gene_name] = aggr_dict.get(gene_name, []) + [correlation]
    aggr_results = []
    all_corrs = []
    for key, value in aggr_dict.items():
        aggr_results.append(
            {"name": key, "pearson_corrs": value, "mean": np.mean(value), "std": np.std(value)}
        )
        all_corrs += value
    mean_per_split = [d["pearson_mean"] for d in arr]
    return {
        "pearson_corrs": aggr_results,
        "pearson_mean": np.mean(mean_per_split),
        "pearson_std": np.std(mean_per_split),
        "mean_per_split": mean_per_split,
    }


def predict_folds(args, exp_save_dir, model_name, dataset_name, bench_data_root):
    split_dir = os.path.join(bench_data_root, "splits")
    splits = os.listdir(split_dir)
    n_splits = len(splits) // 2
    libprobe_results_arr = []
    for i in range(n_splits):
        train_split = os.path.join(split_dir, f"train_{i}.csv")
        test_split = os.path.join(split_dir, f"test_{i}.csv")
        kfold_save_dir = os.path.join(exp_save_dir, f"split{i}")
        os.makedirs(kfold_save_dir, exist_ok=True)
        linprobe_results = predict_single_split(
            train_split, test_split, args, kfold_save_dir, dataset_name, model_name, bench_data_root
        )
        libprobe_results_arr.append(linprobe_results)
    kfold_results = merge_fold_results(libprobe_results_arr)
    with open(os.path.join(exp_save_dir, "results_kfold.json"), "w") as f:
        p_corrs = kfold_results["pearson_corrs"]
        p_corrs = sorted(p_corrs, key=itemgetter("mean"), reverse=True)
        kfold_results["pearson_corrs"] = p_corrs
        json.dump(kfold_results, f, sort_keys=True, indent=4)
    return kfold_results


def benchmark_grid(args, model_names, datasets, save_dir):
    dataset_perfs = []
    for dataset in datasets:
        bench_data_root = os.path.join(args.bench_data_root, dataset)
        enc_perfs = []
        for model_name in model_names:
            exp_save_dir = os.path.join(save_dir, dataset, model_name)
            os.makedirs(exp_save_dir, exist_ok=True)
            enc_results = predict_folds(args, exp_save_dir, model_name, dataset, bench_data_root)
            enc_perfs.append(
                {
                    "encoder_name": model_name,
                    "pearson_mean": enc_results["pearson_mean"],
                    "pearson_std": enc_results["pearson_std"],
                }
            )
        with open(os.path.join(save_dir, dataset, "enc_results.json"), "w") as f:
            enc_perfs = sorted(enc_perfs, key=itemgetter("pearson_mean"), reverse=True)
            json.dump({"results": enc_perfs}, f, sort_keys=True, indent=4)
        dataset_perfs.append({"dataset_name": dataset, "results": enc_perfs})
    perf_per_enc = {}
    for dataset_perf in dataset_perfs:
        for enc_perf in dataset_perf["results"]:
            perf_per_enc[enc_perf["encoder_name"]] = perf_per_enc.get(enc_perf["encoder_name"], []) + [
                enc_perf["pearson_mean"]
            ]
    row_dicts = []
    for dataset_perf in dataset_perfs:
        row_dict = {}
        row_dict["dataset"] = dataset_perf["dataset_name"]
        for result in dataset_perf["results"]:
            enc_name = result["encoder_name"]
            row_dict[f"{enc_name}_mean"] = result["pearson_mean"]
            row_dict[f"{enc_name}_std"] = result["pearson_std"]
        row_dicts.append(row_dict)
    df = pd.DataFrame(row_dicts)
    df.to_csv(os.path.join(save_dir, "dataset_results.csv"))
    for key, val in perf_per_enc.items():
        perf_per_enc[key] = np.mean(val)
    perf_per_enc = dict(sorted(perf_per_enc.items(), key=lambda item: item[1], reverse=True))
    with open(os.path.join(save_dir, "dataset_results.json"), "w") as f:
        json.dump({"results": dataset_perfs, "average": perf_per_enc}, f, sort_keys=True, indent=4)
    return dataset_perfs, perf_per_enc
