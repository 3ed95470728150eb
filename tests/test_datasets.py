"""synthetic_visium and write_hest_layout: shape of the data, determinism, and the known answer."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from spatialdata.models import get_table_keys

from hopt_st.datasets import synthetic_visium, write_pyramidal_tiff, write_spaceranger_outs
from hopt_st.io._elements import get_spot_table, spot_centers


def _level0(img) -> np.ndarray:
    da = img["scale0"]["image"] if hasattr(img, "children") and len(img.children) else img
    return da


def _spot_mean_colour(image: np.ndarray, xy: np.ndarray, radius: float) -> np.ndarray:
    """Mean RGB of the pixels inside each spot's disc; NaN rows where the disc leaves the image."""
    _, h, w = image.shape
    r = int(np.ceil(radius))
    off = np.arange(-r, r + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    disc = ox**2 + oy**2 <= radius**2
    out = np.full((len(xy), 3), np.nan)
    for i, (x, y) in enumerate(np.rint(xy).astype(int)):
        if x - r < 0 or y - r < 0 or x + r >= w or y + r >= h:
            continue
        win = image[:, y - r : y + r + 1, x - r : x + r + 1]
        out[i] = win[:, disc].mean(axis=1)
    return out


def _r2(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """In-sample R² of a least-squares fit of each target column on [1, features]."""
    a = np.column_stack([np.ones(len(features)), features])
    coef, *_ = np.linalg.lstsq(a, targets, rcond=None)
    resid = targets - a @ coef
    return 1 - resid.var(axis=0) / targets.var(axis=0)


def test_synthetic_visium_elements(synthetic_sdata):
    sd = synthetic_sdata
    assert set(sd.images) == {"he"} and set(sd.shapes) == {"spots"} and set(sd.tables) == {"table"}
    img = _level0(sd.images["he"])
    assert img.dims == ("c", "y", "x") and img.dtype == np.uint8 and img.shape[0] == 3
    assert hasattr(img.data, "dask")
    h, w = img.shape[1:]
    assert w > 1.3 * h  # non-square slide

    table, shapes_key = get_spot_table(sd)
    assert shapes_key == "spots"
    region, region_key, instance_key = get_table_keys(table)
    assert (region, region_key, instance_key) == ("spots", "region", "spot_id")
    assert table.n_obs == 150 and table.n_vars == 60
    # raw integer counts, with real depth
    assert sparse.issparse(table.X)
    x = table.X.toarray()
    np.testing.assert_array_equal(x, np.round(x))
    assert x.min() >= 0 and x.sum(1).mean() > 500
    # 55 µm circles at 0.5 µm/px -> radius 55 px; 100 µm hexagonal grid -> nearest neighbours 200 px apart
    shapes = sd.shapes["spots"]
    np.testing.assert_allclose(shapes["radius"], 55.0)
    xy = spot_centers(sd)
    np.testing.assert_allclose(xy, table.obsm["spatial"])
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(d.min(axis=1), 200.0, atol=1e-6)
    assert (np.sort(d, axis=1)[:, :6] < 200.5).sum() > 150 * 3  # hexagonal: up to 6 neighbours at 100 µm
    assert (xy[:, 0] > 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
    # pixel-size convention and ground truth
    uns = table.uns["hopt_st"]
    assert uns["image_mpp"] == {"he": 0.5} and uns["fullres_mpp"] == 0.5 and uns["sample_id"] == "synthetic_0"
    lat = table.obsm["latent_truth"]
    assert lat.shape == (150, 4)
    np.testing.assert_allclose(lat.sum(1), 1.0, atol=1e-5)
    assert (lat.max(0) > 0.5).all()  # every state dominates somewhere
    assert table.varm["truth_loadings"].shape == (60, 4)
    assert 0 < table.var["state_dependent"].sum() < 60


def test_synthetic_counts_follow_latent_states(synthetic_sdata):
    table = synthetic_sdata.tables["table"]
    lat = table.obsm["latent_truth"]
    x = table.X.toarray()
    logx = np.log1p(x)
    r2 = _r2(lat[:, 1:], logx)
    dep = table.var["state_dependent"].to_numpy()
    strong = dep & (np.ptp(table.varm["truth_loadings"], axis=1) > 1.5) & (x.mean(0) > 5)
    assert strong.sum() >= 5
    assert np.median(r2[strong]) > 0.6
    assert np.median(r2[~dep]) < 0.1  # noise genes carry no state signal


def test_latent_field_recoverable_from_spot_pixels_not_when_swapped(synthetic_sdata):
    sd = synthetic_sdata
    table = sd.tables["table"]
    img = np.asarray(_level0(sd.images["he"]).data.compute()).astype(np.float64)
    xy = spot_centers(sd)
    lat = table.obsm["latent_truth"].astype(np.float64)
    radius = float(sd.shapes["spots"]["radius"].iloc[0])

    colour = _spot_mean_colour(img, xy, radius)
    assert np.isfinite(colour).all()
    r2 = _r2(colour, lat)
    assert r2.mean() > 0.7, r2

    swapped = _spot_mean_colour(img, xy[:, ::-1], radius)
    ok = np.isfinite(swapped).all(axis=1)
    assert ok.sum() >= 40
    r2_swapped = _r2(swapped[ok], lat[ok])
    assert r2_swapped.mean() < 0.4, r2_swapped
    assert r2_swapped.mean() < r2.mean() - 0.4


def test_synthetic_deterministic_and_seed_dependent():
    a = synthetic_visium(n_spots=30, seed=5, n_genes=20)
    b = synthetic_visium(n_spots=30, seed=5, n_genes=20)
    c = synthetic_visium(n_spots=30, seed=6, n_genes=20)
    ia, ib, ic = (np.asarray(_level0(s.images["he"]).data.compute()) for s in (a, b, c))
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(a.tables["table"].X.toarray(), b.tables["table"].X.toarray())
    assert ia.shape == ic.shape and not np.array_equal(ia, ic)
    assert not np.allclose(a.tables["table"].obsm["latent_truth"], c.tables["table"].obsm["latent_truth"])
    # same biology across seeds: the tissue model depends on model_seed only
    np.testing.assert_array_equal(
        a.tables["table"].varm["truth_loadings"], c.tables["table"].varm["truth_loadings"]
    )


def test_synthetic_image_built_band_by_band_at_bounded_memory(synthetic_sdata, monkeypatch):
    """The image is rendered in bands of rows: the same pixels whatever the band size, and numpy's peak
    allocation stays near the image's own size (the former whole-image rendering peaked at ~30x)."""
    import hashlib
    import tracemalloc

    import hopt_st.datasets._synthetic as synth

    ref = np.asarray(_level0(synthetic_sdata.images["he"]).data.compute())
    # sha256 of this image as rendered in one piece before the band-by-band rewrite (commit 1bb03da)
    assert hashlib.sha256(ref.tobytes()).hexdigest().startswith("433395fba26fd68a")
    monkeypatch.setattr(synth, "_BAND_PIXELS", 1 << 17)  # ~40 rows per band
    monkeypatch.setattr(synth, "_STAMP_ENTRIES", 1 << 14)
    tracemalloc.start()
    try:
        sd = synthetic_visium(n_spots=150, image_mpp=0.5, seed=0, n_genes=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    img = np.asarray(_level0(sd.images["he"]).data.compute())
    np.testing.assert_array_equal(img, ref)
    np.testing.assert_array_equal(sd.tables["table"].X.toarray(), synthetic_sdata.tables["table"].X.toarray())
    assert peak < 2.5 * ref.nbytes, (peak / 2**20, ref.nbytes / 2**20)


def test_synthetic_multiscale_when_large_and_square_spots():
    sd = synthetic_visium(n_spots=45, image_mpp=0.25, seed=1, n_genes=10, technology="Xenium")
    img = sd.images["he"]
    assert list(img.children) == [f"scale{i}" for i in range(len(img.children))] and len(img.children) >= 3
    h0, w0 = img["scale0"]["image"].shape[1:]
    assert max(h0, w0) > 4096
    assert img["scale1"]["image"].shape[1:] == (h0 // 2, w0 // 2)
    # Xenium-like: 100 µm squares -> 400 px sides at 0.25 µm/px
    b = sd.shapes["spots"].geometry.bounds
    np.testing.assert_allclose(b["maxx"] - b["minx"], 400.0)
    np.testing.assert_allclose(b["maxy"] - b["miny"], 400.0)
    assert sd.tables["table"].uns["hopt_st"]["image_mpp"] == {"he": 0.25}


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="n_states"):
        synthetic_visium(n_spots=10, n_states=1)
    with pytest.raises(ValueError, match="technology"):
        synthetic_visium(n_spots=10, technology="slide-seq")
    with pytest.raises(ValueError, match="image_mpp"):
        synthetic_visium(n_spots=10, image_mpp=0)
    with pytest.raises(TypeError, match="n_spots"):
        synthetic_visium(n_spots=10.5)
    with pytest.raises(TypeError, match="image_mpp"):
        synthetic_visium(n_spots=10, image_mpp="0.5")


def test_writers_reject_wrong_types_and_values(tmp_path, synthetic_sdata):
    with pytest.raises(TypeError, match="SpatialData"):
        write_spaceranger_outs(synthetic_sdata.tables["table"], tmp_path / "outs")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        write_spaceranger_outs(synthetic_sdata, tmp_path / "full")
    with pytest.raises(TypeError, match="numpy array"):
        write_pyramidal_tiff(tmp_path / "a.tif", [[0, 0, 0]])
    with pytest.raises(ValueError, match="uint8"):
        write_pyramidal_tiff(tmp_path / "a.tif", np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="multiple of 16"):
        write_pyramidal_tiff(tmp_path / "a.tif", np.zeros((32, 32, 3), np.uint8), tile=100)
    with pytest.raises(ValueError, match="shape= and tile_fn="):
        write_pyramidal_tiff(tmp_path / "a.tif", shape=(32, 32))


def test_write_bench_layout_files(hest_bench_root):
    info = hest_bench_root
    tdir = info["task_dir"]
    ids = info["sample_ids"]
    assert len(ids) == 3
    # patient-level folds: fold i tests patient i, trains on the others
    for i in range(3):
        train = pd.read_csv(f"{tdir}/splits/train_{i}.csv")
        test = pd.read_csv(f"{tdir}/splits/test_{i}.csv")
        assert list(train.columns) == ["sample_id", "patches_path", "expr_path"]
        assert test["sample_id"].tolist() == [ids[i]]
        assert set(train["sample_id"]) == set(ids) - {ids[i]}
        assert test["patches_path"].tolist() == [f"patches/{ids[i]}.h5"]
        assert test["expr_path"].tolist() == [f"adata/{ids[i]}.h5ad"]
    genes = json.loads(Path(f"{tdir}/var_50genes.json").read_text())["genes"]
    assert len(genes) == 50 and genes == info["genes"]
    with h5py.File(f"{tdir}/patches/{ids[0]}.h5") as f:
        assert f["img"].shape[1:] == (224, 224, 3) and f["img"].dtype == np.uint8
        assert f["coords"].shape == (f["img"].shape[0], 2) and np.issubdtype(f["coords"].dtype, np.integer)
        assert f["barcode"].shape == (f["img"].shape[0], 1) and f["barcode"].dtype.kind == "S"


def test_bench_layout_has_a_positive_answer(hest_bench_root):
    """Mean patch colour predicts the 50 genes on a held-out patient: the benchmark has a clear signal."""
    import anndata as ad

    info = hest_bench_root
    tdir, genes = info["task_dir"], info["genes"]

    def load(sid):
        with h5py.File(f"{tdir}/patches/{sid}.h5") as f:
            img = f["img"][:].astype(np.float64)
            bc = [b.decode() for b in f["barcode"][:, 0]]
        feats = np.column_stack([img.mean(axis=(1, 2)), img[:, 56:168, 56:168].mean(axis=(1, 2))])
        a = ad.read_h5ad(f"{tdir}/adata/{sid}.h5ad")[bc, genes]
        x = a.X.toarray()
        return feats, np.log1p(x / x.sum(1, keepdims=True) * 1e4)

    split = info["splits"][0]
    tr = [load(s) for s in split["train"]]
    xtr, ytr = np.concatenate([t[0] for t in tr]), np.concatenate([t[1] for t in tr])
    xte, yte = load(split["test"][0])
    a = np.column_stack([np.ones(len(xtr)), xtr])
    coef, *_ = np.linalg.lstsq(a, ytr, rcond=None)
    pred = np.column_stack([np.ones(len(xte)), xte]) @ coef
    r = [np.corrcoef(pred[:, g], yte[:, g])[0, 1] for g in range(len(genes)) if yte[:, g].std() > 0]
    assert np.mean(r) > 0.3, np.mean(r)


def test_write_hest_layout_bad_arguments(tmp_path):
    from hopt_st.datasets import write_hest_layout

    with pytest.raises(ValueError, match="layout"):
        write_hest_layout(tmp_path, layout="visium")
    with pytest.raises(ValueError, match="n_genes"):
        write_hest_layout(tmp_path, layout="bench", n_genes=20)
    with pytest.raises(ValueError, match="0.5"):
        write_hest_layout(tmp_path, layout="bench", image_mpp=0.25)
