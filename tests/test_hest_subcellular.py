"""Xenium samples of HEST-1k in HEST's own layout: written from the synthetic sample with truth at cells, read back
with cells as polygons and counts pooled from the aligned transcripts by position in µm."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import hopt_st as hs

PAD_PX, MPP = 40, 0.5  # write_hest_xenium's default margin on the H&E, and the H&E's µm/px


@pytest.fixture(scope="module")
def sample():
    return hs.datasets.synthetic_visium_hd(width_um=320, height_um=256, seed=1, n_genes=12)


@pytest.fixture(scope="module")
def hest_root(sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("hest")
    hs.datasets.write_hest_xenium(sample, root, "SYNXC001", seed=3)
    return root


@pytest.fixture(scope="module")
def read(hest_root):
    return hs.io.read_hest_xenium(hest_root, "SYNXC001")


def _copy(hest_root, tmp_path):
    dst = tmp_path / "hest"
    shutil.copytree(hest_root, dst)
    return dst


def test_write_hest_xenium_layout(sample, hest_root):
    """HEST's files and columns; the pseudo-spots in st/ are read by read_hest; no silent overwrite."""
    import geopandas as gpd

    names = sorted(str(p.relative_to(hest_root)) for p in hest_root.rglob("*") if p.is_file())
    assert names == [
        "metadata/SYNXC001.json",
        "st/SYNXC001.h5ad",
        "transcripts/SYNXC001_transcripts.parquet",
        "wsis/SYNXC001.tif",
        "xenium_seg/SYNXC001_xenium_cell_seg.parquet",
        "xenium_seg/SYNXC001_xenium_nucleus_seg.parquet",
    ]
    tx = pd.read_parquet(hest_root / "transcripts/SYNXC001_transcripts.parquet")
    assert {"feature_name", "cell_id", "x_location", "y_location", "he_x", "he_y", "dapi_x", "dapi_y"} <= set(
        tx
    )
    # he px = (µm + pad in µm) / (µm/px): the H&E is padded on the left and top
    np.testing.assert_allclose(tx["he_x"], tx["x_location"] / MPP + PAD_PX, atol=1e-3)
    np.testing.assert_allclose(tx["he_y"], tx["y_location"] / MPP + PAD_PX, atol=1e-3)
    seg = gpd.read_parquet(hest_root / "xenium_seg/SYNXC001_xenium_cell_seg.parquet")
    assert list(seg.index) == list(hs.datasets.cell_truth(sample).index)
    meta = json.loads((hest_root / "metadata/SYNXC001.json").read_text())
    assert meta["st_technology"] == "Xenium" and meta["pixel_size_um_estimated"] == pytest.approx(MPP)
    assert meta["pixel_size"] == pytest.approx(0.2125)
    spots = hs.io.read_hest(hest_root, "SYNXC001")
    assert int(spots.tables["table"].X.sum()) == len(tx)  # every transcript in one 100 µm pseudo-spot
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hs.datasets.write_hest_xenium(sample, hest_root, "SYNXC001")


def test_read_hest_xenium_counts_are_the_transcripts_per_cell(sample, hest_root, read):
    t = read.tables["table"]
    assert t.uns["spatialdata_attrs"]["region"] == "cell_boundaries"
    assert t.uns["hopt_st"]["image_mpp"] == {"he": MPP}
    assert t.uns["hopt_st"]["metadata"]["transcripts_outside_cells"] == 0
    assert t.uns["hopt_st"]["metadata"]["transcripts_um_per_px"] == pytest.approx(MPP)
    assert list(t.obs_names) == list(hs.datasets.cell_truth(sample).index)
    tx = pd.read_parquet(hest_root / "transcripts/SYNXC001_transcripts.parquet")
    expected = pd.crosstab(tx["cell_id"], tx["feature_name"]).reindex(
        index=t.obs_names, columns=t.var_names, fill_value=0
    )
    np.testing.assert_array_equal(t.X.toarray(), expected.to_numpy())
    assert (t.obs["transcript_counts"].to_numpy() == expected.sum(1).to_numpy()).all()


def test_read_hest_xenium_positions_in_micrometers(sample, read):
    """Cell centroids and areas in "micrometers" are the truth's (shifted by the H&E's 20 µm margin): an x/y swap
    (320 x 256 µm area) or a wrong scale would move them."""
    import shapely
    from spatialdata import get_extent
    from spatialdata.transformations import get_transformation

    from hopt_st.datasets._xenium import xenium_cells

    truth = xenium_cells(sample)
    cells = read.shapes["cell_boundaries"]
    m = get_transformation(cells, "micrometers").to_affine_matrix(("x", "y"), ("x", "y"))
    c = shapely.centroid(cells.geometry.to_numpy())
    cx, cy = m[0, 0] * shapely.get_x(c) + m[0, 2], m[1, 1] * shapely.get_y(c) + m[1, 2]
    np.testing.assert_allclose(cx, truth.loc[cells.index, "x_centroid"] + PAD_PX * MPP, atol=1e-3)
    np.testing.assert_allclose(cy, truth.loc[cells.index, "y_centroid"] + PAD_PX * MPP, atol=1e-3)
    t = read.tables["table"]
    np.testing.assert_allclose(t.obs["cell_area"], truth.loc[t.obs_names, "cell_area"], rtol=1e-4)
    ext = get_extent(read.images["he"], coordinate_system="micrometers")
    assert ext["x"] == pytest.approx((0, 320 + PAD_PX * MPP)) and ext["y"] == pytest.approx(
        (0, 256 + PAD_PX * MPP)
    )


def test_pooling_is_by_position_not_by_cell_id(hest_root, read, tmp_path):
    """The cell ids written in the transcripts play no part: with them scrambled the counts are the same; with
    the transcripts moved 10 µm to the right they are not."""
    root = _copy(hest_root, tmp_path)
    f = root / "transcripts/SYNXC001_transcripts.parquet"
    tx = pd.read_parquet(f)
    tx["cell_id"] = tx["cell_id"].sample(frac=1.0, random_state=0).to_numpy()
    tx.to_parquet(f, index=False)
    scrambled = hs.io.read_hest_xenium(root, "SYNXC001", transcripts=False).tables["table"]
    np.testing.assert_array_equal(scrambled.X.toarray(), read.tables["table"].X.toarray())
    tx["he_x"] += 10 / MPP
    tx["x_location"] += 10
    tx.to_parquet(f, index=False)
    moved = hs.io.read_hest_xenium(root, "SYNXC001", transcripts=False).tables["table"]
    assert (moved.X.toarray() != read.tables["table"].X.toarray()).any(axis=1).mean() > 0.5


def test_low_quality_and_control_transcripts_not_counted(hest_root, read, tmp_path):
    """Transcripts of qv < 20 and control probes are left out (and said); min_qv=None / controls=True keep them."""
    root = _copy(hest_root, tmp_path)
    f = root / "transcripts/SYNXC001_transcripts.parquet"
    tx = pd.read_parquet(f)
    low = np.zeros(len(tx), bool)
    low[::7] = True
    ctrl = np.zeros(len(tx), bool)
    ctrl[3::11] = True
    ctrl &= ~low
    tx.loc[low, "qv"] = np.float32(12.0)
    tx["feature_name"] = tx["feature_name"].astype(object)
    tx.loc[ctrl, "feature_name"] = "NegControlProbe_00042"
    tx.to_parquet(f, index=False)
    kept = tx[~low & ~ctrl]
    t = hs.io.read_hest_xenium(root, "SYNXC001", transcripts=False).tables["table"]
    assert "NegControlProbe_00042" not in t.var_names
    expected = pd.crosstab(kept["cell_id"], kept["feature_name"]).reindex(
        index=t.obs_names, columns=t.var_names, fill_value=0
    )
    np.testing.assert_array_equal(t.X.toarray(), expected.to_numpy())
    meta = t.uns["hopt_st"]["metadata"]
    assert meta["transcripts_below_min_qv"] == low.sum()
    assert meta["transcripts_not_counted"] == low.sum() + ctrl.sum()
    everything = hs.io.read_hest_xenium(root, "SYNXC001", min_qv=None, controls=True, transcripts=False)
    assert everything.tables["table"].X.sum() == len(tx)
    assert "NegControlProbe_00042" in everything.tables["table"].var_names


def test_token_features_of_hest_xenium_cells_separate_states(sample, read):
    from hopt_st.datasets._xenium import xenium_cells

    hs.pp.embed_tokens(read, "handcrafted", image_key="he", key_added="tok", progress=False)
    hs.pp.token_features(read, "tok", table_name="table")
    t = read.tables["table"]
    X = t.obsm["X_tok"]
    assert X.shape == (t.n_obs, 22) and np.isfinite(X).all()
    state = xenium_cells(sample).loc[t.obs_names, "state"].to_numpy()
    centroids = np.stack([X[state == k].mean(0) for k in np.unique(state)])
    nearest = np.argmin(((X[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (np.unique(state)[nearest] == state).mean() > 0.7


def test_read_hest_xenium_errors(hest_root, tmp_path):
    root = _copy(hest_root, tmp_path)
    meta_file = root / "metadata/SYNXC001.json"
    meta = json.loads(meta_file.read_text())
    # µm/px missing from the metadata: named, with the fix; image_mpp= then reads it
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if not k.startswith("pixel_size_um")}))
    with pytest.raises(ValueError, match=r"SYNXC001\.json.*pixel_size_um_estimated.*image_mpp=.*give 0\.5\b"):
        hs.io.read_hest_xenium(root, "SYNXC001")
    assert hs.io.read_hest_xenium(root, "SYNXC001", image_mpp=MPP).tables["table"].X.sum() > 0
    # a µm/px that the transcripts' own µm contradict is refused, not pooled at a wrong scale
    with pytest.raises(ValueError, match=r"disagrees.*image_mpp=0\.5"):
        hs.io.read_hest_xenium(root, "SYNXC001", image_mpp=0.25)
    # not a Xenium sample
    meta_file.write_text(json.dumps(meta | {"st_technology": "Visium"}))
    with pytest.raises(ValueError, match="read_hest"):
        hs.io.read_hest_xenium(root, "SYNXC001")
    meta_file.write_text(json.dumps(meta))
    # aligned transcripts missing: the file is named, with where to get it
    (root / "transcripts/SYNXC001_transcripts.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"SYNXC001_transcripts\.parquet.*download"):
        hs.io.read_hest_xenium(root, "SYNXC001")
    with pytest.raises(KeyError, match="SYNXC001"):
        hs.io.read_hest_xenium(root, "NOPE")


def test_hest_visium_hd_pseudo_spots(sample, tmp_path):
    """HEST-1k's Visium HD samples hold 128 µm squares pooled from the 16 µm bins: written, then read by
    read_hest; each square's counts are the 2 µm bins inside it, its centre in µm is the square's."""
    paths = hs.datasets.write_hest_visium_hd(sample, tmp_path, "SYNHD001")
    assert json.loads(paths["metadata"].read_text())["st_technology"] == "Visium HD"
    sd = hs.io.read_hest(tmp_path, "SYNHD001")
    t = sd.tables["table"]
    bins = sample.tables["square_002um"]
    r, c = (
        bins.obs["array_row"].to_numpy() // 64,
        bins.obs["array_col"].to_numpy() // 64,
    )  # 64 x 2 µm = 128 µm
    assert t.n_obs == 2 * 3  # 256 x 320 µm: 2 rows, 3 columns (the last one partly covered)
    for name, (row, col) in zip(t.obs_names, t.obs[["array_row", "array_col"]].to_numpy()):
        inside = (r == row) & (c == col)
        np.testing.assert_allclose(t[name].X.toarray().ravel(), np.asarray(bins.X[inside].sum(0)).ravel())
    um = np.asarray(t.obsm["spatial"]) * MPP
    np.testing.assert_allclose(um, (t.obs[["array_col", "array_row"]].to_numpy() + 0.5) * 128)
    # the squares drawn are HEST's 128 µm pooling, not Xenium's 100 µm pseudo-spots
    sides = sd.shapes[t.uns["spatialdata_attrs"]["region"]].geometry.bounds
    np.testing.assert_allclose((sides["maxx"] - sides["minx"]) * MPP, 128, rtol=1e-6)
    np.testing.assert_allclose((sides["maxy"] - sides["miny"]) * MPP, 128, rtol=1e-6)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hs.datasets.write_hest_visium_hd(sample, tmp_path, "SYNHD001")
