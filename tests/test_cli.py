"""The ``hopt-st`` command line: success paths, refusals and one-line errors (exit codes, messages, files)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest
import spatialdata as sd

from hopt_st._cli import main

N_SPOTS = 200


pytestmark = pytest.mark.usefixtures("cli_process_state")  # main() sets up logging


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("hopt-st: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run shared by the module: (exit code, out dir, printed stdout)."""
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["-q", "demo", "--out", str(out), "--n-spots", str(N_SPOTS)])
    return rc, out, buf.getvalue()


def test_demo_writes_table_figures_and_zarr(demo_run, capsys):
    rc, out, _ = demo_run
    assert rc == 0
    scores = pd.read_csv(out / "per_gene_pearson.csv", index_col="gene")
    assert list(scores.columns) == ["handcrafted"] and len(scores) == 50
    assert scores["handcrafted"].is_monotonic_decreasing
    # the synthetic sample's expression is driven by what the image shows: held-out prediction works
    assert scores["handcrafted"].median() > 0.5
    for png in ("expression.png", "gene_scores.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sdata = sd.read_zarr(out / "demo.zarr")
    table = sdata["table"]
    assert table.obsm["X_handcrafted"].shape[0] == table.n_obs
    pred = table.obsm["predicted"]
    assert set(scores.index) == set(pred.columns)
    assert table.uns["hopt_st"]["predictions"]["predicted"]["target"] == "log1p"
    # the split recorded in obs is the left/right halves of the slide
    x = np.asarray(table.obsm["spatial"])[:, 0]
    test = table.obs["test"].to_numpy(dtype=bool)
    assert x[test].min() >= x[~test].max()


def test_demo_prints_the_per_gene_table(demo_run):
    _, out, printed = demo_run
    scores = pd.read_csv(out / "per_gene_pearson.csv", index_col="gene")["handcrafted"]
    lines = {ln.split()[0]: ln.split()[1:] for ln in printed.splitlines() if ln.strip()}
    for gene, r in scores.items():
        assert float(lines[gene][0]) == pytest.approx(r, abs=5e-4)
    assert float(lines["mean"][0]) == pytest.approx(scores.mean(), abs=5e-4)
    assert "[1/" not in printed  # -q: no step messages, only the result


def test_demo_reruns_in_its_own_folder_but_never_replaces_a_file_it_did_not_write(demo_run, capsys, tmp_path):
    _, out, _ = demo_run
    before = (out / "demo.zarr").stat().st_mtime_ns
    (out / "notes.txt").write_text("mine")  # a foreign file beside the demo's outputs
    rc, _, err = _run(capsys, "-q", "demo", "--out", out, "--n-spots", N_SPOTS)  # the README's command, twice
    assert rc == 0, err
    assert (out / "demo.zarr").stat().st_mtime_ns != before  # regenerated and replaced
    assert sd.read_zarr(out / "demo.zarr")["predicted"].n_obs == N_SPOTS
    assert (out / "notes.txt").read_text() == "mine"  # left alone
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == [".hopt_st_demo"]  # no leftovers
    # a file of the demo's names that the demo did not write (or that was changed since): refused, untouched
    (out / "gene_scores.png").write_bytes(b"my own figure")
    rc, _, err = _run(capsys, "demo", "--out", out, "--n-spots", N_SPOTS)
    assert rc == 1 and "gene_scores.png" in _one_line_error(err) and "--overwrite" in err
    assert (out / "gene_scores.png").read_bytes() == b"my own figure"
    foreign = tmp_path / "mine"
    (foreign / "demo.zarr").mkdir(parents=True)  # not written by the demo: never replaced silently
    (foreign / "per_gene_pearson.csv").write_text("gene,r\n")
    rc, _, err = _run(capsys, "demo", "--out", foreign, "--n-spots", N_SPOTS)
    assert rc == 1
    line = _one_line_error(err)
    assert "not written by the demo" in line and "demo.zarr" in line and "per_gene_pearson.csv" in line
    assert sorted(p.name for p in foreign.iterdir()) == [
        "demo.zarr",
        "per_gene_pearson.csv",
    ]  # nothing written
    assert (foreign / "per_gene_pearson.csv").read_text() == "gene,r\n"


@pytest.fixture(scope="module")
def small_zarr(tmp_path_factory):
    from hopt_st.datasets import synthetic_visium

    path = tmp_path_factory.mktemp("small") / "small.zarr"
    synthetic_visium(n_spots=50, n_genes=20, seed=1).write(path)
    return path


def test_embed_zarr_in_place_then_refuses_existing_key(small_zarr, capsys, tmp_path):
    rc, outp, err = _run(capsys, "-q", "embed", small_zarr, "--model", "handcrafted")
    assert rc == 0, err
    assert "X_handcrafted" in outp and "50 spots x 32 dims" in outp
    table = sd.read_zarr(small_zarr)["table"]
    emb = np.asarray(table.obsm["X_handcrafted"])
    assert emb.shape == (50, 32) and np.isfinite(emb).all() and emb.std(axis=0).max() > 0
    assert "X_handcrafted" in table.uns["hopt_st"]["embeddings"]
    # the key exists now: refused without --overwrite, and the stored values are untouched
    rc, _, err = _run(capsys, "embed", small_zarr, "--model", "handcrafted")
    assert rc == 1
    assert "X_handcrafted" in _one_line_error(err)
    np.testing.assert_array_equal(np.asarray(sd.read_zarr(small_zarr)["table"].obsm["X_handcrafted"]), emb)
    # an existing --out is refused before any work
    rc, _, err = _run(
        capsys, "embed", small_zarr, "--model", "handcrafted", "--key-added", "X2", "--out", tmp_path
    )
    assert rc == 1 and "already exists" in _one_line_error(err) and "--overwrite" in err


def test_missing_input_is_one_line(capsys, tmp_path):
    rc, _, err = _run(capsys, "embed", tmp_path / "nope.zarr", "--model", "handcrafted")
    assert rc == 1
    line = _one_line_error(err)
    assert "nope.zarr" in line and "does not exist" in line


def test_verbose_shows_traceback(capsys, tmp_path):
    rc, _, err = _run(capsys, "--verbose", "embed", tmp_path / "nope.zarr", "--model", "handcrafted")
    assert rc == 1
    assert "Traceback" in err and "hopt-st: error:" in err


def test_model_without_weights(demo_run, capsys, tmp_path, monkeypatch):
    _, out, _ = demo_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # nothing cached
    monkeypatch.delenv("HF_TOKEN", raising=False)
    rc, _, err = _run(
        capsys, "embed", out / "demo.zarr", "--model", "h-optimus-1", "--out", tmp_path / "o.zarr"
    )
    assert rc != 0
    line = _one_line_error(err)
    assert "h-optimus-1" in line.lower() or "H-optimus-1" in line
    assert not (tmp_path / "o.zarr").exists()


def test_unknown_model_and_bad_weights_path(demo_run, capsys, tmp_path):
    _, out, _ = demo_run
    rc, _, err = _run(
        capsys, "embed", out / "demo.zarr", "--model", "no-such-model", "--out", tmp_path / "o.zarr"
    )
    assert rc == 1 and "no-such-model" in _one_line_error(err)
    rc, _, err = _run(
        capsys, "embed", out / "demo.zarr", "--model", "h-optimus-1", "--weights", tmp_path / "w.safetensors"
    )
    assert rc == 1 and "w.safetensors" in _one_line_error(err)


def test_usage_errors(capsys, tmp_path):
    rc, _, err = _run(capsys, "embed", tmp_path, "--model", "handcrafted")  # a folder that is no known input
    assert rc == 2 and "neither a SpatialData .zarr" in err
    rc, _, err = _run(capsys, "embed", tmp_path)  # --model missing
    assert rc == 2 and "--model" in err
    rc, _, err = _run(capsys, "bench", tmp_path, "--protocol", "loose")
    assert rc == 2 and "loose" in err


def test_models_lists_registry(capsys):
    rc, out, _ = _run(capsys, "models")
    assert rc == 0
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert "h-optimus-1" in rows and "1536" in rows["h-optimus-1"]
    assert "handcrafted" in rows and "not needed" in rows["handcrafted"]
    assert "hf.co/bioptimus/H-optimus-1" in rows["h-optimus-1"]


def test_space_ranger_folder(shared_data, capsys, tmp_path):
    outs = shared_data / "visium_mini"
    if not outs.exists():  # a synthetic Space Ranger-like folder instead of the real test sample
        from hopt_st.datasets import synthetic_visium, write_spaceranger_outs

        outs = write_spaceranger_outs(synthetic_visium(n_spots=60, n_genes=20, seed=3), tmp_path / "outs")
    dest = tmp_path / "mini.zarr"
    rc, outp, err = _run(capsys, "-q", "embed", outs, "--model", "handcrafted", "--out", dest)
    assert rc == 0, err
    table = sd.read_zarr(dest)["table"]
    assert table.obsm["X_handcrafted"].shape == (table.n_obs, 32)
    # a Space Ranger folder needs --out
    rc, _, err = _run(capsys, "embed", outs, "--model", "handcrafted")
    assert rc == 2 and "--out" in err


def test_hest1k_root_with_sample(hest1k_root, capsys, tmp_path):
    sample = hest1k_root["sample_ids"][0]
    dest = tmp_path / f"{sample}.zarr"
    rc, outp, err = _run(
        capsys,
        "-q",
        "embed",
        hest1k_root["root"],
        "--sample",
        sample,
        "--model",
        "handcrafted",
        "--out",
        dest,
    )
    assert rc == 0, err
    table = sd.read_zarr(dest)["table"]
    assert table.obsm["X_handcrafted"].shape == (table.n_obs, 32) and table.n_obs > 0
    rc, _, err = _run(
        capsys,
        "embed",
        hest1k_root["root"],
        "--sample",
        "NOPE",
        "--model",
        "handcrafted",
        "--out",
        tmp_path / "n.zarr",
    )
    assert rc == 1 and "NOPE" in _one_line_error(err)


def test_image_mpp_option_supplies_a_missing_pixel_size(hest1k_root, capsys, tmp_path):
    import json
    import shutil

    root = tmp_path / "hest"
    shutil.copytree(hest1k_root["root"], root)
    sample = hest1k_root["sample_ids"][0]
    meta_path = root / "metadata" / f"{sample}.json"
    meta = json.loads(meta_path.read_text())
    true_mpp = meta["pixel_size_um_estimated"]
    for key in ("pixel_size_um_estimated", "pixel_size_um_embedded"):
        meta.pop(key, None)
    meta_path.write_text(json.dumps(meta))
    args = ["embed", root, "--sample", sample, "--model", "handcrafted"]
    rc, _, err = _run(capsys, *args, "--out", tmp_path / "a.zarr")
    assert rc == 1 and "image_mpp" in _one_line_error(err)
    rc, _, err = _run(capsys, "-q", *args, "--image-mpp", str(true_mpp), "--out", tmp_path / "b.zarr")
    assert rc == 0, err
    table = sd.read_zarr(tmp_path / "b.zarr")["table"]
    assert list(table.uns["hopt_st"]["image_mpp"].values()) == [pytest.approx(true_mpp)]
    assert table.obsm["X_handcrafted"].shape == (table.n_obs, 32)


def test_bench_on_synthetic_root(hest_bench_root, capsys, tmp_path):
    out = tmp_path / "bench"
    rc, outp, err = _run(
        capsys,
        "-q",
        "bench",
        hest_bench_root["root"],
        "--model",
        "handcrafted",
        "--protocol",
        "both",
        "--out",
        out,
        "--embeddings-dir",
        tmp_path / "emb",  # not the user's cache
    )
    assert rc == 0, err
    res = pd.read_csv(out / "results.csv")
    assert set(res["protocol"]) == {"hest", "strict"} and set(res["task"]) == {hest_bench_root["task"]}
    assert "|" in outp and hest_bench_root["task"] in outp  # the Markdown table
    per_gene = pd.read_csv(out / "per_gene.csv")
    hest = per_gene[per_gene["protocol"] == "hest"]
    assert sorted(hest["gene"]) == sorted(hest_bench_root["genes"])  # HEST's fixed 50 genes
    assert (out / "benchmark.png").exists() and (out / "results.json").exists()
    # HEST's own result files, per model
    assert (out / "handcrafted" / "hest" / "dataset_results.json").exists()


def test_bench_second_model_keeps_the_first_models_rows(hest_bench_root, capsys, tmp_path, register_spec):
    """`hopt-st bench --out X` run again with another model merges its rows into X's files (as bench.run's
    out_dir does); every file is written atomically (no temporary left)."""
    import dataclasses
    import json

    from hopt_st import models

    register_spec(dataclasses.replace(models.get_spec("handcrafted"), name="handcrafted-b"))
    out = tmp_path / "bench"
    args = ["-q", "bench", hest_bench_root["root"], "--out", out, "--embeddings-dir", tmp_path / "emb"]
    rc, _, err = _run(capsys, *args, "--model", "handcrafted")
    assert rc == 0, err
    first = pd.read_csv(out / "results.csv")
    rc, _, err = _run(capsys, *args, "--model", "handcrafted-b")
    assert rc == 0, err
    both = pd.read_csv(out / "results.csv")
    assert list(both["model"]) == ["handcrafted", "handcrafted-b"]
    pd.testing.assert_frame_equal(both.iloc[:1], first)  # the first model's row, as it was
    assert set(pd.read_csv(out / "per_gene.csv")["model"]) == {"handcrafted", "handcrafted-b"}
    payload = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in payload["results"]] == ["handcrafted", "handcrafted-b"]
    assert [p["model"] for p in payload["provenance"]] == ["handcrafted", "handcrafted-b"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "hopt-st"]
    assert ep.value == "hopt_st._cli:main" and ep.load() is main
