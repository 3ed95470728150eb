"""Issue 10, "nothing lost, nothing silently wrong": one test per numbered case and per listed error.

``test_caseNN_*`` are the numbered cases (data loss 1-2, silently wrong 3-9, crashes 10-12); ``test_error_*`` the
errors that must name the file (and, from the CLI, the flag) and say what to do. Every test asserts the outcome:
the store / file on disk unchanged byte for byte after a failed write, the error type, and that the message names
the file or flag. The HEST-Benchmark items of the issue (bench caches, ``--tasks ","``) are tested with the
benchmark's own I/O in tests/test_bench.py.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import spatialdata as sd
import torch
from safetensors.torch import save_file
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity

import hopt_st as hs
from hopt_st import models
from hopt_st._cli import main
from hopt_st._patchset import ArrayPatches
from hopt_st.io import CorruptFileError
from hopt_st.io._elements import image_levels, resolve_image_key
from hopt_st.io._store import write_table_in_place
from hopt_st.pp._checkpoint import CheckpointStore

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FAST = "handcrafted-safety"  # the handcrafted encoder on 56 px patches at 2 µm/px (same 112 µm field)
VIT = "tiny-vit-safety"


def specs_to_register(tiny_vit_spec):
    """Registered for this module by the ``model_specs`` fixture (conftest), unregistered after it."""
    fast = dataclasses.replace(models.get_spec("handcrafted"), name=FAST, input_size=56, mpp=2.0)
    return [fast, tiny_vit_spec(VIT, embed_dim=32)]


pytestmark = pytest.mark.usefixtures("model_specs", "cli_process_state")  # main() sets up logging


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256), and every folder (-> "dir")."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _sample(n_spots: int = 40, seed: int = 0):
    return hs.datasets.synthetic_visium(n_spots=n_spots, seed=seed, n_genes=30)


def _store(tmp_path: Path, n_spots: int = 40) -> Path:
    path = tmp_path / "s.zarr"
    _sample(n_spots).write(path)
    return path


def _cli(capsys, *args) -> tuple[int, str]:
    """Exit code and the one ``hopt-st: error:`` line (empty on success)."""
    rc = main([str(a) for a in args])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("hopt-st: error:")]
    assert "Traceback" not in err
    return rc, (lines[0] if lines else "")


def _vit_weights(path: Path, *, nan: bool = False, seed: int = 0) -> Path:
    torch.random.manual_seed(seed)
    state = {
        k: v.clone().contiguous()
        for k, v in models.create(VIT, pretrained=False).backbone.state_dict().items()
    }
    if nan:
        state["norm.weight"][:] = float("nan")
    save_file(state, str(path))
    return path


def _truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _fit_regressor(seed: int = 0) -> hs.tl.ExpressionRegressor:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(50, 6))
    return hs.tl.ExpressionRegressor("ridge").fit(x, x[:, :3] @ rng.normal(size=(3, 2)))


def _space_ranger(tmp_path: Path) -> Path:
    return hs.datasets.write_spaceranger_outs(_sample(30), tmp_path / "outs", hires_size=300, lowres_size=100)


# ----------------------------------------------------------------------------------------------------------
# data loss
# ----------------------------------------------------------------------------------------------------------
def test_case01_cli_embed_invalid_key_keeps_table(tmp_path, capsys):
    store = _store(tmp_path)
    before = _digest(store)
    rc, line = _cli(capsys, "-q", "embed", store, "--model", FAST, "--key-added", "my emb")
    assert rc == 1
    # refused before any work, with the rule spelled out and the flag named
    assert (
        "--key-added 'my emb'" in line and "letters, digits, '_', '-' and '.'" in line and "'my_emb'" in line
    )
    assert _digest(store) == before


def test_case01_cli_embed_timm_model_in_place_keeps_table(tmp_path, capsys):
    store = _store(tmp_path)
    counts = sd.read_zarr(store)["table"].X.toarray()
    weights = _vit_weights_timm(tmp_path / "w.safetensors")
    rc, line = _cli(
        capsys, "-q", "embed", store, "--model", "timm:test_vit", "--weights", weights, "--device", "cpu"
    )
    assert rc == 0, line
    table = sd.read_zarr(store)["table"]
    consolidated = json.loads((store / "zarr.json").read_bytes())["consolidated_metadata"]["metadata"]
    assert "tables/table/obsm/X_timm_test_vit" in consolidated and "images/he" in consolidated
    np.testing.assert_array_equal(table.X.toarray(), counts)
    assert table.obsm["X_timm_test_vit"].shape == (table.n_obs, 64)
    assert table.uns["hopt_st"]["embeddings"]["X_timm_test_vit"]["model"] == "timm:test_vit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr", "w.safetensors"]  # no scratch left
    # the key exists now: refused, naming the CLI's flags (not pp.embed's arguments)
    rc, line = _cli(capsys, "-q", "embed", store, "--model", "timm:test_vit", "--weights", weights)
    assert rc == 1 and "pass --overwrite to replace it, or --key-added another name" in line


def _vit_weights_timm(path: Path) -> Path:
    torch.manual_seed(0)
    enc = models.create("timm:test_vit", pretrained=False)
    save_file({k: v.contiguous() for k, v in enc.backbone.state_dict().items()}, str(path))
    return path


def test_case01_python_default_key_is_a_valid_store_key(tmp_path):
    from hopt_st.pp._embed import default_key

    assert default_key("timm:vit_base patch14/x") == "X_timm_vit_base_patch14_x"
    sdata = _sample(20)
    torch.manual_seed(0)
    hs.pp.embed(sdata, models.create("timm:test_vit", pretrained=False), device="cpu", progress=False)
    assert "X_timm_test_vit" in sdata["table"].obsm
    sdata.write(tmp_path / "after_embed.zarr")  # failed with 'X_timm:test_vit' before
    assert "X_timm_test_vit" in sd.read_zarr(tmp_path / "after_embed.zarr")["table"].obsm
    with pytest.raises(ValueError, match="key_added='a:b' is not a valid key"):
        hs.pp.embed(sdata, FAST, key_added="a:b", progress=False)


@pytest.mark.parametrize("where", ["scratch_write", "swap", "metadata"])
def test_case01_in_place_write_failure_leaves_store_byte_for_byte(tmp_path, monkeypatch, where):
    import hopt_st.io._store as store_mod

    store = _store(tmp_path)
    before = _digest(store)
    sdata = sd.read_zarr(store)
    sdata["table"].obsm["X_new"] = np.ones((sdata["table"].n_obs, 4), np.float32)
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    if where == "scratch_write":  # the disk fills up half-way through writing the new table

        def write(self, path, **kwargs):
            Path(path).mkdir()
            (Path(path) / "partial").write_bytes(b"x" * 1000)
            raise disk_full

        monkeypatch.setattr(sd.SpatialData, "write", write)
    elif where == "swap":  # the rename of the new table into place fails (after the old one moved aside)
        calls, rename = [], os.rename

        def failing_rename(src, dst):
            calls.append(src)
            if len(calls) == 2:
                raise disk_full
            rename(src, dst)

        monkeypatch.setattr(store_mod.os, "rename", failing_rename)
    else:  # the consolidated metadata cannot be replaced

        def no_room(*args, **kwargs):
            raise disk_full

        monkeypatch.setattr(store_mod, "atomic_write_bytes", no_room)
    with pytest.raises(OSError, match="No space left"):
        write_table_in_place(sdata, "table")
    monkeypatch.undo()
    assert _digest(store) == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # the scratch store is gone too
    assert "X_new" not in sd.read_zarr(store)["table"].obsm


_TMPFS_CHILD = textwrap.dedent(
    """
    import hashlib, json, os, shutil, subprocess, sys
    from pathlib import Path
    import numpy as np

    src, mnt = Path(sys.argv[1]), Path(sys.argv[2])
    files = [p for p in src.rglob("*") if p.is_file()]
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in files) + 4096 * sum(1 for p in src.rglob("*"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + (512 << 10)}", "tmpfs", str(mnt)], check=True)
    store = mnt / "s.zarr"
    shutil.copytree(src, store)

    def digest(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    out = {}
    before = digest(store)
    import spatialdata as sd
    from hopt_st.io._store import write_table_in_place
    sdata = sd.read_zarr(store)
    n = sdata["table"].n_obs
    sdata["table"].obsm["X_big"] = np.random.default_rng(0).random((n, 30000)).astype(np.float32)
    try:
        write_table_in_place(sdata, "table")
        out["table"] = None
    except OSError as e:
        out["table"] = e.errno
    out["table_same"] = digest(store) == before
    out["table_left"] = sorted(os.listdir(mnt))

    import hopt_st._atomic as atomic
    from hopt_st._patchset import ArrayPatches
    rng = np.random.default_rng(0)
    patches = ArrayPatches(rng.integers(0, 255, (400, 64, 64, 3), dtype=np.uint8), mpp=0.5,
                           centers=np.zeros((400, 2)), patch_size_src=64.0)
    for name, check in (("h5_checked", atomic.check_free_space), ("h5_unchecked", lambda *a, **k: None)):
        atomic.check_free_space = check  # unchecked: HDF5 itself hits the full disk
        try:
            patches.to_h5(mnt / "p.h5")
            out[name] = None
        except OSError as e:
            out[name] = [e.errno, str(e)]
        out[name + "_left"] = sorted(os.listdir(mnt))
    print("RESULT " + json.dumps(out), flush=True)
    """
)


@pytest.fixture(scope="module")
def full_tmpfs(tmp_path_factory):
    """A store copied onto a tmpfs with 512 KiB to spare, then a table and a patch file too big for it; run in
    a child process that mounts the tmpfs in its own user and mount namespaces (``unshare``)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) here to mount a small tmpfs; the injected-ENOSPC tests cover this path")
    tmp = tmp_path_factory.mktemp("tmpfs")
    _sample(40).write(tmp / "s.zarr")
    (tmp / "mnt").mkdir()
    (tmp / "child.py").write_text(_TMPFS_CHILD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [
        unshare,
        "--user",
        "--map-root-user",
        "--mount",
        sys.executable,
        "-W",
        "ignore",
        str(tmp / "child.py"),
    ]
    proc = subprocess.run(
        [*cmd, str(tmp / "s.zarr"), str(tmp / "mnt")], env=env, capture_output=True, text=True, timeout=300
    )
    result = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not result and "mount" in proc.stderr and proc.returncode != 0 and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0 and result, proc.stderr[-3000:]  # a crash (segfault) of the child fails here
    return json.loads(result[0][len("RESULT ") :])


def test_case01_in_place_write_on_full_tmpfs_keeps_store(full_tmpfs):
    assert full_tmpfs["table"] == errno.ENOSPC
    assert full_tmpfs["table_same"]
    assert full_tmpfs["table_left"] == ["s.zarr"]


def test_case02_regressor_save_refuses_existing_file_and_is_atomic(tmp_path, monkeypatch):
    import hopt_st._atomic as atomic

    path = tmp_path / "reg.safetensors"
    _fit_regressor(0).save(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True") as e:
        _fit_regressor(1).save(path)
    assert str(path) in str(e.value) and path.read_bytes() == before
    # a failure while replacing leaves the old file and no temporary
    monkeypatch.setattr(
        atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "disk full"))
    )
    with pytest.raises(OSError, match="disk full"):
        _fit_regressor(1).save(path, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["reg.safetensors"]
    new = _fit_regressor(1)
    new.save(path, overwrite=True)
    np.testing.assert_array_equal(hs.tl.ExpressionRegressor.load(path).linear_.coef, new.linear_.coef)


# ----------------------------------------------------------------------------------------------------------
# silently wrong
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (SHARED / "visium_mini").is_dir(), reason="shared test data absent")
def test_case03_blank_hires_png_is_not_embedded():
    """The real visium_mini: its hires PNG is a transparent placeholder, its lowres PNG a real H&E."""
    sdata = hs.io.read_visium(SHARED / "visium_mini")
    hires = next(k for k in sdata.images if k.endswith("_hires_image"))
    lowres = next(k for k in sdata.images if k.endswith("_lowres_image"))
    assert resolve_image_key(sdata) == lowres
    hs.pp.embed(sdata, FAST, progress=False)
    emb = sdata["table"].obsm[f"X_{FAST}"]
    assert len(np.unique(emb, axis=0)) > 0.9 * len(emb)  # was: 100 identical black patches
    with pytest.raises(ValueError, match=lowres) as e:
        hs.pp.patches(sdata, image_key=hires)
    assert "(0, 0, 0)" in str(e.value)


def test_case03_blank_image_skipped_or_refused_synthetic():
    sdata = _sample(20)
    big = image_levels(sdata.images["he"])[0].shape
    blank = np.zeros((3, 2 * big[1], 2 * big[2]), np.uint8)  # larger than the H&E: picked before the fix
    sdata.images["placeholder"] = Image2DModel.parse(
        blank, dims=("c", "y", "x"), transformations={"global": Identity()}
    )
    hs.io.set_image_mpp(sdata, {"placeholder": 0.25})
    assert resolve_image_key(sdata) == "he"
    full = np.repeat(np.repeat(np.asarray(image_levels(sdata.images["he"])[0].data), 3, axis=1), 3, axis=2)
    sdata.images["full"] = Image2DModel.parse(
        full, dims=("c", "y", "x"), transformations={"global": Identity()}
    )
    assert resolve_image_key(sdata) == "full"  # the full-resolution image is preferred when there is one
    del sdata.images["full"]
    with pytest.raises(ValueError, match=r"image 'placeholder' holds no H&E.*\['he'\]"):
        hs.pp.patches(sdata, image_key="placeholder")
    del sdata.images["he"]
    with pytest.raises(ValueError, match="no other image"):
        hs.pp.patches(sdata)


def test_blank_look_on_a_window_grid_reads_past_uniform_windows_and_stops_at_a_varying_one():
    """Levels over 4 Mpx are looked at on an 8 x 8 grid of windows, the first read alone: an image uniform in
    its first windows but with tissue in the last one is not blank; one colour everywhere is; and a first
    window that varies ends the look there (no other window is computed)."""
    import dask.array as da

    from hopt_st.io._elements import image_blank_value

    def element(arr):
        return Image2DModel.parse(arr, dims=("c", "y", "x"), transformations={"global": Identity()})

    side = 2400  # 5.8 Mpx: the grid path
    glass = np.full((3, side, side), 240, np.uint8)
    assert image_blank_value(element(da.from_array(glass, chunks=(3, 600, 600)))) == (240, 240, 240)
    tissue = glass.copy()
    tissue[:, -200:, -200:] = 120  # only the grid's last window sees it
    assert image_blank_value(element(da.from_array(tissue, chunks=(3, 600, 600)))) is None
    computed = []
    varied = da.from_array(tissue, chunks=(3, 600, 600)).map_blocks(
        lambda b: (computed.append(b.shape) if b.size else None) or b + 1, dtype=np.uint8
    )  # counts the chunks read (dask's own look at the function uses empty blocks)
    varied = varied.copy()
    varied[:, :10, :10] = 0  # the first window varies
    assert image_blank_value(element(varied)) is None
    assert computed == [(3, 600, 600)]  # the first window's one chunk, nothing else


def test_case04_checkpoint_of_another_image_of_the_same_size_is_refused(tmp_path):
    ck = tmp_path / "ck"
    a = _sample(40, seed=0)
    hs.pp.embed(a, FAST, checkpoint_dir=ck, batch_size=10, progress=False)
    b = _sample(40, seed=0)
    b.images["he"] = _sample(40, seed=1).images["he"]  # same size, spots, ids: other pixels
    with pytest.raises(ValueError, match="image pixels differ"):
        hs.pp.embed(b, FAST, checkpoint_dir=ck, batch_size=10, progress=False)
    hs.pp.embed(b, FAST, checkpoint_dir=tmp_path / "ck2", batch_size=10, progress=False)
    assert not np.allclose(a["table"].obsm[f"X_{FAST}"], b["table"].obsm[f"X_{FAST}"])


def test_case04_batches_without_manifest_are_not_reused(tmp_path):
    ck = tmp_path / "ck"
    p = hs.pp.patches(_sample(40), patch_size=56, target_mpp=2.0)
    hs.pp.embed(p, FAST, checkpoint_dir=ck, batch_size=10, progress=False)
    (ck / "manifest.json").unlink()
    batches = {k: v for k, v in _digest(ck).items() if k.startswith("emb_")}
    assert len(batches) == 4
    with pytest.raises(ValueError, match=r"batch files .* but no manifest\.json") as e:
        hs.pp.embed(p, FAST, checkpoint_dir=ck, batch_size=10, progress=False)
    assert (
        str(ck) in str(e.value) and {k: v for k, v in _digest(ck).items() if k.startswith("emb_")} == batches
    )


def _with_image(sdata, data: np.ndarray):
    """``sdata`` with its H&E replaced by ``data`` (c, y, x), in 256 px chunks."""
    sdata.images["he"] = Image2DModel.parse(
        data, dims=("c", "y", "x"), chunks=(3, 256, 256), transformations={"global": Identity()}
    )
    return sdata


def test_case05_uint16_image_holding_8bit_values_is_not_blackened():
    rgb = np.asarray(image_levels(_sample(20).images["he"])[0].data)
    ref = hs.pp.patches(_with_image(_sample(20), rgb), patch_size=32, target_mpp=2.0).to_numpy()
    as16 = hs.pp.patches(_with_image(_sample(20), rgb.astype(np.uint16)), patch_size=32, target_mpp=2.0)
    np.testing.assert_array_equal(as16.to_numpy(), ref)  # was: max 1 (divided by 257)
    full16 = _with_image(_sample(20), rgb.astype(np.uint16) * 257)
    np.testing.assert_array_equal(hs.pp.patches(full16, patch_size=32, target_mpp=2.0).to_numpy(), ref)
    mixed = rgb.astype(np.uint16) * 257
    half = rgb.shape[2] // 2
    mixed[:, :, :half] = rgb[:, :, :half]  # 8-bit values on the left (read first), 16-bit ones on the right
    mixed_patches = hs.pp.patches(_with_image(_sample(20), mixed), patch_size=32, target_mpp=2.0)
    with pytest.raises(ValueError, match="uint16 .* ambiguous"):
        mixed_patches.to_numpy()
    twelve_bit = hs.pp.patches(
        _with_image(_sample(20), rgb.astype(np.uint16) * 16), patch_size=32, target_mpp=2.0
    )
    with pytest.raises(ValueError, match="12-bit data.* ambiguous"):
        twelve_bit.to_numpy()


def test_case06_nan_embeddings_name_model_weights_and_batch(tmp_path):
    weights = _vit_weights(tmp_path / "corrupt.safetensors", nan=True)
    enc = models.create(VIT, weights=weights)
    x = np.random.default_rng(0).integers(0, 255, (20, 56, 56, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="NaN/inf") as e:
        hs.pp.embed(x, enc, batch_size=8, checkpoint_dir=tmp_path / "ck", progress=False)
    msg = str(e.value)
    assert VIT in msg and str(weights) in msg and "batch starting at patch 0" in msg
    assert not list((tmp_path / "ck").glob("emb_*.npz"))  # nothing of it kept


def test_case07_predict_refuses_embeddings_of_other_weights(tmp_path):
    sdata = _sample(60)
    torch.manual_seed(0)
    hs.pp.embed(sdata, models.create(VIT, pretrained=False), key_added="X_vit", progress=False)
    table = sdata["table"]
    reg = hs.tl.fit_expression(table, use_rep="X_vit", n_top_genes=5)
    assert reg.provenance_["model"] == VIT and reg.provenance_["patch_size"] == 56
    hs.tl.predict_expression(sdata, reg)  # same embeddings: fine
    reg.save(tmp_path / "reg")
    loaded = hs.tl.ExpressionRegressor.load(tmp_path / "reg")
    assert loaded.provenance_ == reg.provenance_
    torch.manual_seed(1)  # other (random) weights, same model and dimension
    hs.pp.embed(
        sdata, models.create(VIT, pretrained=False), key_added="X_vit", overwrite=True, progress=False
    )
    for r in (reg, loaded):
        with pytest.raises(ValueError, match=r"weights_sha256: .*check_provenance=False"):
            hs.tl.predict_expression(sdata, r, key_added="p2")
    hs.tl.predict_expression(sdata, reg, key_added="p2", check_provenance=False)
    assert table.obsm["p2"].shape == (table.n_obs, 5)


def _patch_file(path: Path, barcodes: list[str]) -> Path:
    n = len(barcodes)
    with h5py.File(path, "w") as f:
        f["img"] = np.random.default_rng(0).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
        f["coords"] = np.arange(2 * n).reshape(n, 2) * 50
        f["barcode"] = np.array([b.encode() for b in barcodes]).reshape(-1, 1)
    return path


def test_case08_duplicate_barcodes_are_refused(tmp_path):
    path = _patch_file(tmp_path / "dup.h5", ["AAA-1", "BBB-1", "AAA-1"])
    for call in (hs.io.read_patches, lambda p: hs.pp.embed(p, FAST, progress=False)):
        with pytest.raises(ValueError, match=r"duplicate barcode.*'AAA-1'") as e:
            call(path)
        assert str(path) in str(e.value)
    # the HEST-Benchmark reader: one patch file with a repeated barcode
    info = hs.datasets.write_hest_layout(
        tmp_path / "bench", layout="bench", n_samples=2, n_spots=20, n_genes=50
    )
    task = Path(info["root"]) / info["task"]
    patch_file = sorted((task / "patches").glob("*.h5"))[0]
    with h5py.File(patch_file, "r+") as f:
        bc = f["barcode"][:]
        bc[1] = bc[0]
        f["barcode"][...] = bc
    with pytest.raises(ValueError, match="duplicate barcode") as e:
        hs.io.read_hest_bench(info["root"], info["task"])
    assert str(patch_file) in str(e.value)
    # a table reader: a HEST-1k count table with a repeated barcode
    info = hs.datasets.write_hest_layout(
        tmp_path / "hest", layout="hest1k", n_samples=1, n_spots=20, n_genes=10
    )
    sid = info["sample_ids"][0]
    st = Path(info["root"]) / "st" / f"{sid}.h5ad"
    adata = __import__("anndata").read_h5ad(st)
    adata.obs_names = [adata.obs_names[0]] * 2 + list(adata.obs_names[2:])
    adata.write_h5ad(st)
    with pytest.raises(ValueError, match="duplicate barcode") as e:
        hs.io.read_hest(info["root"], sid)
    assert str(st) in str(e.value)


def _pyramid_tiff(path: Path, levels: list[np.ndarray]) -> Path:
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        opts = dict(tile=(128, 128), photometric="rgb", compression="zlib")
        tw.write(levels[0], subifds=len(levels) - 1, **opts)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **opts)
    return path


def _tissue(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB pattern with structure at every scale (blobs of many sizes)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for _ in range(40):
        cy, cx, r = rng.random(), rng.random(), rng.uniform(0.02, 0.2)
        img += rng.uniform(-1, 1, 3) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / r**2)[..., None]
    return np.clip(128 + 60 * img, 0, 255).astype(np.uint8)


def _half(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def test_case09_pyramid_level_of_other_content_is_ignored(tmp_path, caplog):
    l0 = _tissue(1024, 1024)
    good = [l0, _half(l0), _half(_half(l0))]
    img = hs.io._tiff.read_tiff_image(_pyramid_tiff(tmp_path / "good.tif", good))
    assert len(image_levels(img)) == 3  # a true pyramid passes
    bad = [l0, _half(_tissue(1024, 1024, seed=1)), good[2]]
    with caplog.at_level(logging.WARNING, logger="hopt_st"):
        img = hs.io._tiff.read_tiff_image(_pyramid_tiff(tmp_path / "bad.tif", bad))
    shapes = [lv.shape for lv in image_levels(img)]
    assert shapes == [(3, 1024, 1024), (3, 256, 256)]  # level 1 left out, level 2 kept
    assert "pyramid level 1 (512 x 512 px) is not a downsample of level 0" in caplog.text
    assert str(tmp_path / "bad.tif") in caplog.text


# ----------------------------------------------------------------------------------------------------------
# crashes
# ----------------------------------------------------------------------------------------------------------
def _array_patches(n: int = 30) -> ArrayPatches:
    rng = np.random.default_rng(0)
    return ArrayPatches(
        rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
        mpp=0.5,
        centers=rng.uniform(100, 900, (n, 2)),
        patch_size_src=32.0,
    )


def test_case10_to_h5_onto_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    import hopt_st._atomic as atomic

    path = tmp_path / "p.h5"
    free = type("usage", (), {"free": 1000})
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _: free)
    with pytest.raises(OSError, match="not enough disk space") as e:
        _array_patches().to_h5(path)
    assert e.value.errno == errno.ENOSPC and str(path) in str(e.value)
    monkeypatch.undo()
    assert not list(tmp_path.iterdir())
    # the disk fills up during the write: no partial file, an existing file untouched
    _array_patches(5).to_h5(path)
    before = path.read_bytes()

    class Failing(ArrayPatches):
        def _read(self, idx):
            raise OSError(errno.ENOSPC, "No space left on device")

    failing = Failing(_array_patches().array, mpp=0.5, centers=np.zeros((30, 2)), patch_size_src=32.0)
    with pytest.raises(OSError, match="No space left") as e:
        failing.to_h5(path, overwrite=True)
    assert str(path) in str(e.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["p.h5"]


def test_case10_to_h5_on_a_full_tmpfs_raises_without_crashing(full_tmpfs):
    code, msg = full_tmpfs["h5_checked"]
    assert code == errno.ENOSPC and "p.h5" in msg and "MiB free" in msg
    code, msg = full_tmpfs["h5_unchecked"]  # HDF5 itself hit the full disk: the child survived (no segfault)
    assert code == errno.ENOSPC and "p.h5" in msg
    assert full_tmpfs["h5_checked_left"] == full_tmpfs["h5_unchecked_left"] == ["s.zarr"]


def test_case11_implausible_pixel_size_is_refused_before_allocating(tmp_path, capsys):
    import tracemalloc

    sdata = _sample(20)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"image_mpp=0\.001 .* 112000 px .* 16x") as e:
            hs.pp.patches(sdata, image_mpp=0.001)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "'he'" in str(e.value) and peak < 200 * 2**20  # was: a 35 GiB allocation
    store = _store(tmp_path)
    rc, line = _cli(
        capsys, "-q", "embed", store, "--model", FAST, "--image-mpp", "0.001", "--out", tmp_path / "o.zarr"
    )
    assert rc == 1 and "--image-mpp 0.001" in line and "image_mpp" not in line
    assert not (tmp_path / "o.zarr").exists()


_LOCK_HOLDER = textwrap.dedent(
    """
    import sys, time
    from hopt_st.pp._checkpoint import CheckpointStore
    store = CheckpointStore(sys.argv[1], "fp", 10, 4, {})
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_case12_second_process_on_a_checkpoint_dir_fails_clearly(tmp_path):
    ck = tmp_path / "ck"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    holder = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", _LOCK_HOLDER, str(ck)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=f"in use by process {holder.pid}") as e:
            CheckpointStore(ck, "fp", 10, 4, {}, lock_timeout=0.5)
        assert time.monotonic() - t0 >= 0.5 and str(ck) in str(e.value)
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    with CheckpointStore(ck, "fp", 10, 4, {}, lock_timeout=5):  # released when the holder died
        pass
    # a second user waits for the first to finish
    first = CheckpointStore(ck, "fp", 10, 4, {})
    threading.Timer(0.3, first.close).start()
    with CheckpointStore(ck, "fp", 10, 4, {}, lock_timeout=10):
        pass


# ----------------------------------------------------------------------------------------------------------
# errors that name the file and say what to do
# ----------------------------------------------------------------------------------------------------------
def test_error_truncated_or_garbled_jpeg_wsi(tmp_path):
    import tifffile

    from hopt_st.pp._image_reader import LevelReader

    tif = hs.datasets.write_pyramidal_tiff(tmp_path / "wsi.tif", _tissue(768, 768), mpp=0.5, n_levels=2)
    cut = tmp_path / "cut.tif"
    shutil.copy(tif, cut)
    _truncate(cut, 0.7)
    with pytest.raises(CorruptFileError, match="truncated") as e:
        hs.io._tiff.read_tiff_image(cut)
    assert str(cut) in str(e.value) and "again" in str(e.value)
    # garbled: the first tile's JPEG header overwritten (a single-level file, so opening it reads no pixels of
    # that tile); found when its pixels are read, named with the file
    bad = hs.datasets.write_pyramidal_tiff(tmp_path / "bad.tif", _tissue(768, 768), mpp=0.5, n_levels=1)
    with tifffile.TiffFile(bad) as t:
        offset = t.series[0].levels[0].pages[0].dataoffsets[0]
    with open(bad, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * 64)
    level = image_levels(hs.io._tiff.read_tiff_image(bad))[0]
    with pytest.raises(CorruptFileError, match="corrupt") as e:
        LevelReader(level, name="he").read_windows(np.array([[0, 0]]), (64, 64), np.zeros(3, np.uint8))
    assert str(bad) in str(e.value) and "'he'" in str(e.value)


def test_error_truncated_patch_h5(tmp_path):
    path = tmp_path / "p.h5"
    _array_patches(40).to_h5(path)
    _truncate(path, 0.6)
    for call in (hs.io.read_patches, lambda p: hs.pp.embed(p, FAST, progress=False)):
        with pytest.raises(CorruptFileError, match="truncated or corrupt") as e:
            call(path)
        assert str(path) in str(e.value) and "again" in str(e.value)


def test_error_truncated_safetensors_weights(tmp_path, capsys):
    weights = _vit_weights(tmp_path / "w.safetensors")
    _truncate(weights, 0.5)
    with pytest.raises(CorruptFileError, match="truncated") as e:
        models.create(VIT, weights=weights)
    assert str(weights) in str(e.value)
    rc, line = _cli(
        capsys,
        "-q",
        "embed",
        _store(tmp_path),
        "--model",
        VIT,
        "--weights",
        weights,
        "--out",
        tmp_path / "o.zarr",
    )
    assert rc == 1 and str(weights) in line and "--weights <path>" in line


def test_error_truncated_regressor_file(tmp_path):
    path = tmp_path / "reg.safetensors"
    _fit_regressor().save(path)
    _truncate(path, 0.5)
    with pytest.raises(CorruptFileError, match="truncated or corrupt") as e:
        hs.tl.ExpressionRegressor.load(path)
    assert str(path) in str(e.value) and "save the regressor again" in str(e.value)


def test_error_corrupt_checkpoint_batch_and_manifest(tmp_path):
    ck = tmp_path / "ck"
    p = hs.pp.patches(_sample(30), patch_size=56, target_mpp=2.0)
    hs.pp.embed(p, FAST, checkpoint_dir=ck, batch_size=10, progress=False)
    batch = sorted(ck.glob("emb_*.npz"))[1]
    _truncate(batch, 0.5)
    with pytest.raises(CorruptFileError, match="delete it") as e:
        hs.pp.embed(p, FAST, checkpoint_dir=ck, batch_size=10, progress=False)
    assert str(batch) in str(e.value)
    batch.unlink()  # the fix the message gives: only that batch is recomputed
    hs.pp.embed(p, FAST, checkpoint_dir=ck, batch_size=10, progress=False)
    (ck / "manifest.json").write_text('{"fingerprint": ')
    with pytest.raises(CorruptFileError, match="checkpoint manifest .* corrupt") as e:
        hs.pp.embed(p, FAST, checkpoint_dir=ck, batch_size=10, progress=False)
    assert str(ck / "manifest.json") in str(e.value) and "delete the checkpoint_dir" in str(e.value)


def test_error_corrupt_scalefactors_json(tmp_path):
    outs = _space_ranger(tmp_path)
    sf = outs / "spatial" / "scalefactors_json.json"
    sf.write_text(sf.read_text()[:40])
    with pytest.raises(CorruptFileError, match="not valid JSON") as e:
        hs.io.read_visium(outs)
    assert str(sf) in str(e.value) and "Copy it again" in str(e.value)


def test_error_truncated_counts_h5(tmp_path):
    outs = _space_ranger(tmp_path)
    counts = outs / "filtered_feature_bc_matrix.h5"
    _truncate(counts, 0.6)
    with pytest.raises(CorruptFileError, match="truncated or corrupt") as e:
        hs.io.read_visium(outs)
    assert str(counts) in str(e.value)


def test_error_negative_integer_counts_at_read_time(tmp_path):
    outs = _space_ranger(tmp_path)
    counts = outs / "filtered_feature_bc_matrix.h5"
    with h5py.File(counts, "r+") as f:
        f["matrix/data"][0] = -3
    with pytest.raises(ValueError, match=r"raw counts.*-3") as e:
        hs.io.read_visium(outs)
    assert str(counts) in str(e.value)


def test_error_zero_spots(tmp_path):
    info = hs.datasets.write_hest_layout(
        tmp_path / "hest", layout="hest1k", n_samples=1, n_spots=20, n_genes=10
    )
    sid = info["sample_ids"][0]
    st = Path(info["root"]) / "st" / f"{sid}.h5ad"
    adata = __import__("anndata").read_h5ad(st)
    adata[:0].copy().write_h5ad(st)
    with pytest.raises(ValueError, match="0 spots") as e:
        hs.io.read_hest(info["root"], sid)
    assert str(st) in str(e.value)
    with pytest.raises(ValueError, match="no patches"):
        hs.pp.embed(np.zeros((0, 56, 56, 3), np.uint8), FAST, progress=False)


def test_error_image_dims_order():
    rgb = np.asarray(image_levels(_sample(20).images["he"])[0].data)  # (c, y, x)
    sdata = _sample(20)
    sdata.images["he"] = Image2DModel.parse(rgb, dims=("y", "x", "c"), transformations={"global": Identity()})
    with pytest.raises(ValueError, match=r"look like \(c, y, x\) data labelled \(y, x, c\)"):
        hs.pp.patches(sdata)
    with pytest.raises(ValueError, match="channels-first"):
        hs.pp.embed(np.zeros((2, 3, 56, 56), np.uint8), FAST, progress=False)


def test_error_negative_spot_diameter(tmp_path):
    outs = _space_ranger(tmp_path)
    sf = outs / "spatial" / "scalefactors_json.json"
    data = json.loads(sf.read_text())
    data["spot_diameter_fullres"] = -abs(data["spot_diameter_fullres"])
    sf.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="spot_diameter_fullres = -") as e:
        hs.io.read_visium(outs)
    assert str(sf) in str(e.value)
    info = hs.datasets.write_hest_layout(
        tmp_path / "hest", layout="hest1k", n_samples=1, n_spots=20, n_genes=10
    )
    sid = info["sample_ids"][0]
    meta = Path(info["root"]) / "metadata" / f"{sid}.json"
    data = json.loads(meta.read_text())
    data["spot_diameter"] = -55.0
    meta.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="spot_diameter = -55") as e:
        hs.io.read_hest(info["root"], sid)
    assert str(meta) in str(e.value)


def test_error_patches_too_small_for_an_encoder():
    with pytest.raises(ValueError, match="at least 16 px"):
        hs.pp.embed(np.zeros((2, 8, 8, 3), np.uint8), FAST, progress=False)
    enc = models.create(VIT, pretrained=False)
    with pytest.raises(ValueError, match=r"are 8 px but tiny-vit-safety takes 56 px.*patch_size=56"):
        hs.pp.embed(np.zeros((2, 8, 8, 3), np.uint8), enc, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_error_device_cuda_without_gpu(tmp_path, capsys):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        hs.pp.embed(np.zeros((2, 56, 56, 3), np.uint8), FAST, device="cuda", progress=False)
    rc, line = _cli(capsys, "-q", "embed", _store(tmp_path), "--model", FAST, "--device", "cuda")
    assert rc == 1 and "--device 'cuda'" in line and "device=" not in line


def test_error_network_failure_fetching_weights(monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    def offline_network(*args, **kwargs):
        try:
            raise ConnectionError("Failed to resolve 'huggingface.co'")
        except ConnectionError as e:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache") from e

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_network)
    monkeypatch.setattr(
        "hopt_st.models._weights._hub_unreachable", lambda: None
    )  # the probe passes, the download fails
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(models.WeightsUnavailableError, match="could not be reached") as e:
        models.create("uni")
    assert "network failure" in str(e.value) and "HF_HUB_OFFLINE=1" in str(e.value)
