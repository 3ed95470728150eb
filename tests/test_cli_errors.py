"""Every ``hopt-st`` subcommand on a table of bad inputs: each refusal exits non-zero with one message that names
the input at fault (file, flag or value) and says what to do, and comes before any model, image or sample is
processed (so it is fast)."""

from __future__ import annotations

import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import hopt_st as hs
from hopt_st._cli import main

pytestmark = pytest.mark.usefixtures("cli_process_state")  # main() sets up logging


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small inputs, good and bad, in one folder."""
    d = tmp_path_factory.mktemp("cli_inputs")
    rng = np.random.default_rng(0)
    he = rng.integers(100, 230, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(he).save(d / "scan.jpg")
    Image.fromarray(he[..., 0]).save(d / "gray.png")
    Image.fromarray(he[:1, :1]).save(d / "one.png")
    (d / "notes.txt").write_text("not data")
    adata = ad.AnnData(X=rng.poisson(2, size=(5, 3)).astype(np.float32))
    adata.obsm["spatial"] = rng.uniform(10, 50, size=(5, 2))
    adata.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 10.0}, "images": {}}}
    adata.write_h5ad(d / "spots.h5ad")
    adata.write_h5ad(d / "existing.h5ad")
    reg = hs.tl.ExpressionRegressor("ridge").fit(
        rng.normal(size=(20, 32)), pd.DataFrame(rng.normal(size=(20, 2)), columns=["GENE_A", "GENE_B"])
    )
    reg.save(d / "ridge.safetensors")
    (d / "garbled.safetensors").write_bytes(b"\x00" * 64)
    (d / "empty.csv").write_text("")
    (d / "header.csv").write_text("sample_id,source\n")
    (d / "missing_source.csv").write_text("sample_id,source\nS1,nope.h5ad\n")
    (d / "bad_mpp.csv").write_text(f"sample_id,source,image_mpp\nS1,{d / 'spots.h5ad'},-1\n")
    (d / "bench").mkdir()
    (d / "pred.zarr").mkdir()
    return d


def _case(args, names, fix, code=None):
    return {"args": args, "names": names, "fix": fix, "code": code}


#: subcommand -> rows: arguments ({d} = the inputs folder), what the message must name, the fix it must state
CASES = {
    "demo --n-spots": _case(["demo", "--n-spots", "5", "--out", "{d}/demo"], ["--n-spots", "5"], "50<=x<=20000", 2),
    "embed missing": _case(["embed", "{d}/missing.zarr", "--model", "handcrafted"], ["missing.zarr"], "check the path"),
    "embed h5ad no --out": _case(["embed", "{d}/spots.h5ad", "--model", "handcrafted"], ["--out"], "pass --out OUT.h5ad", 2),
    "embed --out = INPUT": _case(
        ["embed", "{d}/spots.h5ad", "--model", "handcrafted", "--out", "{d}/spots.h5ad"], ["--out", "INPUT"],
        "must differ", 2,
    ),
    "embed --out exists": _case(
        ["embed", "{d}/spots.h5ad", "--model", "handcrafted", "--out", "{d}/existing.h5ad"], ["existing.h5ad"],
        "pass --overwrite",
    ),
    "embed --weights missing": _case(
        ["embed", "{d}/spots.h5ad", "--model", "handcrafted", "--weights", "{d}/w.safetensors", "--out", "{d}/o.h5ad"],
        ["--weights", "w.safetensors"], "check the path",
    ),
    "embed --image grayscale": _case(
        ["embed", "{d}/spots.h5ad", "--model", "handcrafted", "--image", "{d}/gray.png", "--out", "{d}/o.h5ad"],
        ["gray.png", "grayscale"], "RGB",
    ),
    "embed --image 1x1": _case(
        ["embed", "{d}/spots.h5ad", "--model", "handcrafted", "--image", "{d}/one.png", "--out", "{d}/o.h5ad"],
        ["one.png", "1 x 1 px"], "Give the full-resolution H&E scan",
    ),
    "embed unknown model": _case(
        ["embed", "{d}/spots.h5ad", "--model", "no-such-model", "--out", "{d}/o.h5ad"], ["no-such-model"],
        "hopt-st models",
    ),
    "embed --key-added": _case(
        ["embed", "{d}/spots.h5ad", "--model", "handcrafted", "--key-added", "a/b", "--out", "{d}/o.h5ad"],
        ["--key-added", "a/b"], "letters, digits",
    ),
    "embed unknown INPUT": _case(["embed", "{d}/notes.txt", "--model", "handcrafted"], ["notes.txt"], "Give", 2),
    "embed-cohort empty": _case(
        ["embed-cohort", "{d}/empty.csv", "--model", "handcrafted", "--out", "{d}/e"], ["empty.csv"],
        "write a header", 2,
    ),
    "embed-cohort no rows": _case(
        ["embed-cohort", "{d}/header.csv", "--model", "handcrafted", "--out", "{d}/e"], ["header.csv"],
        "add one row per sample",
    ),
    "embed-cohort missing source": _case(
        ["embed-cohort", "{d}/missing_source.csv", "--model", "handcrafted", "--out", "{d}/e"],
        ["missing_source.csv", "S1", "nope.h5ad"], "Correct the column 'source'",
    ),
    "embed-cohort image_mpp": _case(
        ["embed-cohort", "{d}/bad_mpp.csv", "--model", "handcrafted", "--out", "{d}/e"], ["S1", "-1"],
        "must be a positive number",
    ),
    "embed-cohort --workers --scheduler": _case(
        ["embed-cohort", "{d}/bad_mpp.csv", "--model", "handcrafted", "--out", "{d}/e", "--workers", "2",
         "--scheduler", "tcp://127.0.0.1:1"],
        ["--workers", "--scheduler"], "start a local cluster or join one", 2,
    ),
    "embed-cohort --shard": _case(
        ["embed-cohort", "{d}/bad_mpp.csv", "--model", "handcrafted", "--out", "{d}/e", "--shard", "3/2"],
        ["--shard", "3/2"], "0 <= i < N", 2,
    ),
    "predict missing SLIDE": _case(
        ["predict", "{d}/slide.svs", "--regressor", "{d}/ridge.safetensors", "--model", "handcrafted", "--out",
         "{d}/p.zarr"],
        ["SLIDE", "slide.svs"], "check the path",
    ),
    "predict --regressor missing": _case(
        ["predict", "{d}/scan.jpg", "--regressor", "{d}/nope.safetensors", "--model", "handcrafted", "--out",
         "{d}/p.zarr"],
        ["--regressor", "nope.safetensors"], "check the path",
    ),
    "predict --regressor garbled": _case(
        ["predict", "{d}/scan.jpg", "--regressor", "{d}/garbled.safetensors", "--model", "handcrafted", "--out",
         "{d}/p.zarr"],
        ["garbled.safetensors"], "save",
    ),
    "predict --genes": _case(
        ["predict", "{d}/scan.jpg", "--regressor", "{d}/ridge.safetensors", "--model", "handcrafted", "--genes",
         "NOPE", "--out", "{d}/p.zarr"],
        ["--genes", "NOPE"], "its genes are",
    ),
    "predict --out exists": _case(
        ["predict", "{d}/scan.jpg", "--regressor", "{d}/ridge.safetensors", "--model", "handcrafted", "--out",
         "{d}/pred.zarr"],
        ["pred.zarr"], "pass --overwrite",
    ),
    "predict JPEG without --image-mpp": _case(
        ["predict", "{d}/scan.jpg", "--regressor", "{d}/ridge.safetensors", "--model", "handcrafted", "--out",
         "{d}/p.zarr"],
        ["scan.jpg", "--image-mpp"], "e.g. 0.25 for a 40x scan",
    ),
    "predict grayscale SLIDE": _case(
        ["predict", "{d}/gray.png", "--regressor", "{d}/ridge.safetensors", "--model", "handcrafted",
         "--image-mpp", "0.5", "--out", "{d}/p.zarr"],
        ["gray.png", "grayscale"], "RGB",
    ),
    "bench missing ROOT": _case(["bench", "{d}/nobench"], ["ROOT", "nobench"], "check the path"),
    "bench --tasks": _case(["bench", "{d}/bench", "--tasks", ","], ["--tasks"], "e.g. --tasks IDC,PRAD", 2),
    "bench --weights two models": _case(
        ["bench", "{d}/bench", "--model", "handcrafted", "--model", "h0-mini", "--weights", "{d}/ridge.safetensors"],
        ["--weights"], "one model at a time", 2,
    ),
    "bench empty ROOT": _case(["bench", "{d}/bench", "--model", "handcrafted"], ["bench"], "hs.bench.download"),
    "models --bogus": _case(["models", "--bogus"], ["--bogus"], "hopt-st models --help", 2),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_cli_refusal_names_the_input_and_the_fix(name, files, capsys):
    case = CASES[name]
    args = [a.replace("{d}", str(files)) for a in case["args"]]
    t0 = time.perf_counter()
    rc = main(args)
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    message = " ".join((out + err).split())
    assert rc != 0 and rc == (case["code"] or 1), message
    assert "Traceback" not in message
    for needle in case["names"]:
        assert needle in message, f"{name}: {needle!r} not named in {message!r}"
    assert case["fix"] in message, f"{name}: no fix {case['fix']!r} in {message!r}"
    assert elapsed < 20, f"{name}: refused after {elapsed:.1f} s"  # before any model / sample work


def test_embed_cohort_starts_no_cluster_when_nothing_is_to_embed(files, tmp_path, capsys, monkeypatch):
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(f"sample_id,source,image\nNA,{files / 'spots.h5ad'},{files / 'scan.jpg'}\n")
    args = ["embed-cohort", str(cohort), "--model", "handcrafted", "--out", str(tmp_path / "emb")]
    assert main(["-q", *args]) == 0, capsys.readouterr().err
    assert (tmp_path / "emb" / "handcrafted" / "NA.h5").is_file()  # the id as written, not '' or NaN
    import distributed

    def no_cluster(*a, **k):
        raise AssertionError("a Dask cluster was started with nothing to embed")

    monkeypatch.setattr(distributed, "LocalCluster", no_cluster)
    assert main([*args, "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    assert "0 done, 1 skipped, 0 failed" in out
    assert "distributed" not in err and "jupyter-server-proxy" not in err  # Dask quiet without -v


def test_library_refusals_name_what_to_change():
    rng = np.random.default_rng(1)
    adata = ad.AnnData(X=rng.poisson(3, size=(6, 4)).astype(np.float32))
    adata.obsm["X_e"] = np.ones((6, 8))
    with pytest.raises(
        ValueError, match=r"obsm\['X_e'\] holds one and the same vector for all 6 spots.*weights"
    ):
        hs.tl.fit_expression(adata, use_rep="X_e", n_top_genes=2)
    with pytest.raises(ValueError, match=r"shape \(1, 3\).*at least 2 spots"):
        hs.tl.pearson_per_gene(np.ones((1, 3)), np.ones((1, 3)))
