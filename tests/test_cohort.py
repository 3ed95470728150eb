"""Cohorts: ``pp.embed_cohort`` in process and on a Dask ``LocalCluster`` (2 worker processes), the HEST
embedding-file layout, skipping finished samples, failures, a killed worker, ``io.load_cohort`` and the CLI.

One cluster is shared by the module (starting one costs seconds on 2 cores); the test that kills a worker
runs last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import anndata as ad
import cloudpickle
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import hopt_st as hs
from hopt_st import models
from hopt_st._cli import main
from hopt_st._patchset import hest_topleft
from hopt_st.pp._cohort import _select_shard

# the worker-side helpers below travel to the workers by value (this module is not importable there)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_GOOD = 6
BAD = "SYNBAD"


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A HEST-1k root: 6 synthetic samples (40 spots, 1 µm/px) and one whose WSI is corrupt."""
    root = tmp_path_factory.mktemp("cohort") / "hest"
    hs.datasets.write_hest_layout(
        root, layout="hest1k", n_samples=N_GOOD, n_spots=40, n_genes=20, image_mpp=1.0, compression="jpeg"
    )
    shutil.copy(root / "st" / "SYN000.h5ad", root / "st" / f"{BAD}.h5ad")
    meta = json.loads((root / "metadata" / "SYN000.json").read_text())
    (root / "metadata" / f"{BAD}.json").write_text(json.dumps(dict(meta, id=BAD, patient="PBAD")))
    good = (root / "wsis" / "SYN000.tif").read_bytes()
    (root / "wsis" / f"{BAD}.tif").write_bytes(good[: len(good) // 2])  # an interrupted download
    return root


@pytest.fixture(scope="module")
def bad_error(root):
    """The error of reading the corrupt slide's patches directly, as one line."""
    from hopt_st.pp._cohort import _one_line

    with pytest.raises(Exception) as info:  # noqa: PT011 - whatever the reader raises
        hs.pp.patches(hs.io.read_hest(root, BAD), patch_size=56, target_mpp=2.0).to_numpy()
    return _one_line(info.value)


@pytest.fixture(scope="module")
def specs(tmp_path_factory, tiny_vit_spec):
    """The handcrafted encoder on 56 px patches at 2 µm/px, and a tiny random ViT with its weights file."""
    from safetensors.torch import save_file

    fast = dataclasses.replace(
        models.get_spec("handcrafted"), name="handcrafted-fast", input_size=56, mpp=2.0
    )
    vit = tiny_vit_spec("tiny-vit-cohort", embed_dim=32)
    torch.manual_seed(0)
    encoder = models.create(vit, pretrained=False)
    weights = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.backbone.state_dict().items()}, str(weights))
    return {"handcrafted-fast": (fast, None), "tiny-vit-cohort": (vit, str(weights))}


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address="127.0.0.1:0",  # a free local port: 8787 may be taken (a UserWarning)
        silence_logs=logging.CRITICAL,  # failures are in the status table; Dask logs each with a traceback
    )
    client = Client(cluster, set_as_default=False)  # dask computations of this process stay here
    client.run(_import_cohort)  # pay the imports (torch, spatialdata) in both workers at once
    yield client
    client.close()
    cluster.close()


def _import_cohort():
    import hopt_st.pp._cohort  # noqa: F401


@pytest.fixture
def one_thread():
    """Serial runs with one torch thread, like a Dask worker (OMP_NUM_THREADS=1): same arithmetic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def serial(root, specs, tmp_path_factory):
    """Both models embedded in this process: ``{"out": folder, name: status table}``."""
    out = tmp_path_factory.mktemp("serial")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = {
            name: hs.pp.embed_cohort(root, spec, out, weights=w, progress=False)
            for name, (spec, w) in specs.items()
        }
    finally:
        torch.set_num_threads(n)
    return {"out": out, **res}


def _files(folder: Path) -> dict[str, hs.io.SampleEmbeddings]:
    return {p.stem: hs.io.read_embeddings(p) for p in sorted(folder.glob("*.h5"))}


def _assert_same_files(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb) == [f"SYN{i:03d}" for i in range(N_GOOD)]
    for sid in fa:
        assert np.array_equal(fa[sid].embeddings, fb[sid].embeddings), sid  # bit for bit
        assert np.array_equal(fa[sid].barcodes, fb[sid].barcodes)
        assert np.array_equal(fa[sid].coords, fb[sid].coords)
        assert fa[sid].fingerprint == fb[sid].fingerprint


def _check_status(df: pd.DataFrame, error: str, done: str = "done") -> None:
    assert list(df["sample"]) == [f"SYN{i:03d}" for i in range(N_GOOD)] + [BAD]  # cohort (sorted id) order
    good = df[df["sample"] != BAD]
    assert (good["status"] == done).all() and (good["n_spots"] == 40).all()
    assert (good["error"] == "").all()
    bad = df.set_index("sample").loc[BAD]
    assert bad["status"] == "failed" and bad["error"] == error and len(error) > 20


# ----------------------------------------------------------------------------------------------------------
# in process
# ----------------------------------------------------------------------------------------------------------
def test_serial_writes_hest_embedding_files(root, specs, serial, one_thread, bad_error):
    for name, (spec, _) in specs.items():
        df = serial[name]
        _check_status(df, bad_error)
        folder = serial["out"] / name
        on_disk = pd.read_csv(folder / "status.csv", keep_default_na=False)
        assert on_disk["sample"].tolist() == df["sample"].tolist()
        assert on_disk["status"].tolist() == df["status"].tolist()
        assert not list(folder.glob(".*.tmp"))
        # HEST's embedding-file layout (hest/bench/benchmark.py embed_tiles + save_hdf5, commit afd42c3)
        with h5py.File(folder / "SYN001.h5", "r") as f:
            assert set(f.keys()) == {"embeddings", "barcodes", "coords", "centers"}
            assert f["embeddings"].dtype == np.float32 and f["embeddings"].shape == (40, spec.dim)
            assert f["barcodes"].dtype.kind == "S" and f["barcodes"].shape == (40, 1)
            assert f["coords"].dtype == np.int64 and f["coords"].shape == (40, 2)
            assert set(f.attrs) == {"hopt_st_fingerprint", "hopt_st_provenance"}
            hest_barcodes = f["barcodes"][:].flatten().astype(str).tolist()  # how HEST reads them back
        emb = hs.io.read_embeddings(folder / "SYN001.h5")
        assert emb.barcodes.tolist() == hest_barcodes
        assert emb.provenance["model"] == name and emb.provenance["patient"] == "P001"
        assert emb.provenance["n_spots"] == 40 and len(emb.fingerprint) == 64
        # known answer: the same as pp.embed on the sample read by itself
        sdata = hs.io.read_hest(root, "SYN001")
        ref = hs.pp.embed(sdata, spec, weights=specs[name][1], progress=False, key_added="ref")
        table = sdata.tables["table"]
        assert ref is None and np.array_equal(emb.embeddings, table.obsm["ref"])
        assert emb.barcodes.tolist() == table.obs_names.tolist()
        src = hs.pp.patches(sdata, patch_size=spec.input_size, target_mpp=spec.mpp)
        assert np.array_equal(emb.coords, hest_topleft(src.centers, src.patch_size_src))
        assert np.allclose(emb.centers, table.obsm["spatial"])


def test_rerun_in_process_skips_without_a_forward(root, specs, serial, monkeypatch, one_thread, bad_error):
    spec, w = specs["tiny-vit-cohort"]
    folder = serial["out"] / spec.name
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5")}
    calls = []
    forward = models.Encoder.forward
    monkeypatch.setattr(models.Encoder, "forward", lambda self, x: calls.append(len(x)) or forward(self, x))
    df = hs.pp.embed_cohort(root, spec, serial["out"], weights=w, progress=False)
    _check_status(df, bad_error, done="skipped")
    assert calls == []  # no encoder forward for a finished sample
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5")} == mtimes
    assert df.set_index("sample").loc["SYN000", "n_spots"] == 40


def test_existing_file_with_another_fingerprint(root, specs, tmp_path, one_thread):
    spec, _ = specs["handcrafted-fast"]
    cohort = hs.io.read_cohort(root).query("sample_id in ['SYN000', 'SYN001']")
    hs.io.write_embeddings(tmp_path / spec.name / "SYN000.h5", np.zeros((2, 3)), ["a", "b"], fingerprint="x")
    before = (tmp_path / spec.name / "SYN000.h5").read_bytes()
    df = hs.pp.embed_cohort(cohort, spec, tmp_path, progress=False).set_index("sample")
    assert df.loc["SYN001", "status"] == "done"
    assert (
        df.loc["SYN000", "status"] == "failed" and "overwrite=True (--overwrite)" in df.loc["SYN000", "error"]
    )
    assert (tmp_path / spec.name / "SYN000.h5").read_bytes() == before  # nothing lost
    df = hs.pp.embed_cohort(cohort, spec, tmp_path, overwrite=True, progress=False).set_index("sample")
    assert (df["status"] == "done").all()
    assert hs.io.read_embeddings(tmp_path / spec.name / "SYN000.h5").embeddings.shape == (40, spec.dim)


def test_refusal_names_the_fingerprint_part_that_differs(root, specs, tmp_path, one_thread):
    """One rule with bench.run: a file of ours with another fingerprint is refused, naming the part that differs
    (here the requested precision, part of the geometry), and left as it was."""
    spec, _ = specs["handcrafted-fast"]
    cohort = hs.io.read_cohort(root).query("sample_id == 'SYN000'")
    hs.pp.embed_cohort(cohort, spec, tmp_path, progress=False)
    path = tmp_path / spec.name / "SYN000.h5"
    before = path.read_bytes()
    df = hs.pp.embed_cohort(cohort, spec, tmp_path, dtype="float32", progress=False).set_index("sample")
    error = df.loc["SYN000", "error"]
    assert df.loc["SYN000", "status"] == "failed"
    assert "computed with other geometry than this run" in error and "overwrite=True" in error, error
    assert path.read_bytes() == before


def test_write_embeddings_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    hs.io.write_embeddings(path, np.ones((3, 2)), ["a", "b", "c"], fingerprint="old")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        hs.io.write_embeddings(path, np.zeros((3, 2)), ["a", "b", "c"])

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        hs.io.write_embeddings(path, np.zeros((3, 2)), ["a", "b", "c"], overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no temporary file left


def test_read_cohort_tables(root, tmp_path):
    table = hs.io.read_cohort(root)
    assert table["sample_id"].tolist() == [f"SYN{i:03d}" for i in range(N_GOOD)] + [BAD]
    assert set(table["kind"]) == {"hest"} and table.set_index("sample_id").loc["SYN002", "patient"] == "P002"
    csv = tmp_path / "cohort.csv"
    os.symlink(root, tmp_path / "data")
    pd.DataFrame({"sample_id": ["SYN000", "SYN001"], "source": ["data", "data"], "patient": [7, 7]}).to_csv(
        csv, index=False
    )
    table = hs.io.read_cohort(csv)
    assert table["source"].tolist() == [str(tmp_path / "data")] * 2  # relative to the CSV's folder
    assert table["kind"].tolist() == ["hest", "hest"] and table["patient"].tolist() == ["7", "7"]
    with pytest.raises(ValueError, match="'sample_id' and 'source'"):
        hs.io.read_cohort(pd.DataFrame({"sample_id": ["a"]}))
    with pytest.raises(ValueError, match="unique; repeated: \\['a'\\]"):
        hs.io.read_cohort(pd.DataFrame({"sample_id": ["a", "a"], "source": [root, root]}))
    with pytest.raises(ValueError, match="nope.*does not exist"):
        hs.io.read_cohort(pd.DataFrame({"sample_id": ["a"], "source": [tmp_path / "nope"]}))
    with pytest.raises(ValueError, match="needs 'image'"):
        hs.io.read_cohort(pd.DataFrame({"sample_id": ["a"], "source": [root / "st" / "SYN000.h5ad"]}))
    with pytest.raises(TypeError, match="DataFrame, a CSV"):
        hs.io.read_cohort(3)


def test_h5ad_zarr_and_patch_file_sources(root, specs, serial, hest_bench_root, tmp_path, one_thread):
    spec, _ = specs["handcrafted-fast"]
    zarr = tmp_path / "SYN002.zarr"
    with ad.settings.override(auto_shard_zarr_v3=False):  # anndata's zarr v3 notice (a UserWarning)
        hs.io.read_hest(root, "SYN002").write(zarr)
    cohort = pd.DataFrame(
        {
            "sample_id": ["SYN001", "SYN002"],  # the same samples as HEST-1k ones, read another way
            "source": [root / "st" / "SYN001.h5ad", zarr],
            "image": [root / "wsis" / "SYN001.tif", None],
            "image_mpp": [1.0, None],
        }
    )
    df = hs.pp.embed_cohort(cohort, spec, tmp_path / "out", progress=False)
    assert hs.io.read_cohort(cohort)["kind"].tolist() == ["h5ad", "zarr"] and (df["status"] == "done").all()
    for sid in ("SYN001", "SYN002"):
        got = hs.io.read_embeddings(tmp_path / "out" / spec.name / f"{sid}.h5")
        ref = hs.io.read_embeddings(serial["out"] / spec.name / f"{sid}.h5")
        assert np.array_equal(got.embeddings, ref.embeddings) and np.array_equal(got.coords, ref.coords)
        assert got.fingerprint != ref.fingerprint  # other files, so another identity
    # a HEST-Benchmark task folder: its patch files, and its expression files for load_cohort
    task = Path(hest_bench_root["task_dir"])
    df = hs.pp.embed_cohort(task, spec, tmp_path / "bench", progress=False)
    assert (df["status"] == "done").all() and len(df) == 3
    sid = hest_bench_root["sample_ids"][0]
    direct = hs.pp.embed(task / "patches" / f"{sid}.h5", spec, progress=False)
    assert np.array_equal(
        hs.io.read_embeddings(tmp_path / "bench" / spec.name / f"{sid}.h5").embeddings, direct
    )
    adata = hs.io.load_cohort(tmp_path / "bench", spec, task)
    assert adata.n_obs == df["n_spots"].sum() and adata.n_vars == 60


def test_select_shard_partitions_deterministically():
    table = pd.DataFrame({"sample_id": [f"S{i}" for i in range(10)]})
    parts = [_select_shard(table, (i, 3))["sample_id"].tolist() for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(table["sample_id"]) and sum(map(len, parts)) == 10
    shuffled = table.sample(frac=1, random_state=0)
    assert sorted(_select_shard(shuffled, (1, 3))["sample_id"]) == sorted(parts[1])  # row order is irrelevant
    with pytest.raises(ValueError, match="0 <= i < n"):
        _select_shard(table, (3, 3))


def test_load_cohort_for_cross_sample_regression(root, serial):
    adata = hs.io.load_cohort(serial["out"], "tiny-vit-cohort", root)
    assert adata.n_obs == N_GOOD * 40 and adata.obsm["X_tiny-vit-cohort"].dtype == np.float32
    assert adata.uns["hopt_st"]["cohort"]["missing"] == [BAD]
    assert adata.obs["patient"].nunique() == N_GOOD
    sid = "SYN003"
    rows = (adata.obs["sample_id"] == sid).to_numpy()
    emb = hs.io.read_embeddings(serial["out"] / "tiny-vit-cohort" / f"{sid}.h5")
    assert np.array_equal(adata.obsm["X_tiny-vit-cohort"][rows], emb.embeddings)
    counts = hs.io.read_hest(root, sid).tables["table"]
    x = adata[rows].X.toarray()
    assert np.array_equal(x, counts[emb.barcodes.tolist(), adata.var_names].X.toarray())  # aligned by barcode
    reg = hs.tl.fit_expression(adata, use_rep="X_tiny-vit-cohort", n_top_genes=5, groups="patient")
    assert len(reg.genes_) == 5
    no_counts = hs.io.load_cohort(serial["out"], "tiny-vit-cohort")  # every file of the folder
    assert no_counts.n_obs == adata.n_obs and no_counts.n_vars == 0
    assert no_counts.obs["patient"].nunique() == N_GOOD  # from the files' provenance


# ----------------------------------------------------------------------------------------------------------
# on a Dask cluster
# ----------------------------------------------------------------------------------------------------------
def _no_rehash():
    """On a worker: fail loudly if a weight file is read to compute its sha256."""
    from hopt_st.models import _weights

    def refuse(path, chunk=0):
        raise AssertionError(f"re-hashed {path}")

    _weights._orig_sha256_file = _weights.sha256_file
    _weights.sha256_file = refuse


def _allow_rehash():
    from hopt_st.models import _weights

    _weights.sha256_file = _weights.__dict__.pop("_orig_sha256_file", _weights.sha256_file)


def test_cluster_equals_serial_and_builds_once_per_worker(root, specs, serial, client, tmp_path, bad_error):
    for name, (spec, w) in specs.items():
        client.run(models.clear_encoder_cache)
        client.run(_no_rehash)  # the client's digest of the weights is handed over, never recomputed
        try:
            df = hs.pp.embed_cohort(root, spec, tmp_path, client=client, weights=w, progress=False)
        finally:
            client.run(_allow_rehash)
        _check_status(df, bad_error)
        _assert_same_files(serial["out"] / name, tmp_path / name)
        info = client.run(models.encoder_cache_info)
        assert len(info) == 2
        assert all(i["builds"] <= 1 for i in info.values()), info  # once per worker, not once per sample
        # one get_encoder per good sample; the corrupt (truncated) slide is refused when it is opened, before
        # any encoder is asked for (issue 10: truncated TIFFs fail at open time, naming the file)
        assert sum(i["builds"] + i["hits"] for i in info.values()) == N_GOOD, info
        assert not list((tmp_path / name).glob(".*.tmp"))


def _count_forwards() -> None:
    """On a worker: count encoder forward passes in ``Encoder.n_forwards``."""
    from hopt_st.models import _encoder

    forward = _encoder.Encoder.forward

    def counted(self, x):
        _encoder.Encoder.n_forwards += 1
        return forward(self, x)

    counted.original = forward
    _encoder.Encoder.n_forwards = 0
    _encoder.Encoder.forward = counted


def _forwards() -> int:
    from hopt_st.models import _encoder

    n = _encoder.Encoder.__dict__.get("n_forwards", -1)
    _encoder.Encoder.forward = getattr(_encoder.Encoder.forward, "original", _encoder.Encoder.forward)
    return n


def test_cluster_rerun_skips_without_a_forward(root, specs, client, tmp_path, bad_error):
    spec, w = specs["tiny-vit-cohort"]
    hs.pp.embed_cohort(root, spec, tmp_path, client=client, weights=w, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / spec.name).glob("*.h5")}
    client.run(_count_forwards)
    df = hs.pp.embed_cohort(root, spec, tmp_path, client=client, weights=w, progress=False)
    assert client.run(_forwards) == dict.fromkeys(client.scheduler_info()["workers"], 0)
    _check_status(df, bad_error, done="skipped")  # the corrupt slide is tried again, and fails again
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / spec.name).glob("*.h5")} == mtimes


@pytest.fixture
def cli_state():
    """main() configures logging and warning filters for a process; undo it."""
    root_logger, hopt = logging.getLogger(), logging.getLogger("hopt_st")
    handlers, level, hopt_level = list(root_logger.handlers), root_logger.level, hopt.level
    with warnings.catch_warnings():
        yield
    root_logger.handlers[:] = handlers
    root_logger.setLevel(level)
    hopt.setLevel(hopt_level)


def test_cli_shards_scheduler_and_summary(
    root, bad_error, specs, client, tmp_path, capsys, register_spec, cli_state
):
    spec, _ = specs["handcrafted-fast"]
    register_spec(spec)
    csv = tmp_path / "good.csv"
    hs.io.read_cohort(root).query("sample_id != @BAD").to_csv(csv, index=False)
    out = tmp_path / "emb"
    args = ["-q", "embed-cohort", str(csv), "--model", spec.name, "--out", str(out)]
    assert main([*args, "--shard", "0/2"]) == 0  # in this process
    assert main([*args, "--shard", "1/2", "--scheduler", client.scheduler.address]) == 0  # on the cluster
    printed = capsys.readouterr().out
    assert "3 done, 0 skipped, 0 failed" in printed
    statuses = sorted((out / spec.name).glob("status.shard*of2.csv"))
    assert [p.name for p in statuses] == ["status.shard0of2.csv", "status.shard1of2.csv"]
    assert sorted(pd.concat(pd.read_csv(p) for p in statuses)["sample"]) == [
        f"SYN{i:03d}" for i in range(N_GOOD)
    ]
    assert main(args) == 0
    assert f"{spec.name}: 0 done, 6 skipped, 0 failed" in capsys.readouterr().out
    assert main([*args[:2], str(root), *args[3:]]) == 1  # the corrupt slide: exit code 1, named on stderr
    assert f"failed {BAD}: {bad_error}" in capsys.readouterr().err
    assert main([*args, "--workers", "2", "--scheduler", "tcp://x:1"]) == 2
    assert "--workers and --scheduler exclude each other" in capsys.readouterr().err
    assert main([*args, "--shard", "2/2"]) == 2
    assert "--shard" in capsys.readouterr().err


def _install_kill_hook(marker: str, out: str) -> None:
    """On a worker: the first encoder forward anywhere in the cluster kills its own worker process."""
    from hopt_st.models import _encoder

    forward = _encoder.Encoder.forward

    def forward_or_die(self, x):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return forward(self, x)
        visible = {p.name: _finished(p) for p in Path(out).glob("*.h5")}
        os.write(fd, json.dumps({"pid": os.getpid(), "visible": visible}).encode())
        os.close(fd)
        os._exit(1)

    forward_or_die.original = forward
    _encoder.Encoder.forward = forward_or_die


def _finished(path: Path) -> bool:
    try:
        return len(hs.io.read_embeddings(path).fingerprint) == 64
    except (OSError, ValueError, TypeError):
        return False


def _remove_kill_hook() -> None:
    from hopt_st.models import _encoder

    _encoder.Encoder.forward = getattr(_encoder.Encoder.forward, "original", _encoder.Encoder.forward)


def test_killed_worker_is_retried(root, specs, serial, client, tmp_path, bad_error):
    spec, _ = specs["handcrafted-fast"]
    folder = tmp_path / "out" / spec.name
    folder.mkdir(parents=True)
    marker = tmp_path / "killed.json"
    pids_before = set(client.run(os.getpid).values())
    client.run(_install_kill_hook, str(marker), str(folder))
    try:
        df = hs.pp.embed_cohort(root, spec, tmp_path / "out", client=client, progress=False)
    finally:
        client.run(_remove_kill_hook)  # the worker that replaces the dead one (if up yet) never had it
    died = json.loads(marker.read_text())
    assert died["pid"] in pids_before and died["pid"] not in set(client.run(os.getpid).values())
    _check_status(df, bad_error)  # the sample whose worker died was run again, and the cohort completed
    _assert_same_files(serial["out"] / spec.name, folder)
    # when the worker died mid-sample, every .h5 visible under its final name was complete
    assert all(died["visible"].values()), died["visible"]
    assert not list(folder.glob(".*.tmp"))
