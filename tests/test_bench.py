"""HEST-Benchmark: equal to an independent restatement of HEST's probe (tests/hest_reference.py: scikit-learn's
and scipy's objects with HEST's settings, github.com/mahmoodlab/HEST at afd42c3), HEST's embedding and result
files, the cache, strict protocol, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hest_reference import (
    CONFIG_KEYS,
    FOLD_KEYS,
    read_embedding_file,
    result_files,
    run_task,
    write_embedding_file,
)

import hopt_st as hs
import hopt_st.pp._cohort as cohort_task
from hopt_st import bench, models

N_PIX = 12  # tiny patches: the test "encoder" is a fixed function of the pixels


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """OpenBLAS threads on a few shared cores are slower than one (a 520 x 1536 randomized PCA: 3 s vs 0.4 s
    here); every comparison with HEST's code below runs both sides under this same setting."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _write_task(root, task="TINY", n_samples=4, n_spots=300, n_genes=80, seed=0):
    """A HEST-Benchmark task folder in the real layout (splits/, patches/, adata/, var_50genes.json)."""
    rng = np.random.default_rng(seed)
    tdir = Path(root) / task
    for sub in ("splits", "patches", "adata"):
        (tdir / sub).mkdir(parents=True, exist_ok=True)
    B = rng.normal(size=(6, n_genes)) * 0.6
    P = rng.normal(size=(6, N_PIX * N_PIX * 3))  # latent -> pixels, shared by all samples
    ids = [f"S{i}" for i in range(n_samples)]
    for sid in ids:
        z = rng.normal(size=(n_spots, 6))
        img = np.clip(128 + 40 * (z @ P / 3) + rng.normal(size=(n_spots, P.shape[1])) * 25, 0, 255)
        img = img.astype(np.uint8).reshape(n_spots, N_PIX, N_PIX, 3)
        bc = np.array([f"{sid}_{j}".encode() for j in range(n_spots)])[:, None]
        coords = np.stack([np.arange(n_spots) * 10, np.zeros(n_spots)], 1).astype(np.int64)
        with h5py.File(tdir / "patches" / f"{sid}.h5", "w") as f:
            f["img"] = img
            f["coords"] = coords
            f["barcode"] = bc
        counts = rng.poisson(np.exp(0.3 + z @ B * 0.5))
        a = ad.AnnData(X=sp.csr_matrix(counts[::-1].astype(np.float32)))  # rows in another order than patches
        a.obs_names = [b.decode() for b in bc[::-1, 0]]
        a.var_names = [f"G{g:03d}" for g in range(n_genes)]
        a.write_h5ad(tdir / "adata" / f"{sid}.h5ad")
    folds = [(["S1", "S3"], ["S0", "S2"]), (["S0", "S2"], ["S1", "S3"])]  # patients {S0, S2} and {S1, S3}
    for i, (tr, te) in enumerate(folds):
        for name, ss in (("train", tr), ("test", te)):
            pd.DataFrame(
                {
                    "sample_id": ss,
                    "patches_path": [f"patches/{s}.h5" for s in ss],
                    "expr_path": [f"adata/{s}.h5ad" for s in ss],
                }
            ).to_csv(tdir / "splits" / f"{name}_{i}.csv", index=False)
    genes = [f"G{g:03d}" for g in rng.permutation(n_genes)[:50]]  # a fixed list in no particular order
    (tdir / "var_50genes.json").write_text(json.dumps({"genes": genes}))
    return {"task": task, "ids": ids, "folds": folds, "genes": genes, "dir": tdir, "root": Path(root)}


def _fake_embed(path, dim=300):
    """A deterministic, full-rank, non-linear 'encoder' of the patch pixels (float32, as encoders store)."""
    with h5py.File(path, "r") as f:
        img = f["img"][:].reshape(len(f["img"]), -1).astype(np.float64) / 255.0
    proj = np.random.default_rng(dim).normal(size=(img.shape[1], dim)) / np.sqrt(img.shape[1])
    return np.tanh((img - 0.5) @ proj * 6).astype(np.float32)


def _write_hest_embeddings(task, emb_root, model, dim):
    """Embedding files exactly as HEST's embed_tiles writes them, for every sample of the task."""
    paths = {}
    for sid in task["ids"]:
        p = task["dir"] / "patches" / f"{sid}.h5"
        with h5py.File(p) as f:
            bc, coords = f["barcode"][:, 0], f["coords"][:]
        out = Path(emb_root) / task["task"] / model / f"{sid}.h5"
        out.parent.mkdir(parents=True, exist_ok=True)
        paths[sid] = write_embedding_file(out, _fake_embed(p, dim), list(bc), coords)
    return paths


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _set_encoder(monkeypatch, fn):
    """bench.run computes through embed_cohort's per-sample task: replace its encoder call by
    ``fn(patch file)``."""
    monkeypatch.setattr(cohort_task, "embed", lambda source, encoder, **kw: fn(source.path))


@pytest.fixture
def no_encoder(monkeypatch):
    monkeypatch.setattr(cohort_task, "get_encoder", lambda *a, **k: pytest.fail("encoder built"))
    monkeypatch.setattr(cohort_task, "embed", lambda *a, **k: pytest.fail("encoder called"))


@pytest.fixture
def fake_models(register_spec):
    """Weight-free stand-in models (the tests set their embeddings): "fake", "m1", "m2", "nan"."""
    base = models.get_spec("handcrafted")
    register_spec(*(dataclasses.replace(base, name=n, dim=300) for n in ("fake", "m1", "m2", "nan")))


@pytest.fixture
def counting_encoder(monkeypatch, fake_models):
    calls = []

    def fake(path):
        calls.append(str(path))
        return _fake_embed(path)

    _set_encoder(monkeypatch, fake)
    return calls


def _json_keys(obj):
    """The key structure of a JSON value (values dropped), to compare file layouts."""
    if isinstance(obj, dict):
        return {k: _json_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_keys(v) for v in obj[:1]]
    return type(obj).__name__


def _tree(root: Path) -> dict[str, object]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------- equality with HEST's code
@pytest.mark.parametrize(("dim", "pca_solver"), [(1536, "randomized"), (300, "full")])
def test_hest_protocol_equals_hest_reference(tmp_path, no_encoder, dim, pca_solver):
    """bench.run on embedding files in HEST's layout == the restatement of HEST's probe (hest_reference.py:
    scikit-learn's Ridge, not hopt_st's solver) on the same files: task mean, fold means, every per-gene
    Pearson, l2/r2; and HEST's result files, names and keys."""
    from sklearn.decomposition import PCA

    task = _write_task(tmp_path / "bench", task="TINY", n_spots=260)
    model = "custom_encoder"  # any name: nothing is looked up when the embeddings exist
    emb = tmp_path / "ST_data_emb"
    hest_files = _write_hest_embeddings(task, emb, model, dim)
    before = {sid: _digest(p) for sid, p in hest_files.items()}

    ref = run_task(task["dir"], emb / "TINY" / model)
    # the case is the one claimed: scikit-learn's "auto" picks this PCA solver on the training spots
    X_tr = np.concatenate([read_embedding_file(hest_files[s])["embeddings"] for s in task["folds"][0][0]])
    assert X_tr.shape == (520, dim) and X_tr.dtype == np.float32
    assert PCA(n_components=256, random_state=1).fit(X_tr)._fit_svd_solver == pca_solver

    out = tmp_path / "ours"
    df = bench.run(task["root"], tasks="TINY", model=model, embeddings_dir=emb, out_dir=out)
    assert {sid: _digest(p) for sid, p in hest_files.items()} == before  # the user's files are untouched
    assert df.attrs["provenance"]["embeddings"]["TINY"] == {s: "file" for s in task["ids"]}

    row = df.iloc[0]
    assert (row.task, row.model, row.protocol, row.n_folds, row.hest_comparable) == (
        "TINY",
        model,
        "hest",
        2,
        True,
    )
    assert row.pearson_mean > 0.2  # there is signal to get right
    assert abs(row.pearson_mean - ref["mean"]) <= 1e-6
    assert abs(row.pearson_std - ref["std"]) <= 1e-6
    ours_split = [f["pearson_mean"] for f in df.attrs["folds"]]
    np.testing.assert_allclose(ours_split, [f["mean"] for f in ref["folds"]], rtol=0, atol=1e-6)
    for i, fold in enumerate(ref["folds"]):
        mine = json.loads((out / "hest" / "TINY" / model / f"split{i}" / "summary.json").read_text())
        assert sorted(mine) == sorted([*FOLD_KEYS, "n_train", "n_test"])
        assert [d["name"] for d in mine["pearson_corrs"]] == ref["genes"]  # HEST's gene order
        got = [d["pearson_corr"] for d in mine["pearson_corrs"]]
        np.testing.assert_allclose(got, fold["pearson"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(mine["l2_errors"], fold["l2"], rtol=1e-9)
        np.testing.assert_allclose(mine["r2_scores"], fold["r2"], rtol=1e-9)
        assert (mine["n_train"], mine["n_test"]) == (fold["n_train"], fold["n_test"]) == (520, 520)
    pg = df.attrs["per_gene"].set_index("gene")["pearson"]
    ref_pg = np.mean([f["pearson"] for f in ref["folds"]], axis=0)
    np.testing.assert_allclose(pg[ref["genes"]].to_numpy(), ref_pg, rtol=0, atol=1e-6)

    # HEST's result files: the same names, keys and nesting
    tree = out / "hest"
    assert set(_tree(tree)) == result_files("TINY", model, 2)
    config = json.loads((tree / "TINY" / model / "split0" / "config.json").read_text())
    assert sorted(config) == CONFIG_KEYS and (config["seed"], config["latent_dim"]) == (1, 256)
    assert (config["dimreduce"], config["method"], config["normalize"], config["encoders"]) == (
        "PCA",
        "ridge",
        True,
        [model],
    )
    kfold = json.loads((tree / "TINY" / model / "results_kfold.json").read_text())
    assert _json_keys(kfold) == {
        "pearson_corrs": [{"name": "str", "pearson_corrs": ["float"], "mean": "float", "std": "float"}],
        "pearson_mean": "float",
        "pearson_std": "float",
        "mean_per_split": ["float"],
    }
    means = [d["mean"] for d in kfold["pearson_corrs"]]
    assert means == sorted(means, reverse=True)  # genes by mean Pearson, descending
    entry = {"encoder_name": "str", "pearson_mean": "float", "pearson_std": "float"}
    assert _json_keys(json.loads((tree / "TINY" / "enc_results.json").read_text())) == {"results": [entry]}
    dataset = json.loads((tree / "dataset_results.json").read_text())
    assert _json_keys(dataset) == {
        "results": [{"dataset_name": "str", "results": [entry]}],
        "average": {model: "float"},
    }
    assert abs(dataset["average"][model] - ref["mean"]) <= 1e-6
    csv = pd.read_csv(tree / "dataset_results.csv")
    assert list(csv.columns) == ["Unnamed: 0", "dataset", f"{model}_mean", f"{model}_std"]
    np.testing.assert_allclose(csv[f"{model}_mean"], [ref["mean"]], rtol=0, atol=1e-6)
    assert all((out / name).is_file() for name in ("results.csv", "results.md", "provenance.json"))


# ---------------------------------------------------------------------------------- embedding files and cache
def test_cache_in_hest_layout_reused_and_recomputed_when_stale_or_truncated(
    tmp_path, counting_encoder, caplog
):
    task = _write_task(tmp_path / "bench", n_spots=120)
    emb = tmp_path / "emb"
    first = bench.run(task["root"], model="fake", embeddings_dir=emb)
    assert len(counting_encoder) == 4  # each sample embedded once, shared by both folds
    assert first.attrs["provenance"]["embeddings"]["TINY"] == {s: "computed" for s in task["ids"]}
    f0 = emb / "TINY" / "fake" / "S0.h5"
    # HEST's layout, readable by HEST's own reader, plus our provenance
    assets = read_embedding_file(f0)
    assert set(assets) == {"embeddings", "barcodes", "coords", "centers"}  # HEST's, and exact centres
    assert assets["embeddings"].shape == (120, 300) and assets["embeddings"].dtype == np.float32
    assert assets["barcodes"].shape == (120, 1) and assets["barcodes"].dtype.kind == "S"
    with h5py.File(task["dir"] / "patches" / "S0.h5") as f:
        np.testing.assert_array_equal(assets["coords"], f["coords"][:])
        np.testing.assert_array_equal(assets["barcodes"], f["barcode"][:])
    np.testing.assert_array_equal(assets["embeddings"], _fake_embed(task["dir"] / "patches" / "S0.h5"))
    with h5py.File(f0) as f:
        assert (
            len(f.attrs["hopt_st_fingerprint"]) == 64
            and json.loads(f.attrs["hopt_st_provenance"])["model"] == "fake"
        )

    again = bench.run(task["root"], model="fake", embeddings_dir=emb)
    assert len(counting_encoder) == 4 and again.pearson_mean.iloc[0] == first.pearson_mean.iloc[0]
    assert set(again.attrs["provenance"]["embeddings"]["TINY"].values()) == {"cache"}

    # a truncated file of ours: recomputed with a warning, not a crash (issue 10)
    f0.write_bytes(f0.read_bytes()[: f0.stat().st_size // 2])
    # a stale one (its patch file changed since): refused as embed_cohort refuses it, naming what differs
    os.utime(task["dir"] / "patches" / "S1.h5", ns=(1, 1))
    s1 = emb / "TINY" / "fake" / "S1.h5"
    stale = _digest(s1)
    with pytest.raises(
        ValueError, match=r"S1\.h5' exists and was computed with other source files than this"
    ):
        bench.run(task["root"], model="fake", embeddings_dir=emb)
    assert _digest(s1) == stale  # left as it was
    cohort = hs.pp.embed_cohort(task["dir"], "fake", emb / "TINY")  # the same rule, the same words
    row = cohort.set_index("sample").loc["S1"]
    assert row.status == "failed" and "computed with other source files than this run" in row.error
    with caplog.at_level(logging.WARNING, logger="hopt_st"):
        third = bench.run(task["root"], model="fake", embeddings_dir=emb, overwrite=True)
    assert sorted(Path(c).name for c in counting_encoder[4:]) == ["S0.h5", "S1.h5"]
    assert "unreadable" in caplog.text and "another fingerprint: replacing" in caplog.text
    assert third.pearson_mean.iloc[0] == first.pearson_mean.iloc[0]
    assert not list(emb.rglob("*.tmp"))  # no temporary file left behind

    # files of ours under a model name that is not registered here: an error naming the file, nothing replaced
    shutil.copytree(emb / "TINY" / "fake", emb / "TINY" / "gone")
    digests = {p.name: _digest(p) for p in (emb / "TINY" / "gone").iterdir()}
    with pytest.raises(ValueError, match=r"S\d\.h5' was written by hopt_st.*'gone' is not in the registry"):
        bench.run(task["root"], model="gone", embeddings_dir=emb)
    assert {p.name: _digest(p) for p in (emb / "TINY" / "gone").iterdir()} == digests
    assert len(counting_encoder) == 6


def test_foreign_embedding_files_are_never_replaced(tmp_path, counting_encoder):
    task = _write_task(tmp_path / "bench", n_spots=120)
    emb = tmp_path / "emb"
    hest_files = _write_hest_embeddings(task, emb, "fake", 300)
    # a user's file that does not match the patches (other barcodes) is an error naming it, never overwritten
    bad = hest_files["S2"]
    with h5py.File(bad, "r+") as f:
        f["barcodes"][0] = [b"nowhere"]
    digest = _digest(bad)
    with pytest.raises(ValueError, match=r"S2\.h5.*barcodes have no row"):
        bench.run(task["root"], model="fake", embeddings_dir=emb)
    assert _digest(bad) == digest and counting_encoder == []
    # a corrupt (truncated) user file: an error naming the file, the file left as it is
    bad.write_bytes(bad.read_bytes()[:2000])
    digest = _digest(bad)
    with pytest.raises(ValueError, match=r"S2\.h5.*cannot be read"):
        bench.run(task["root"], model="fake", embeddings_dir=emb)
    assert _digest(bad) == digest and counting_encoder == []


def test_cache_is_not_reused_for_other_patches(tmp_path, counting_encoder):
    # same task name and sample ids under another root (other patches): the shared cache must not serve them
    emb = tmp_path / "emb"
    a = _write_task(tmp_path / "a", n_spots=100, seed=1)
    b = _write_task(tmp_path / "b", n_spots=100, seed=2)
    first = bench.run(a["root"], tasks="TINY", model="fake", embeddings_dir=emb)
    assert len(counting_encoder) == 4
    with pytest.raises(
        ValueError, match="computed with other source files than this run: pass overwrite=True"
    ):
        bench.run(b["root"], tasks="TINY", model="fake", embeddings_dir=emb)  # not served from a's cache
    assert len(counting_encoder) == 4
    second = bench.run(b["root"], tasks="TINY", model="fake", embeddings_dir=emb, overwrite=True)
    assert len(counting_encoder) == 8  # recomputed
    assert second.pearson_mean.iloc[0] != pytest.approx(first.pearson_mean.iloc[0], abs=1e-9)
    bench.run(b["root"], tasks="TINY", model="fake", embeddings_dir=emb)
    assert len(counting_encoder) == 8  # b's own cache is reused


def test_failed_cache_write_leaves_nothing_behind(tmp_path, counting_encoder, monkeypatch):
    task = _write_task(tmp_path / "bench", n_spots=100)
    emb = tmp_path / "emb"
    real = h5py.File.create_dataset

    def full_disk(self, name, *a, **k):
        if name == "coords":
            raise OSError(28, "No space left on device")
        return real(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", full_disk)
    with pytest.raises(OSError, match="No space left"):
        bench.run(task["root"], model="fake", embeddings_dir=emb)
    assert not [p for p in emb.rglob("*") if p.is_file()]  # neither a partial file nor a temporary one


@pytest.fixture
def tiny_vit(tiny_vit_spec, register_spec, tmp_path):
    """A registered tiny random ViT and its weights file: ``(spec, weights, other weights)``."""
    from safetensors.torch import save_file

    spec = tiny_vit_spec("tiny-vit-bench", embed_dim=32)
    register_spec(spec)
    files = []
    for seed in (0, 1):
        torch.random.manual_seed(seed)
        sd = models.create(spec, pretrained=False).backbone.state_dict()
        files.append(tmp_path / f"tiny{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(files[-1]))
    return spec, *files


def test_encoder_built_once_per_run_and_weights_hashed_once(hest_bench_root, tiny_vit, tmp_path, monkeypatch):
    """Over a 3-sample task the encoder is built once (models.get_encoder), and the weight file is read for its
    sha256 once: the fingerprint, the encoder and the provenance share the digest. Other weights: refused, or
    recomputed with overwrite=True."""
    from hopt_st.models import _cache, _weights

    spec, weights, other = tiny_vit
    root, task, ids = hest_bench_root["root"], hest_bench_root["task"], hest_bench_root["sample_ids"]
    builds, hashed = [], []
    build, sha = _cache.build_encoder, _weights.sha256_file
    monkeypatch.setattr(_cache, "build_encoder", lambda s, **k: builds.append(s.name) or build(s, **k))
    monkeypatch.setattr(_weights, "sha256_file", lambda path, *a: hashed.append(path) or sha(path, *a))
    models.clear_encoder_cache()
    emb = tmp_path / "emb"
    try:
        df = bench.run(root, tasks=task, model=spec.name, weights=weights, embeddings_dir=emb)
        assert len(ids) == 3 and df.attrs["provenance"]["embeddings"][task] == dict.fromkeys(ids, "computed")
        assert builds == [spec.name]  # not once per sample
        assert [Path(p).name for p in hashed] == [weights.name]
        assert df.attrs["provenance"]["weights_sha256"] == sha(weights)
        # the files' fingerprint includes the weights: another weight file is refused, naming them, or with
        # overwrite=True recomputes every sample
        with pytest.raises(ValueError, match="computed with other weights than this run"):
            bench.run(root, tasks=task, model=spec.name, weights=other, embeddings_dir=emb)
        df = bench.run(root, tasks=task, model=spec.name, weights=other, embeddings_dir=emb, overwrite=True)
        assert df.attrs["provenance"]["embeddings"][task] == dict.fromkeys(ids, "computed")
        assert builds == [spec.name] * 2
    finally:
        models.clear_encoder_cache()


def test_bench_and_embed_cohort_share_embedding_files(hest_bench_root, tiny_vit, tmp_path, monkeypatch):
    """One cache format: embed_cohort(<task folder>, model, <embeddings_dir>/<task>) writes the files bench.run
    reads, so bench.run reuses them without an encoder forward, embed_cohort skips bench's, and both write the
    same embeddings with the same fingerprint."""
    spec, weights, _ = tiny_vit
    root, task, ids = hest_bench_root["root"], hest_bench_root["task"], hest_bench_root["sample_ids"]
    task_dir = Path(hest_bench_root["task_dir"])
    forwards = []
    forward = models.Encoder.forward
    monkeypatch.setattr(
        models.Encoder, "forward", lambda self, x: forwards.append(len(x)) or forward(self, x)
    )

    a, b = tmp_path / "cohort_first", tmp_path / "bench_first"
    status = hs.pp.embed_cohort(task_dir, spec.name, a / task, weights=weights, progress=False)
    assert (status["status"] == "done").all() and len(status) == 3
    n = len(forwards)
    assert n > 0
    from_cohort = bench.run(root, tasks=task, model=spec.name, weights=weights, embeddings_dir=a)
    assert len(forwards) == n  # no encoder forward: every file was reused
    assert from_cohort.attrs["provenance"]["embeddings"][task] == dict.fromkeys(ids, "cache")

    from_bench = bench.run(root, tasks=task, model=spec.name, weights=weights, embeddings_dir=b)
    assert from_bench.attrs["provenance"]["embeddings"][task] == dict.fromkeys(ids, "computed")
    n = len(forwards)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (b / task / spec.name).glob("*.h5")}
    status = hs.pp.embed_cohort(task_dir, spec.name, b / task, weights=weights, progress=False)
    assert (status["status"] == "skipped").all() and len(forwards) == n
    assert {p.name: p.stat().st_mtime_ns for p in (b / task / spec.name).glob("*.h5")} == mtimes

    for sid in ids:
        x, y = (hs.io.read_embeddings(d / task / spec.name / f"{sid}.h5") for d in (a, b))
        assert np.array_equal(x.embeddings, y.embeddings) and np.array_equal(x.barcodes, y.barcodes)
        assert np.array_equal(x.coords, y.coords) and x.fingerprint == y.fingerprint
        assert x.embeddings.shape == (100, spec.dim)  # every spot (the fixture writes 100 per sample)
    assert from_cohort.pearson_mean.iloc[0] == from_bench.pearson_mean.iloc[0]


# ---------------------------------------------------------------------------------- outputs
def test_small_encoder_runs_but_is_marked_not_hest_comparable(hest_bench_root, tmp_path, monkeypatch):
    """A 32-d encoder (like the handcrafted baseline; hopt-st bench runs that one end to end in test_cli) on a
    write_hest_layout folder: PCA is capped at 32, and every output says the result is not HEST-comparable, and
    why."""
    root, task = hest_bench_root["root"], hest_bench_root["task"]
    calls = []

    def colour_grid(path):  # mean colour of a 4 x 4 grid of blocks, 32 of its 48 values
        calls.append(path)
        with h5py.File(path) as f:
            img = f["img"][:].astype(np.float32) / 255
        return img.reshape(len(img), 4, 56, 4, 56, 3).mean(axis=(2, 4)).reshape(len(img), -1)[:, :32]

    _set_encoder(monkeypatch, colour_grid)
    out = tmp_path / "out"
    df = bench.run(
        root, tasks=task, model="handcrafted", protocol="both", embeddings_dir=tmp_path / "e", out_dir=out
    )
    assert len(calls) == len(hest_bench_root["sample_ids"])
    assert (df.n_folds == len(hest_bench_root["splits"])).all() and (df.pearson_mean > 0.2).all(), df
    hest = df.set_index("protocol").loc["hest"]
    assert not hest.hest_comparable and "32 dimensions" in hest.note and "PCA capped at 32" in hest.note
    assert {f["n_components"] for f in df.attrs["folds"] if f["protocol"] == "hest"} == {32}
    assert not df.set_index("protocol").loc["strict", "hest_comparable"]
    csv = pd.read_csv(out / "results.csv")
    assert not csv.hest_comparable.any() and csv.note.str.contains("32 dimensions").any()
    md = (out / "results.md").read_text()
    assert "†" in md and "not HEST-comparable: PCA capped at 32" in md
    tree = out / "hest"
    for rel in (f"{task}/handcrafted/results_kfold.json", f"{task}/handcrafted/split0/summary.json"):
        assert "32 dimensions" in json.loads((tree / rel).read_text())["not_hest_comparable"]
    (enc,) = json.loads((tree / task / "enc_results.json").read_text())["results"]
    assert "32 dimensions" in enc["not_hest_comparable"]
    assert (
        "32 dimensions"
        in json.loads((tree / "dataset_results.json").read_text())["results"][0]["results"][0][
            "not_hest_comparable"
        ]
    )
    assert "32 dimensions" in pd.read_csv(tree / "dataset_results.csv")["handcrafted_not_hest_comparable"][0]
    prov = json.loads((out / "provenance.json").read_text())["models"]["handcrafted"]
    assert "32 dimensions" in prov["not_hest_comparable"][f"{task}/hest"]


def test_out_dir_refuses_to_overwrite_and_merges_models(tmp_path, counting_encoder):
    task = _write_task(tmp_path / "bench", n_spots=100)
    out, emb = tmp_path / "out", tmp_path / "emb"
    bench.run(task["root"], model="m1", out_dir=out, embeddings_dir=emb)
    before = _digest(out / "hest" / "TINY" / "m1" / "results_kfold.json")
    with pytest.raises(ValueError, match=r"already exist.*overwrite=True"):
        bench.run(task["root"], model="m1", out_dir=out, embeddings_dir=emb)
    assert _digest(out / "hest" / "TINY" / "m1" / "results_kfold.json") == before
    bench.run(task["root"], model="m2", out_dir=out, embeddings_dir=emb)  # another model: merged, HEST-style
    enc = json.loads((out / "hest" / "TINY" / "enc_results.json").read_text())["results"]
    assert sorted(e["encoder_name"] for e in enc) == ["m1", "m2"]
    assert enc[0]["pearson_mean"] >= enc[1]["pearson_mean"]  # sorted as HEST sorts
    cols = pd.read_csv(out / "hest" / "dataset_results.csv").columns
    assert {"m1_mean", "m1_std", "m2_mean", "m2_std"} <= set(cols)
    assert set(json.loads((out / "hest" / "dataset_results.json").read_text())["average"]) == {"m1", "m2"}
    assert sorted(pd.read_csv(out / "results.csv").model) == ["m1", "m2"]
    assert set(json.loads((out / "provenance.json").read_text())["models"]) == {"m1", "m2"}
    bench.run(task["root"], model="m1", out_dir=out, embeddings_dir=emb, overwrite=True)
    assert sorted(pd.read_csv(out / "results.csv").model) == ["m1", "m2"]


def test_strict_protocol_selects_genes_on_training_fold_only(tmp_path, counting_encoder):
    task = _write_task(tmp_path / "bench", n_spots=150)
    df = bench.run(task["root"], tasks="TINY", model="fake", protocol="both", embeddings_dir=tmp_path / "e")
    assert list(df.protocol) == ["hest", "strict"]
    folds = {(f["protocol"], f["fold"]): f for f in df.attrs["folds"]}
    for i, (tr, _te) in enumerate(task["folds"]):
        assert folds[("hest", i)]["genes"] == task["genes"]  # HEST: the fixed list in every fold
        # independent reference: top-50 variance of log1p counts over the training spots only
        Y = np.vstack([np.log1p(ad.read_h5ad(task["dir"] / "adata" / f"{s}.h5ad").X.toarray()) for s in tr])
        names = ad.read_h5ad(task["dir"] / "adata" / "S0.h5ad").var_names
        assert folds[("strict", i)]["genes"] == list(names[np.argsort(-Y.var(axis=0), kind="stable")[:50]])
    assert folds[("strict", 0)]["genes"] != folds[("strict", 1)]["genes"]
    assert df.set_index("protocol").loc["strict", "pearson_mean"] > 0.2
    md = bench.markdown_table(df)
    assert md.splitlines()[0].startswith("| model | protocol | TINY") and "strict" in md


# ---------------------------------------------------------------------------------- tasks and folds
def test_task_names_any_case_and_fold_counts(tmp_path, counting_encoder, caplog):
    task = _write_task(tmp_path / "bench", task="CCRCC", n_spots=100)
    df = bench.run(task["root"], tasks=["ccRCC"], model="fake", embeddings_dir=tmp_path / "e")
    assert df.task.tolist() == ["CCRCC"]  # HEST's folder name in every output
    with pytest.raises(FileNotFoundError, match=r"'LUAD' not found.*\['CCRCC'\]"):
        bench.run(task["root"], tasks="LUAD", model="fake")
    for bad in ([], [""], " "):
        with pytest.raises(ValueError, match="tasks="):
            bench.run(task["root"], tasks=bad, model="fake")
    # a stray file in splits/: HEST's code would count len(os.listdir) // 2 folds; the pairs on disk decide
    (task["dir"] / "splits" / "notes.txt").write_text("x")
    (task["dir"] / "splits" / "notes2.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="hopt_st"):
        df = bench.run(task["root"], tasks="CCRCC", model="fake", embeddings_dir=tmp_path / "e")
    assert df.n_folds.iloc[0] == 2 and "len(os.listdir(splits)) // 2 = 3" in caplog.text
    # a fold count that differs from the manifest's
    skcm = _write_task(tmp_path / "b2", task="SKCM", n_spots=100)
    (skcm["dir"] / "splits" / "train_1.csv").unlink()
    (skcm["dir"] / "splits" / "test_1.csv").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hopt_st"):
        bench.run(skcm["root"], tasks="skcm", model="fake", embeddings_dir=tmp_path / "e2")
    assert "hest-bench's SKCM has 2" in caplog.text


def test_manifests_state_fold_counts_the_code_checks():
    import yaml

    from hopt_st.bench._download import KNOWN_N_FOLDS, TASKS, match_task

    manifests = Path(__file__).resolve().parents[1] / "data_manifests" / "hest_bench"
    folds, current = {}, set()
    for p in manifests.glob("*.yaml"):
        m = yaml.safe_load(p.read_text())
        assert p.stem == m["hf_folder"] and m["hf_folder"] in (*TASKS, "HCC")
        assert (
            match_task(m["task"], TASKS + ("HCC",)) == m["hf_folder"]
        )  # the tutorial's name finds the folder
        if m["status"] == "current":
            current.add(m["hf_folder"])
            assert m["n_samples"] == len(m["sample_ids"])
        if m["n_folds"] is not None:
            folds[m["hf_folder"]] = m["n_folds"]
    assert current == set(TASKS) and folds == KNOWN_N_FOLDS


# ---------------------------------------------------------------------------------- errors, download, CLI
def test_bad_inputs(tmp_path, monkeypatch, fake_models):
    task = _write_task(tmp_path / "bench", n_spots=100)
    _set_encoder(monkeypatch, lambda p: np.full((100, 300), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"S\d\.h5\) has NaN"):
        bench.run(task["root"], tasks="TINY", model="nan", embeddings_dir=tmp_path / "n")
    with pytest.raises(ValueError, match="protocol"):
        bench.run(task["root"], protocol="loose")
    with pytest.raises(ValueError, match="solver"):
        bench.run(task["root"], solver="approximate")
    with pytest.raises(FileNotFoundError):
        bench.run(tmp_path / "nowhere")
    # fewer training spots than genes in a fold
    small = _write_task(tmp_path / "small", task="SMALL", n_spots=12, n_genes=60)
    _set_encoder(monkeypatch, _fake_embed)
    with pytest.raises(ValueError, match="at least as many spots as"):
        bench.run(small["root"], tasks="SMALL", model="fake", embeddings_dir=tmp_path / "s")
    # non-count expression
    a = ad.read_h5ad(small["dir"] / "adata" / "S0.h5ad")
    a.X = a.X.multiply(0.5).tocsr()
    a.write_h5ad(small["dir"] / "adata" / "S0.h5ad")
    with pytest.raises(ValueError, match="count"):
        bench.run(small["root"], tasks="SMALL", model="fake", embeddings_dir=tmp_path / "s")


def test_cli_bench_tasks_flag_must_name_tasks(tmp_path):
    from click.testing import CliRunner

    from hopt_st._cli import cli

    task = _write_task(tmp_path / "bench", n_spots=20)
    res = CliRunner().invoke(cli, ["bench", str(task["root"]), "--tasks", ",", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--tasks" in res.output and "IDC" in res.output


def test_download_limits_to_tasks_and_explains_gated_access(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    seen = {}

    def fake_snapshot(**kw):
        seen.update(kw)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    bench.download(tmp_path, ["IDC", "LYMPH_IDC"])
    assert seen["repo_id"] == "MahmoodLab/hest-bench" and seen["repo_type"] == "dataset"
    assert seen["allow_patterns"] == ["IDC/*", "LYMPH_IDC/*"]
    bench.download(tmp_path, ["ccRCC", "LUAD"])  # README names, any case: the folder names on the Hub
    assert seen["allow_patterns"] == ["CCRCC/*", "LUNG/*"]
    with pytest.raises(ValueError, match="Unknown"):
        bench.download(tmp_path, ["BRAIN"])

    def gated(**kw):
        err = GatedRepoError.__new__(GatedRepoError)  # no HTTP response object needed for the test
        Exception.__init__(err, "403 gated")
        raise err

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(PermissionError, match="Request access"):
        bench.download(tmp_path, "IDC")


def test_unscorable_folds_are_named_before_any_embedding(tmp_path, no_encoder, fake_models):
    """A gene with one value over a fold's test spots, or a one-spot test set, would make the task's mean NaN:
    refused with the task, fold, samples and genes named, before an encoder is built."""
    task = _write_task(tmp_path / "zero", task="ZERO", n_spots=60)
    gene = task["genes"][0]
    for sid in ("S0", "S2"):  # the test samples of fold 0
        path = task["dir"] / "adata" / f"{sid}.h5ad"
        a = ad.read_h5ad(path)
        X = a.X.toarray()
        X[:, a.var_names.get_loc(gene)] = 0
        a.X = sp.csr_matrix(X)
        a.write_h5ad(path)
    with pytest.raises(
        ValueError, match=rf"ZERO fold 0: gene\(s\) \{{'{gene}': 0\.0\}}.*\['S0', 'S2'\].*var_50genes"
    ):
        bench.run(task["root"], tasks="ZERO", model="fake", embeddings_dir=tmp_path / "e")
    one = _write_task(tmp_path / "one", task="ONE", n_spots=60)
    pd.DataFrame(
        {"sample_id": ["S0"], "patches_path": ["patches/S0.h5"], "expr_path": ["adata/S0.h5ad"]}
    ).to_csv(one["dir"] / "splits" / "test_0.csv", index=False)
    a = ad.read_h5ad(one["dir"] / "adata" / "S0.h5ad")
    a[:1].copy().write_h5ad(one["dir"] / "adata" / "S0.h5ad")
    with h5py.File(one["dir"] / "patches" / "S0.h5", "r+") as f:  # its one spot, in the patch file too
        keep = [i for i, b in enumerate(f["barcode"][:, 0]) if b.decode() == a.obs_names[0]]
        data = {k: f[k][keep] for k in ("img", "coords", "barcode")}
        for k, v in data.items():
            del f[k]
            f[k] = v
    with pytest.raises(
        ValueError, match=r"ONE fold 0: the test sample\(s\) \['S0'\] hold 1 spot.*at least 2"
    ):
        bench.run(one["root"], tasks="ONE", model="fake", embeddings_dir=tmp_path / "e1")


def test_identical_embeddings_are_refused_not_scored_nan(tmp_path, monkeypatch, fake_models):
    task = _write_task(tmp_path / "same", task="SAME", n_spots=60)
    _set_encoder(monkeypatch, lambda p: np.ones((60, 300), np.float32))
    with pytest.raises(
        ValueError, match=r"SAME fold 0: the embeddings of every training spot .* one and the same"
    ):
        bench.run(task["root"], tasks="SAME", model="fake", embeddings_dir=tmp_path / "e")


def test_embeddings_checked_once_per_task_for_both_protocols(tmp_path, counting_encoder, monkeypatch):
    """Both protocols score the same embeddings: each fold's training embeddings are checked once, not once per
    protocol."""
    from hopt_st.bench import _run

    task = _write_task(tmp_path / "bench", n_spots=150)
    checked = []
    check = _run._check_embeddings_vary
    monkeypatch.setattr(
        _run, "_check_embeddings_vary", lambda t, i, *a: checked.append((t, i)) or check(t, i, *a)
    )
    df = bench.run(task["root"], tasks="TINY", model="fake", protocol="both", embeddings_dir=tmp_path / "e")
    assert list(df.protocol) == ["hest", "strict"]
    assert checked == [("TINY", i) for i in range(len(task["folds"]))]
