"""Issue 20, "never destroy an input, never mix what does not belong together, never read outside what the user
named": one section per rule of the README's "Nothing lost, nothing silently wrong", each with the case the issue
reported and at least one other case of the same rule; hypothesis fuzzing where inputs vary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hopt_st as hs
from hopt_st import models
from hopt_st._cli import main
from hopt_st.io import CorruptFileError

FAST = "handcrafted-rules"  # the handcrafted encoder on 56 px patches at 2 µm/px (same 112 µm field)
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def specs_to_register(tiny_vit_spec):
    """Registered for this module by the ``model_specs`` fixture (conftest), unregistered after it."""
    return [dataclasses.replace(models.get_spec("handcrafted"), name=FAST, input_size=56, mpp=2.0)]


pytestmark = pytest.mark.usefixtures("model_specs", "cli_process_state")


def _digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256), and every folder (-> "dir")."""
    if root.is_file():
        return {"": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _sample(n_spots: int = 30, seed: int = 0):
    return hs.datasets.synthetic_visium(n_spots=n_spots, seed=seed, n_genes=20)


def _cli(capsys, *args) -> tuple[int, str]:
    """Exit code and the one ``hopt-st: error:`` line (empty on success)."""
    rc = main([str(a) for a in args])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("hopt-st: error:")]
    assert "Traceback" not in err
    return rc, (lines[0] if lines else "")


def _fit_regressor(seed: int = 0, d: int = 6, g: int = 3) -> hs.tl.ExpressionRegressor:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(50, d))
    import pandas as pd

    y = pd.DataFrame(x[:, :3] @ rng.normal(size=(3, g)), columns=[f"G{i}" for i in range(g)])
    return hs.tl.ExpressionRegressor("ridge").fit(x, y)


# ----------------------------------------------------------------------------------------------------------
# rule 5: copy=True shares nothing mutable with its input
# ----------------------------------------------------------------------------------------------------------
def _adata_with_spatial(d: int = 6):
    import anndata as ad

    rng = np.random.default_rng(0)
    adata = ad.AnnData(np.ones((20, 2), dtype=np.float32))
    adata.obsm["X_emb"] = rng.normal(size=(20, d))
    adata.obsm["spatial"] = rng.uniform(0, 100, size=(20, 2))
    adata.uns["spatial"] = {
        "lib": {"images": {"hires": np.full((8, 8, 3), 0.5)}, "scalefactors": {"spot_diameter_fullres": 89.4}}
    }
    return adata


def test_rule5_predict_expression_copy_shares_no_uns():
    adata = _adata_with_spatial()
    reg = _fit_regressor()
    out = hs.tl.predict_expression(adata, reg, use_rep="X_emb", copy=True, check_provenance=False)
    out.uns["spatial"]["lib"]["scalefactors"]["spot_diameter_fullres"] = 1.0
    out.uns["spatial"]["lib"]["images"]["hires"][:] = 0
    assert adata.uns["spatial"]["lib"]["scalefactors"]["spot_diameter_fullres"] == 89.4
    assert (adata.uns["spatial"]["lib"]["images"]["hires"] == 0.5).all()


def test_rule5_embed_copy_of_sdata_shares_no_attrs_shapes_or_tables():
    sdata = _sample()
    sdata.attrs["hopt_st"] = {"note": {"a": 1}}
    before_radius = sdata.shapes["spots"]["radius"].copy()
    out = hs.pp.embed(sdata, FAST, device="cpu", progress=False, copy=True)
    out.attrs["hopt_st"]["note"]["a"] = 2
    out.shapes["spots"]["radius"] *= 10
    out.tables["table"].uns.setdefault("x", {})["y"] = 1
    assert sdata.attrs["hopt_st"]["note"]["a"] == 1
    assert (sdata.shapes["spots"]["radius"] == before_radius).all()
    assert "x" not in sdata.tables["table"].uns
    assert "X_handcrafted-rules" not in sdata.tables["table"].obsm


# ----------------------------------------------------------------------------------------------------------
# rule 7: non-finite numbers never pass silently; a regressor file is checked completely at load
# ----------------------------------------------------------------------------------------------------------
def _edit_regressor(path: Path, edit) -> Path:
    """Rewrite ``path`` (a saved regressor) after ``edit(meta, tensors)`` changed its metadata or tensors."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["hopt_st"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    save_file(tensors, str(path), metadata={"hopt_st": json.dumps(meta)})
    return path


def _nan_coef(meta, t):
    t["linear.coef"][0, 0] = np.nan


def _no_intercept(meta, t):
    del t["linear.intercept"]


def _extra_gene(meta, t):
    meta["genes"].append("EXTRA")


def _evil_param(meta, t):
    meta["params"]["evil"] = 1


def _inf_mean(meta, t):
    t["linear.x_mean"][-1] = np.inf


@pytest.mark.parametrize(
    "edit, words",
    [
        (_nan_coef, "NaN/inf values in tensor 'linear.coef'"),
        (_no_intercept, "no tensor ['linear.intercept']"),
        (_extra_gene, "'linear.coef' of shape (6, 3), expected (6, 4)"),
        (_evil_param, "parameters ['evil']"),
        (_inf_mean, "NaN/inf values in tensor 'linear.x_mean'"),
    ],
)
def test_rule7_hand_edited_regressor_refused_at_load(tmp_path, edit, words):
    path = tmp_path / "reg.safetensors"
    _fit_regressor().save(path)
    _edit_regressor(path, edit)
    with pytest.raises(CorruptFileError) as e:
        hs.tl.ExpressionRegressor.load(path)
    assert str(path) in str(e.value) and words in str(e.value)


def test_rule7_mlp_regressor_checked_too(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    reg = hs.tl.ExpressionRegressor("mlp", hidden=8, max_epochs=2).fit(x, x[:, :2])
    path = tmp_path / "mlp.safetensors"
    reg.save(path)
    assert hs.tl.ExpressionRegressor.load(path).predict(x).shape == (60, 2)  # the intact file loads

    def zero_std(meta, t):
        t["norm.x_std"][0] = 0.0

    _edit_regressor(path, zero_std)
    with pytest.raises(CorruptFileError, match="non-positive values in 'norm.x_std'"):
        hs.tl.ExpressionRegressor.load(path)


def test_rule7_predict_cli_refuses_nan_regressor(tmp_path, capsys):
    """The issue's case: 100 % NaN maps with exit status 0; now refused before anything is computed."""
    path = tmp_path / "reg.safetensors"
    _fit_regressor().save(path)
    _edit_regressor(path, _nan_coef)
    slide = tmp_path / "s.zarr"
    _sample().write(slide)
    rc, line = _cli(
        capsys, "-q", "predict", slide, "--regressor", path, "--model", FAST, "--out", tmp_path / "o.zarr"
    )
    assert rc == 1 and "CorruptFileError" in line and str(path) in line and "NaN/inf" in line
    assert not (tmp_path / "o.zarr").exists()


def test_rule7_overflowing_predictions_refused():
    """The other direction: finite embeddings far outside the fitted range overflow to inf in float32."""
    adata = _adata_with_spatial()
    adata.obsm["X_emb"][0] = 1e300
    with pytest.raises(ValueError, match="NaN/inf for .* predicted values"):
        hs.tl.predict_expression(adata, _fit_regressor(), use_rep="X_emb", check_provenance=False)
    assert "predicted" not in adata.obsm


@settings(FUZZ, max_examples=16)
@given(
    key=st.sampled_from(["linear.x_mean", "linear.coef", "linear.intercept", "alpha"]),
    action=st.sampled_from(["nan", "drop_last", "transpose", "delete"]),
)
def test_rule7_fuzz_regressor_tensor_edits(tmp_path_factory, key, action):
    """Any edit of a tensor is refused at load naming the file, or leaves a regressor whose predictions are finite."""
    path = tmp_path_factory.mktemp("reg") / "r.safetensors"
    _fit_regressor().save(path)

    def edit(meta, t):
        if action == "nan":
            t[key].reshape(-1)[0] = np.nan
        elif action == "drop_last":
            t[key] = np.ascontiguousarray(t[key][..., :-1])
        elif action == "transpose":
            t[key] = np.ascontiguousarray(t[key].T[::-1])
        else:
            del t[key]

    _edit_regressor(path, edit)
    try:
        reg = hs.tl.ExpressionRegressor.load(path)
    except CorruptFileError as e:
        assert str(path) in str(e)
        return
    pred = reg.predict(np.random.default_rng(1).normal(size=(5, 6)))
    assert np.isfinite(pred).all()


# ----------------------------------------------------------------------------------------------------------
# rule 8: memory bounded by what is real, not by what a header or an argument claims
# ----------------------------------------------------------------------------------------------------------
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares ``width`` x ``height`` px (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    row = b"\x00" + b"\xff" * 3 * 8  # a few rows only: the rest is missing, as in a bomb that never inflates
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(row * 4))
        + chunk(b"IEND", b"")
    )
    return path


def test_rule8_png_bomb_refused_from_header(tmp_path):
    import tracemalloc

    adata = _adata_with_spatial()
    png = _png_header_only(tmp_path / "bomb.png", 40_000, 40_000)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="declares 1600 Mpx, more than Pillow") as e:
            hs.io.from_anndata(adata, image=png, image_mpp=0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(png) in str(e.value) and "tiled pyramidal TIFF" in str(e.value)
    assert peak < 50 * 2**20  # refused from the header: nothing near 4.8 GB was allocated


def test_rule8_pillow_limit_is_honoured_and_can_be_raised(tmp_path, monkeypatch):
    from PIL import Image

    png = tmp_path / "small.png"
    Image.fromarray(np.full((40, 50, 3), 200, dtype=np.uint8)).save(png)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="declares 50 x 40 px"):
        hs.io.from_anndata(_adata_with_spatial(), image=png, image_mpp=0.5)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # a user who trusts the file raises it
    sdata = hs.io.from_anndata(_adata_with_spatial(), image=png, image_mpp=0.5)
    assert any(max(np.shape(v)) >= 50 for v in sdata.images.values())


@pytest.mark.parametrize(
    "kw", [{"spacing_um": 0.3}, {"spacing_um": 0.05}, {"size_um": 1.0, "shape": "square"}]
)
def test_rule8_tile_grid_spacing_bounded_before_allocating(kw):
    sdata = _sample()
    with pytest.raises(ValueError, match="not a plausible pseudo-spot geometry"):
        hs.pp.tile_grid(sdata, tissue_key=None, **kw)
    assert "grid" not in sdata.tables


def test_rule8_tile_grid_count_bounded_by_claimed_pixel_size():
    """Another claim: a plausible-looking µm/px (900, under the 1000 bound) makes a 1.8 x 0.8 m slide, whose
    lattice is refused from its size before any tile is allocated."""
    import tracemalloc

    sdata = _sample()
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="more than 5,000,000"):
            hs.pp.tile_grid(sdata, tissue_key=None, image_mpp=900.0, spacing_um=2.0, size_um=2.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


# ----------------------------------------------------------------------------------------------------------
# rule 4: input files never pull in data from outside what the user named
# ----------------------------------------------------------------------------------------------------------
SECRET = b"PRIVATE-KEY-0123456789abcdef"


def _bench_task(tmp_path: Path, n_samples: int = 3) -> dict:
    return hs.datasets.write_hest_layout(
        tmp_path / "bench", layout="bench", task="SYNTH", n_samples=n_samples, n_spots=30, n_genes=60, seed=0
    )


def _external_barcodes(patch_file: Path, secret_file: Path) -> None:
    """Make ``patch_file``'s ``barcode`` dataset read its bytes from ``secret_file`` (HDF5 external storage)."""
    import h5py

    secret_file.write_bytes(SECRET * 64)
    with h5py.File(patch_file, "r+") as f:
        n = f["barcode"].shape[0]
        del f["barcode"]
        f.create_dataset("barcode", shape=(n,), dtype="S16", external=[(str(secret_file), 0, 16 * n)])


def test_rule4_patch_file_with_external_storage_refused(tmp_path):
    """The issue's case: a patch file whose barcodes live in a private file; embed-cohort records the failure,
    embeds the other samples, and no output holds the private bytes."""
    task = _bench_task(tmp_path)
    bad = Path(task["paths"]["SYNB001"]["patches"])
    _external_barcodes(bad, tmp_path / "private.key")
    with pytest.raises(ValueError, match="pulls in data from outside itself") as e:
        hs.io.read_patches(bad)
    assert str(bad) in str(e.value) and "private.key" in str(e.value)
    df = hs.pp.embed_cohort(task["task_dir"], FAST, tmp_path / "emb", device="cpu", retries=0, progress=False)
    status = df.set_index("sample")
    assert status.loc["SYNB001", "status"] == "failed" and "outside itself" in status.loc["SYNB001", "error"]
    assert (status.loc[["SYNB000", "SYNB002"], "status"] == "done").all()
    for f in (tmp_path / "emb").rglob("*"):
        assert not f.is_file() or SECRET not in f.read_bytes()


def test_rule4_h5ad_with_external_link_or_virtual_dataset_refused(tmp_path, capsys):
    import h5py

    task = _bench_task(tmp_path, n_samples=2)
    h5ad = Path(task["paths"]["SYNB000"]["adata"])
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.arange(30, dtype=np.float64))
    linked = tmp_path / "linked.h5ad"
    virtual = tmp_path / "virtual.h5ad"
    for path in (linked, virtual):
        path.write_bytes(h5ad.read_bytes())
    with h5py.File(linked, "r+") as f:
        f["uns/extra"] = h5py.ExternalLink(str(other), "/x")
    with h5py.File(virtual, "r+") as f:
        layout = h5py.VirtualLayout(shape=(30,), dtype=np.float64)
        layout[:] = h5py.VirtualSource(str(other), "x", shape=(30,))
        f["uns"].create_virtual_dataset("extra", layout)
    for path, words in ((linked, "external link 'uns/extra'"), (virtual, "virtual dataset 'uns/extra'")):
        with pytest.raises(ValueError, match="outside itself") as e:
            hs.io._counts.read_h5ad(path)
        assert str(path) in str(e.value) and words in str(e.value)
        rc, line = _cli(capsys, "-q", "embed", path, "--model", FAST, "--out", tmp_path / "o.h5ad")
        assert rc == 1 and "ExternalDataError" in line and str(path) in line
    assert not (tmp_path / "o.h5ad").exists()


def test_rule4_virtual_dataset_of_the_file_itself_is_allowed(tmp_path):
    """Judged correct: a virtual dataset mapping the file itself ('.') reads nothing from outside."""
    import h5py

    from hopt_st._h5 import open_h5

    path = tmp_path / "self.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(4.0))
        layout = h5py.VirtualLayout(shape=(4,), dtype=np.float64)
        layout[:] = h5py.VirtualSource(".", "x", shape=(4,))
        f.create_virtual_dataset("v", layout)
    with open_h5(path) as f:
        assert list(f["v"][:]) == [0.0, 1.0, 2.0, 3.0]


def test_rule4_bag_embeddings_from_outside_the_file_refused(tmp_path):
    """Another reader of the rule: a slide's bag whose embeddings are stored in another file is refused by
    hs.io.Bags, and the other file's numbers never become the bag."""
    import h5py

    from hopt_st._h5 import ExternalDataError

    prov = {"model": "m", "weights_sha256": "w", "mpp": 0.5, "patch_size": 224}
    good = hs.io.write_embeddings(
        tmp_path / "m" / "good.h5", np.ones((3, 4), np.float32), ["a", "b", "c"], provenance=prov
    )
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full((3, 4), 7.0, np.float32).tobytes())
    bad = tmp_path / "m" / "bad.h5"
    with h5py.File(good, "r") as src, h5py.File(bad, "w") as f:
        for k, v in src.attrs.items():
            f.attrs[k] = v
        for name in src:
            if name != "embeddings":
                src.copy(name, f)
        f.create_dataset("embeddings", shape=(3, 4), dtype=np.float32, external=[(str(secret), 0, 48)])
    bags = hs.io.Bags([good, bad])
    assert bags.arrays(0).sum() == 12
    with pytest.raises(ExternalDataError, match="bad.h5"):
        bags.arrays(1)


@pytest.mark.parametrize("model", ["../../X", "a/../../X", "/abs/X"])
def test_rule4_bench_results_stay_inside_out(tmp_path, capsys, model):
    """The issue's case (`--model ../../X` or an absolute path wrote results outside --out), from the CLI and
    from bench.run."""
    task = _bench_task(tmp_path, n_samples=2)
    out = tmp_path / "deep" / "er" / "out"
    out.parent.mkdir(parents=True)
    before = _digest(tmp_path)
    rc, line = _cli(capsys, "-q", "bench", task["root"], "--model", model, "--out", out)
    assert rc == 1 and "would lie outside" in line and model in line
    with pytest.raises(ValueError, match="would lie outside"):
        hs.bench.run(task["root"], model=model, out_dir=out)
    assert _digest(tmp_path) == before  # nothing written anywhere


@settings(FUZZ, max_examples=60)
@given(st.lists(st.sampled_from(["..", ".", "a", "b", "", "/", "x/..", "../a"]), min_size=1, max_size=4))
def test_rule4_fuzz_path_inside(tmp_path_factory, parts):
    from hopt_st._atomic import path_inside

    base = tmp_path_factory.mktemp("base")
    try:
        path = path_inside(base, *parts)
    except ValueError as e:
        assert "would lie outside" in str(e)
        return
    assert path.resolve().is_relative_to(base.resolve()) and path.resolve() != base.resolve()


# ----------------------------------------------------------------------------------------------------------
# rule 6: a benchmark never scores what it trained on
# ----------------------------------------------------------------------------------------------------------
def _add_row(csv: Path, row: str) -> None:
    csv.write_text(csv.read_text().rstrip("\n") + "\n" + row + "\n")


def test_rule6_test_sample_in_train_split_refused(tmp_path):
    """The issue's case: a test sample that also sits in the training split (mean Pearson 0.713 -> 0.806)."""
    task = _bench_task(tmp_path)
    splits = Path(task["task_dir"]) / "splits"
    _add_row(splits / "train_0.csv", "SYNB000,patches/SYNB000.h5,adata/SYNB000.h5ad")
    with pytest.raises(ValueError, match=r"split 0 .* tests samples it also trains on: \['SYNB000'\]"):
        hs.io.read_hest_bench(task["root"], "SYNTH")
    with pytest.raises(ValueError, match="trains on"):
        hs.bench.run(task["root"], model=FAST, out_dir=tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_rule6_same_spots_under_another_id_refused(tmp_path):
    """Another case: the test sample's patch file listed in train under another sample id."""
    task = _bench_task(tmp_path)
    splits = Path(task["task_dir"]) / "splits"
    _add_row(splits / "train_1.csv", "ALIAS,patches/SYNB001.h5,adata/SYNB000.h5ad")
    with pytest.raises(ValueError, match=r"SYNB001 \(test\) = ALIAS \(train\): same patches_path"):
        hs.io.read_hest_bench(task["root"], "SYNTH")


def test_rule6_disjoint_splits_still_read(tmp_path):
    task = _bench_task(tmp_path)
    sdata = hs.io.read_hest_bench(task["root"], "SYNTH")
    for fold in sdata.attrs["hest_bench"]["splits"]:
        assert not set(fold["train"]) & set(fold["test"])


# ----------------------------------------------------------------------------------------------------------
# rule 10: one bad sample never stops a cohort
# ----------------------------------------------------------------------------------------------------------
def _read_status(path: Path) -> dict:
    import pandas as pd

    return pd.read_csv(path).set_index("sample").to_dict("index")


def test_rule10_symlink_loop_source_recorded_others_embedded(tmp_path, capsys):
    """The issue's case: a source that is a symlink loop aborted the whole run."""
    task = _bench_task(tmp_path, n_samples=2)
    loop = tmp_path / "loop.h5"
    loop.symlink_to(loop)
    csv = tmp_path / "cohort.csv"
    csv.write_text(f"sample_id,source\ngood,{task['paths']['SYNB000']['patches']}\nbad,{loop}\n")
    out = tmp_path / "emb"
    rc = main(["-q", "embed-cohort", str(csv), "--model", FAST, "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "failed bad" in err and "symbolic link" in err
    status = _read_status(out / FAST / "status.csv")
    assert status["good"]["status"] == "done" and (out / FAST / "good.h5").is_file()
    assert status["bad"]["status"] == "failed" and "symbolic link" in status["bad"]["error"]


def test_rule10_unlistable_source_with_explicit_kind_recorded(tmp_path):
    """Another case: with ``kind`` given, a looping source fails while its files are listed (ELOOP)."""
    import pandas as pd

    task = _bench_task(tmp_path, n_samples=2)
    loop = tmp_path / "loop.zarr"
    loop.symlink_to(loop)
    table = pd.DataFrame(
        {
            "sample_id": ["good", "bad", "nokind"],
            "source": [task["paths"]["SYNB000"]["patches"], str(loop), str(tmp_path / "missing.h5")],
            "kind": ["patches", "zarr", None],
        }
    )
    df = hs.pp.embed_cohort(table, FAST, tmp_path / "emb", device="cpu", retries=0, progress=False)
    st_ = df.set_index("sample")
    assert st_.loc["good", "status"] == "done"
    assert st_.loc["bad", "status"] == "failed" and "loop" in st_.loc["bad", "error"].lower()
    assert st_.loc["nokind", "status"] == "failed" and "does not exist" in st_.loc["nokind", "error"]
    assert set(_read_status(tmp_path / "emb" / FAST / "status.csv")) == {"good", "bad", "nokind"}
    loop_dir = tmp_path / "loopdir"
    loop_dir.symlink_to(loop_dir)
    bad = pd.DataFrame({"sample_id": ["x"], "source": [str(loop_dir)]})
    with pytest.raises(ValueError, match="x: source .* symlink loop"):  # read_cohort alone still refuses it
        hs.io.read_cohort(bad)
    assert hs.io.read_cohort(bad, keep_bad=True)["problem"].str.contains("symlink loop").all()


# ----------------------------------------------------------------------------------------------------------
# rule 2: embeddings are combined only when they came from the same model, weights and geometry
# (and issue 21: samples with no gene in common are said so, with join= as in anndata.concat)
# ----------------------------------------------------------------------------------------------------------
def _prov(sha: str = "a" * 64, dim: int = 16, mpp: float = 0.5, patch: int = 224) -> dict:
    return {"model": "m", "dim": dim, "weights_sha256": sha, "mpp": mpp, "patch_size": patch}


def _emb_file(out: Path, sid: str, barcodes, dim: int, prov: dict | None, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    hs.io.write_embeddings(
        out / "m" / f"{sid}.h5",
        rng.normal(size=(len(barcodes), dim)).astype(np.float32),
        list(barcodes),
        coords=np.zeros((len(barcodes), 2), dtype=np.int64),
        provenance=prov,
    )


@pytest.mark.parametrize(
    "prov_b, words",
    [
        (_prov(sha="b" * 64), "aaaaaaaaaaaa"),  # the issue's case: old and new weights
        (_prov(mpp=1.0), "1 µm/px"),  # another: patches cut at another µm/px
        (_prov(patch=256), "256 px"),
    ],
)
def test_rule2_mixed_provenance_refused_or_grouped(tmp_path, prov_b, words):
    bc = [f"bc{i}" for i in range(5)]
    _emb_file(tmp_path, "S1", bc, 16, _prov())
    _emb_file(tmp_path, "S2", bc, 16, prov_b)
    with pytest.raises(ValueError, match="different models, weights or geometries") as e:
        hs.io.load_cohort(tmp_path, "m")
    assert "'S1'" in str(e.value) and "'S2'" in str(e.value) and words in str(e.value)
    groups = hs.io.load_cohort(tmp_path, "m", by_provenance=True)
    assert len(groups) == 2 and sorted(a.n_obs for a in groups.values()) == [5, 5]
    assert {tuple(a.obs["sample_id"].unique()) for a in groups.values()} == {("S1",), ("S2",)}


def test_rule2_files_of_different_dims_never_cut(tmp_path):
    """The issue's other case: a 32-d file was cut to 16 dims to match another (HEST files record no provenance)."""
    bc = [f"bc{i}" for i in range(5)]
    _emb_file(tmp_path, "S1", bc, 32, None)
    _emb_file(tmp_path, "S2", bc, 16, None)
    with pytest.raises(ValueError, match=r"32d\|.*: \['S1'\]; .*16d\|.*: \['S2'\]"):
        hs.io.load_cohort(tmp_path, "m")
    (tmp_path / "m" / "S2.h5").unlink()
    _emb_file(tmp_path, "S3", bc, 32, None, seed=1)  # same geometry: stacked, every dimension kept
    adata = hs.io.load_cohort(tmp_path, "m")
    assert adata.obsm["X_m"].shape == (10, 32)
    assert np.array_equal(adata.obsm["X_m"][:5], hs.io.read_embeddings(tmp_path / "m" / "S1.h5").embeddings)


def _counts_cohort(tmp_path: Path, rename_second: bool):
    """Two bench samples with embeddings, the second one's genes renamed (another namespace) if asked."""
    import anndata as ad
    import pandas as pd

    task = _bench_task(tmp_path, n_samples=2)
    rows = []
    for k, sid in enumerate(("SYNB000", "SYNB001")):
        counts = ad.read_h5ad(task["paths"][sid]["adata"])
        if rename_second and k == 1:
            counts.var_names = [f"ENSG{i:011d}" for i in range(counts.n_vars)]
        path = tmp_path / f"{sid}_counts.h5ad"
        counts.write_h5ad(path)
        _emb_file(tmp_path / "emb", sid, counts.obs_names, 16, _prov(), seed=k)
        rows.append({"sample_id": sid, "source": task["paths"][sid]["patches"], "counts": str(path)})
    return pd.DataFrame(rows), counts.n_vars


def test_issue21_no_common_gene_said_and_join_outer(tmp_path):
    cohort, n_genes = _counts_cohort(tmp_path, rename_second=True)
    with pytest.raises(ValueError, match="samples 'SYNB000' and 'SYNB001' have no gene in common") as e:
        hs.io.load_cohort(tmp_path / "emb", "m", cohort)
    assert "join='outer'" in str(e.value)
    outer = hs.io.load_cohort(tmp_path / "emb", "m", cohort, join="outer")
    assert outer.n_vars == 2 * n_genes and (outer.var["n_samples_measured"] == 1).all()
    with pytest.raises(ValueError, match="join='left'"):
        hs.io.load_cohort(tmp_path / "emb", "m", cohort, join="left")


def test_issue21_shared_genes_inner_join_unchanged(tmp_path):
    cohort, n_genes = _counts_cohort(tmp_path, rename_second=False)
    inner = hs.io.load_cohort(tmp_path / "emb", "m", cohort)
    outer = hs.io.load_cohort(tmp_path / "emb", "m", cohort, join="outer")
    assert inner.n_vars == outer.n_vars == n_genes and (outer.var["n_samples_measured"] == 2).all()


# ----------------------------------------------------------------------------------------------------------
# rule 1: --overwrite replaces an output, never an input or a folder the user owns
# ----------------------------------------------------------------------------------------------------------
def test_rule1_predict_out_is_the_slide(tmp_path, capsys):
    """The issue's case: `predict slide.zarr --out slide.zarr --overwrite` replaced the slide with the result."""
    slide = tmp_path / "slide.zarr"
    _sample().write(slide)
    reg = tmp_path / "reg.safetensors"
    _fit_regressor().save(reg)
    before = _digest(tmp_path)
    args = ["-q", "predict", slide, "--regressor", reg, "--model", FAST, "--out", slide, "--overwrite"]
    rc, line = _cli(capsys, *args)
    assert rc == 1 and f"--out '{slide}' is the input '{slide}'" in line
    assert _digest(tmp_path) == before


def test_rule1_embed_out_contains_the_input(tmp_path, capsys):
    """The issue's case: `embed project/outs --out project --overwrite` deleted project/, outs/ and a notes file."""
    project = tmp_path / "project"
    outs = hs.datasets.write_spaceranger_outs(_sample(), project / "outs", hires_size=300, lowres_size=100)
    (project / "notes.txt").write_text("my notes")
    before = _digest(project)
    rc, line = _cli(capsys, "-q", "embed", outs, "--model", FAST, "--out", project, "--overwrite")
    assert rc == 1 and f"--out '{project}' contains the input '{outs}'" in line
    assert _digest(project) == before


def test_rule1_overwrite_replaces_only_a_store_of_ours(tmp_path, capsys):
    """Another case: --out naming a SpatialData store the user wrote (not hopt_st) is never replaced; one that an
    earlier `embed --out` wrote is."""
    src = tmp_path / "s.zarr"
    _sample().write(src)
    theirs = tmp_path / "theirs.zarr"
    _sample(seed=1).write(theirs)
    before = _digest(theirs)
    rc, line = _cli(
        capsys, "-q", "embed", src, "--model", FAST, "--out", theirs, "--overwrite", "--device", "cpu"
    )
    assert rc == 1 and "hopt_st did not write" in line and str(theirs) in line
    assert _digest(theirs) == before
    mine = tmp_path / "mine.zarr"
    for extra in ([], ["--overwrite"]):  # written, then replaced: a store of ours
        rc, line = _cli(capsys, "-q", "embed", src, "--model", FAST, "--out", mine, "--device", "cpu", *extra)
        assert rc == 0, line
    assert (mine / ".hopt_st_output").is_file()


def test_rule1_h5ad_and_png_outputs_of_the_user_not_replaced(tmp_path, capsys):
    import anndata as ad
    from PIL import Image

    user = tmp_path / "user.h5ad"
    ad.AnnData(np.ones((3, 2), dtype=np.float32)).write_h5ad(user)
    before = _digest(user)
    h5ad = tmp_path / "in.h5ad"
    a = _adata_with_spatial()
    a.write_h5ad(h5ad)
    rc, line = _cli(capsys, "-q", "embed", h5ad, "--model", FAST, "--out", user, "--overwrite")
    assert rc == 1 and "hopt_st did not write" in line and _digest(user) == before
    # predict: a gene map would land on a photo of the user's
    slide = tmp_path / "slide.zarr"
    _sample().write(slide)
    reg = tmp_path / "reg.safetensors"
    _fit_regressor().save(reg)
    photo = tmp_path / "pred_G0.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(photo)
    before = _digest(photo)
    rc, line = _cli(
        capsys, "-q", "predict", slide, "--regressor", reg, "--model", FAST, "--genes", "G0",
        "--out", tmp_path / "pred.zarr", "--overwrite",
    )  # fmt: skip
    assert rc == 1 and f"map '{photo}' is a file hopt_st did not write" in line and _digest(photo) == before


def test_rule1_demo_and_bench_never_replace_what_is_not_theirs(tmp_path, capsys, hest_bench_root):
    from hopt_st._demo import run_demo

    out = tmp_path / "demo"
    out.mkdir()
    _sample().write(out / "demo.zarr")  # the user's own store, at the demo's output name
    before = _digest(out)
    with pytest.raises(FileExistsError, match="hopt_st did not write"):
        run_demo(out, overwrite=True, progress=False)
    assert _digest(out) == before
    root = Path(hest_bench_root["root"])
    before = _digest(root)
    for bad_out in (root, root.parent):
        rc, line = _cli(capsys, "-q", "bench", root, "--model", FAST, "--out", bad_out, "--overwrite")
        assert rc == 1 and "the input" in line and str(root) in line
    assert _digest(root) == before


def test_rule1_cohort_output_file_that_is_the_input(tmp_path):
    """embed_cohort never writes <out>/<model>/<sid>.h5 over the patch file it reads from."""
    import pandas as pd

    task = _bench_task(tmp_path, n_samples=2)
    folder = tmp_path / "emb" / FAST
    folder.mkdir(parents=True)
    src = folder / "S.h5"
    src.write_bytes(Path(task["paths"]["SYNB000"]["patches"]).read_bytes())
    before = _digest(src)
    table = pd.DataFrame({"sample_id": ["S"], "source": [str(src)]})
    df = hs.pp.embed_cohort(table, FAST, tmp_path / "emb", device="cpu", overwrite=True, progress=False)
    assert df.loc[0, "status"] == "failed" and "is the input" in df.loc[0, "error"]
    assert _digest(src) == before


@settings(FUZZ, max_examples=40)
@given(
    rel=st.sampled_from(["same", "parent", "child", "sibling", "symlink"]),
    exists=st.booleans(),
    overwrite=st.booleans(),
)
def test_rule1_fuzz_check_output(tmp_path_factory, rel, exists, overwrite):
    """check_output never lets an output be, contain or (when replacing) lie inside an input."""
    from hopt_st._atomic import check_output

    base = tmp_path_factory.mktemp("co")
    inp = base / "data" / "in.zarr"
    inp.mkdir(parents=True)
    (inp / "x").write_text("input")
    out = {
        "same": inp,
        "parent": inp.parent,
        "child": inp / "out.zarr",
        "sibling": base / "data" / "out.zarr",
        "symlink": base / "link.zarr",
    }[rel]
    if rel == "symlink":
        out.symlink_to(inp)
    if exists and not out.exists():
        out.mkdir()
    try:
        check_output(out, inputs=[inp], overwrite=overwrite)
    except (ValueError, FileExistsError):
        assert (inp / "x").read_text() == "input"
        return
    assert rel in ("sibling", "child") and (not out.exists() or overwrite)
    assert rel != "child" or not out.exists()


# ----------------------------------------------------------------------------------------------------------
# rule 9: tissue detection says when it cannot tell
# ----------------------------------------------------------------------------------------------------------
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _he_sdata(rgb: np.ndarray, mpp: float):
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    image = Image2DModel.parse(np.ascontiguousarray(rgb.transpose(2, 0, 1)), dims=("c", "y", "x"))
    sdata = SpatialData(images={"he": image})
    hs.io.set_image_mpp(sdata, {"he": mpp})
    return sdata


@pytest.mark.skipif(not (SHARED / "visium_crop").is_dir(), reason="../shared/data/visium_crop not present")
def test_rule9_glass_free_crop_is_all_tissue(caplog):
    """The issue's case: a glass-free crop of the real visium_crop H&E (63 % tissue, 12 of 32 tiles)."""
    from PIL import Image

    with Image.open(SHARED / "visium_crop" / "test_img.jpg") as im:
        rgb = np.asarray(im.convert("RGB"))[1300:1717, 500:950]  # inside the tissue: no glass in view
    sdata = _he_sdata(rgb, 0.727)  # 65 µm / 89.44 px (shared/data/README.md)
    with caplog.at_level("WARNING", logger="hopt_st"):
        hs.pp.detect_tissue(sdata)
    assert "no background in view" in caplog.text and "background='present'" in caplog.text
    area_px = sdata.shapes["tissue"].area.sum()
    assert area_px > 0.93 * rgb.shape[0] * rgb.shape[1]  # the whole image, up to the outline's half pixel
    hs.pp.tile_grid(sdata, spacing_um=56, size_um=56, min_tissue_fraction=0.5)
    hs.pp.tile_grid(sdata, spacing_um=56, size_um=56, tissue_key=None, key_added="all", table_name="all_t")
    assert sdata.tables["grid"].n_obs == sdata.tables["all_t"].n_obs  # every tile predicted
    hs.pp.detect_tissue(sdata, background="present", key_added="otsu")  # the override: Otsu as before
    assert sdata.shapes["otsu"].area.sum() < 0.8 * rgb.shape[0] * rgb.shape[1]


def _three_tone(glass_cols: int) -> np.ndarray:
    """400 x 400 px: ``glass_cols`` columns of glass, the rest pale pink stroma (top) and purple (bottom)."""
    rgb = np.empty((400, 400, 3), dtype=np.uint8)
    rgb[:200] = (235, 190, 210)  # saturation 0.19
    rgb[200:] = (150, 70, 160)  # saturation 0.56
    rgb[:, :glass_cols] = (236, 234, 238)  # glass, saturation 0.02
    return rgb


def test_rule9_otsu_inside_the_tissue_falls_back_to_glass(caplog):
    """Another case: 2 % glass, two tissue tones. Otsu splits the tissue (pale stroma called background);
    only glass-like pixels are background instead, with a warning."""
    sdata = _he_sdata(_three_tone(8), 2.0)
    with caplog.at_level("WARNING", logger="hopt_st"):
        hs.pp.detect_tissue(sdata, min_object_um2=1000)
    assert "falls inside the tissue" in caplog.text
    frac = sdata.shapes["tissue"].area.sum() / 400**2
    assert 0.95 < frac <= 0.99  # everything but the glass strip (98 %), up to the outline and the blur
    hs.pp.detect_tissue(sdata, min_object_um2=1000, background="present", key_added="otsu")
    assert sdata.shapes["otsu"].area.sum() / 400**2 < 0.55  # Otsu's own answer: the purple half only


@settings(FUZZ, max_examples=12)
@given(glass=st.integers(0, 200), pale=st.integers(120, 250))
def test_rule9_fuzz_glass_never_tissue_and_tissue_never_lost(glass, pale):
    """Over glass strips of 0-50 % and stroma of varied paleness: glass is never called tissue (beyond the
    outline's pixel) and the tissue is never cut in half."""
    rgb = _three_tone(glass)
    rgb[:200, glass:] = (pale, 150, 190)
    sdata = _he_sdata(rgb, 2.0)
    hs.pp.detect_tissue(sdata, min_object_um2=1000)
    frac = sdata.shapes["tissue"].area.sum() / 400**2
    truth = 1 - glass / 400
    assert truth - 0.06 < frac <= truth + 0.015


# ----------------------------------------------------------------------------------------------------------
# rule 3: concurrent writers never lose each other's work
# ----------------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
_CLI = "import sys; from hopt_st._cli import main; sys.exit(main(sys.argv[1:]))"


def _popen(*args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-c", _CLI, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_rule3_two_in_place_embeds_on_one_store_keep_both_keys(tmp_path):
    """The issue's case: two in-place `hopt-st embed` runs on one store both exit 0 and one key was missing.
    Both processes read the store before either writes (the embedding takes longer than the start-up gap)."""
    import spatialdata as sd

    store = tmp_path / "s.zarr"
    _sample(n_spots=30).write(store)
    procs = [_popen("-q", "embed", store, "--model", "handcrafted", "--key-added", k) for k in ("X_a", "X_b")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].decode()[-500:] for o in outs]
    table = sd.read_zarr(store)["table"]
    assert {"X_a", "X_b"} <= set(table.obsm)
    assert np.allclose(table.obsm["X_a"], table.obsm["X_b"])  # the same model: the same numbers
    assert set(table.uns["hopt_st"]["embeddings"]) >= {"X_a", "X_b"}
    assert not list(tmp_path.glob(".*.lock"))  # the lock file goes with its last holder


def test_rule3_in_place_write_keeps_what_another_process_wrote_since_reading(tmp_path):
    """The merge itself, deterministically: a key written to the store after this SpatialData was read is kept."""
    import spatialdata as sd

    from hopt_st.io._store import write_table_in_place

    store = tmp_path / "s.zarr"
    _sample().write(store)
    mine, other = sd.read_zarr(store), sd.read_zarr(store)
    other["table"].obsm["X_other"] = np.ones((other["table"].n_obs, 3))
    write_table_in_place(other, "table")
    mine["table"].obsm["X_mine"] = np.zeros((mine["table"].n_obs, 2))
    write_table_in_place(mine, "table")
    assert {"X_mine", "X_other"} <= set(sd.read_zarr(store)["table"].obsm)


def test_rule3_two_cohort_runs_into_one_folder_keep_each_others_status(tmp_path):
    """Another case: status.csv was read once at the start of a run, so two runs into one folder dropped each
    other's rows; it is now re-read under a lock before each rewrite."""
    import pandas as pd

    from hopt_st.pp._cohort import _Status

    path = tmp_path / "status.csv"
    a, b = _Status(path, ["A"]), _Status(path, ["B"])  # both started before either wrote
    a.record({"sample": "A", "status": "done", "n_spots": 3, "seconds": 1.0, "error": ""})
    b.record({"sample": "B", "status": "failed", "n_spots": None, "seconds": None, "error": "x"})
    a.record({"sample": "A", "status": "done", "n_spots": 4, "seconds": 1.0, "error": ""})
    rows = pd.read_csv(path).set_index("sample")
    assert set(rows.index) == {"A", "B"} and rows.loc["A", "n_spots"] == 4
    assert not list(tmp_path.glob(".*.lock"))


def test_rule3_lock_excludes_and_survives_cleanup(tmp_path):
    """FileLock with cleanup: a second holder waits, and a waiter that locked the deleted file locks again."""
    import threading

    from hopt_st._lock import FileLock

    path = tmp_path / ".x.lock"
    order = []
    first = FileLock(path, 5, cleanup=True)
    first.acquire()

    def second():
        with FileLock(path, 5, cleanup=True):
            order.append("second")

    t = threading.Thread(target=second)
    t.start()
    import time

    time.sleep(0.3)
    order.append("first")
    first.release()
    t.join(10)
    assert order == ["first", "second"] and not path.exists()
    with pytest.raises(TimeoutError, match="locked by process"):
        with FileLock(path, 5):
            FileLock(path, 0.2).acquire()
