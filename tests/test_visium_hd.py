"""Visium HD and Xenium: synthetic samples with truth below the spot, written in the real layouts and read back
by spatialdata-io; token maps; bin and cell features; the truth test against the spot-level baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hopt_st as hs


@pytest.fixture(scope="module")
def hd_sample():
    return hs.datasets.synthetic_visium_hd(width_um=320, height_um=256, seed=1, n_genes=12)


@pytest.fixture(scope="module")
def hd_outs(hd_sample, tmp_path_factory):
    return hs.datasets.write_visium_hd_outs(
        hd_sample, tmp_path_factory.mktemp("hd") / "outs", segmentation=True
    )


def test_synthetic_visium_hd_varies_at_cell_scale(hd_sample):
    t = hd_sample.tables["square_002um"]
    assert t.n_obs == 160 * 128
    frac = np.asarray(t.obsm["latent_truth"])
    np.testing.assert_allclose(frac.sum(1), 1, atol=1e-5)
    # most 2 µm bins lie inside one cell (one state), yet neighbouring 8 µm bins differ: cell-scale structure
    assert (frac.max(1) == 1).mean() > 0.7
    t8 = hs.datasets.bin_truth(hd_sample, 8)
    assert t8.shape == (40 * 32, 12)
    g = int(np.flatnonzero(hd_sample.tables["square_002um"].var["state_dependent"])[0])
    grid = t8.to_numpy()[:, g].reshape(32, 40)
    assert np.corrcoef(grid[:, :-1].ravel(), grid[:, 1:].ravel())[0, 1] < 0.8
    # library size of the order of counts_per_bin (the gene model's normaliser is one constant per slide)
    assert 0.5 < t.X.sum() / (20 * t.n_obs) < 3


def test_visium_hd_layout_read_by_spatialdata_io(hd_sample, hd_outs):
    import spatialdata_io

    sd = spatialdata_io.visium_hd(hd_outs, dataset_id="x", load_segmentations_only=False)
    assert set(sd.tables) == {"square_002um", "square_008um", "square_016um", "cell_segmentations"}
    assert sd.tables["square_008um"].n_obs == 40 * 32
    # pooled counts = sum of the 2 µm bins
    np.testing.assert_allclose(sd.tables["square_016um"].X.sum(), hd_sample.tables["square_002um"].X.sum())
    sf = json.loads((hd_outs / "binned_outputs/square_008um/spatial/scalefactors_json.json").read_text())
    assert sf["bin_size_um"] == 8 and sf["microns_per_pixel"] == 0.5


def test_read_visium_hd_adds_micrometers(hd_sample, hd_outs):
    from spatialdata import get_extent

    sd = hs.io.read_visium_hd(hd_outs, bin_size=[8, 16])
    assert set(sd.tables) == {"square_008um", "square_016um", "cell_segmentations"}
    t = sd.tables["square_008um"]
    assert t.uns["hopt_st"]["fullres_mpp"] == 0.5
    assert t.uns["hopt_st"]["metadata"]["bin_size_um"] == 8
    image_key = next(k for k in sd.images if k.endswith("_full_image"))
    assert hs.io.get_image_mpp(sd, image_key, table_name="square_008um") == 0.5
    shapes = t.uns["spatialdata_attrs"]["region"]
    ext = get_extent(sd[shapes], coordinate_system="micrometers")
    assert ext["x"] == pytest.approx((0, 320)) and ext["y"] == pytest.approx((0, 256))
    # the counts of a bin are where the truth puts them (barcodes = Space Ranger's)
    truth = hs.datasets.bin_truth(hd_sample, 8)
    assert list(truth.index) == list(t.obs_names)


def test_read_visium_hd_refuses_a_visium_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="feature_slice"):
        hs.io.read_visium_hd(tmp_path)


# -- token maps ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hd_read(hd_outs):
    sd = hs.io.read_visium_hd(hd_outs, bin_size=[8, 16])
    image_key = next(k for k in sd.images if k.endswith("_full_image"))
    hs.pp.embed_tokens(sd, "handcrafted", image_key=image_key, key_added="tok", progress=False)
    return sd, image_key


def test_token_map_is_seamless_and_in_micrometers(hd_read):
    """Handcrafted tokens are a function of each 14 px square's pixels and the tiles sit on the token grid, so
    where tiles overlap they agree: the blended map must equal the statistics computed on the image directly
    (a seam or an offset between tiles would break the equality)."""
    import torch
    from spatialdata.transformations import get_transformation

    from hopt_st.models import create
    from hopt_st.models._handcrafted import token_stats

    sd, image_key = hd_read
    tok = sd.images["tok"]
    assert tok.dtype == np.float16 and tok.sizes["c"] == 11 + 11
    rec = sd.attrs["hopt_st"]["token_maps"]["tok"]
    assert rec["token_um"] == 7.0 and rec["tile_um"] == 112.0 and rec["model"] == "handcrafted"
    m = get_transformation(tok, "micrometers").to_affine_matrix(("x", "y"), ("x", "y"))
    assert m[0, 0] == 7.0 and (m[0, 2], m[1, 2]) == (-56.0, -56.0)
    # direct statistics over a 224 x 224 px window of the image (whole tokens), projected with the map's PCA
    img = np.asarray(sd.images[image_key]["scale0"].image.data).transpose(1, 2, 0)[:224, 140:364]
    enc = create("handcrafted")
    stats = token_stats(torch.from_numpy(np.ascontiguousarray(img))[None], enc.backbone.stain_inv)[0].numpy()
    proj = rec["projection"]
    direct = (stats - np.asarray(proj["mean_t"])) @ np.asarray(proj["comp_t"]).T
    mapped = np.asarray(tok.data[:11]).transpose(1, 2, 0).astype(np.float32)[8 : 8 + 16, 18 : 18 + 16]
    np.testing.assert_allclose(mapped, direct, atol=2e-3 * np.abs(direct).max())
    with pytest.raises(
        ValueError, match="images element 'tok' already exists in the SpatialData: pass overwrite"
    ):
        hs.pp.embed_tokens(sd, "handcrafted", image_key=image_key, key_added="tok", progress=False)
    with pytest.raises(ValueError, match="'square_016um' is taken by the tables element 'square_016um'"):
        hs.pp.embed_tokens(sd, "handcrafted", image_key=image_key, key_added="square_016um", progress=False)


def test_token_map_of_a_vit_and_projection_reuse(hd_outs, tiny_vit_spec):
    """A random-init ViT of H-optimus-1's family gives its own patch-token grid (56 px tiles of patch 14 at
    2 µm/px: 4 x 4 tokens of 28 µm); reusing a projection gives the same map."""
    from hopt_st.models import create

    enc = create(tiny_vit_spec(), pretrained=False)
    sd = hs.io.read_visium_hd(hd_outs, bin_size=16)
    key = next(k for k in sd.images if k.endswith("_full_image"))
    hs.pp.embed_tokens(sd, enc, image_key=key, n_components=8, n_context=4, key_added="vit", progress=False)
    tok = sd.images["vit"]
    assert tok.sizes["c"] == 12
    assert sd.attrs["hopt_st"]["token_maps"]["vit"]["token_um"] == 28.0
    assert np.isfinite(np.asarray(tok.data)).all() and float(np.asarray(tok.data).std()) > 0
    proj = sd.attrs["hopt_st"]["token_maps"]["vit"]["projection"]
    hs.pp.embed_tokens(sd, enc, image_key=key, projection=proj, key_added="vit2", progress=False)
    np.testing.assert_array_equal(np.asarray(sd.images["vit2"].data), np.asarray(tok.data))


def test_read_map_boxes_is_area_weighted():
    from hopt_st.pp._tokens import read_map_boxes

    arr = np.arange(4 * 5, dtype=np.float32).reshape(4, 5, 1)  # value = 5 * row + col, 7 µm tokens, origin 10
    boxes = np.array([[10 + 7, 10, 10 + 14, 10 + 7], [10 + 3.5, 10, 10 + 10.5, 10 + 7], [-50, -50, -40, -40]])
    out = read_map_boxes(arr, 7.0, 10.0, 10.0, boxes)
    assert out[0, 0] == 1.0  # exactly token (0, 1)
    assert out[1, 0] == pytest.approx(0.5)  # half token (0, 0), half token (0, 1)
    assert np.isnan(out[2, 0])  # outside the map


def test_token_features_of_bins(hd_read):
    sd, _ = hd_read
    hs.pp.token_features(sd, "tok", table_name="square_016um")
    t = sd.tables["square_016um"]
    X = t.obsm["X_tok"]
    assert X.shape == (t.n_obs, 22) and np.isfinite(X).all()
    assert t.uns["hopt_st"]["embeddings"]["X_tok"]["token_map"] == "tok"
    with pytest.raises(ValueError, match="already exists"):
        hs.pp.token_features(sd, "tok", table_name="square_016um")
    with pytest.raises(KeyError, match="no token map"):
        hs.pp.token_features(sd, "nope", table_name="square_016um")


def test_subspot_truth(capsys):
    """On the synthetic truth, token-map features beat the 55 µm spot model upsampled to the bins and one 224 px
    patch per bin, at 8 and 16 µm bins (Visium HD layout) and at cells (Xenium layout, post-Xenium H&E through
    its alignment affine); the shuffled controls sit near 0. Weight-free handcrafted tokens (per-14 px
    colour / stain / texture statistics): a tiny random ViT carries too little signal for a known answer."""
    from hopt_st.datasets._subspot_truth import subspot_truth_test

    res = subspot_truth_test(512, 384, n_genes=12, n_eval=120, patch_train=60).set_index("level")
    print(res.round(3).to_string())
    for level, fewer in (("8 µm bins", 20), ("16 µm bins", 5), ("cells", 5)):
        r = res.loc[level]
        assert r["token_map"] > 0.8
        assert r["token_map"] > r["spot_upsampled"] + 0.3
        assert r["token_map"] > r["patch_per_bin"] + 0.3
        assert abs(r["shuffled_labels"]) < 0.25 and abs(r["shuffled_bins"]) < 0.15
        assert r["token_forwards"] * fewer < r["patch_forwards"]  # forwards: one per tile vs one per bin


# -- Xenium ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xenium_dir(hd_sample, tmp_path_factory):
    return hs.datasets.write_xenium_outs(hd_sample, tmp_path_factory.mktemp("xen") / "xenium", he_pad_px=40)


def test_xenium_layout_read_by_spatialdata_io(hd_sample, xenium_dir):
    import spatialdata_io
    from spatialdata.transformations import get_transformation

    # without the raster labels spatialdata-io still points the table at "cell_labels" (and says so)
    with pytest.warns(UserWarning, match="annotating 'cell_labels'"):
        sd = spatialdata_io.xenium(xenium_dir, cells_labels=False, nucleus_labels=False)
    t = sd.tables["table"]
    truth = hs.datasets.cell_truth(hd_sample)
    assert list(t.obs_names) == list(truth.index)
    assert len(sd.shapes["cell_boundaries"]) == t.n_obs
    assert int(sd.points["transcripts"].compute().shape[0]) == int(t.X.sum())
    # the post-Xenium H&E and its alignment: H&E px -> morphology px (0.5 / 0.2125, shifted by the 40 px pad)
    m = get_transformation(sd.images["he_image"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(m[0, 0], 0.5 / 0.2125)
    np.testing.assert_allclose(m[0, 2], -40 * 0.5 / 0.2125)


def test_read_xenium_micrometers_and_cell_features(hd_sample, xenium_dir):
    from spatialdata import get_extent

    sd = hs.io.read_xenium(xenium_dir)
    t = sd.tables["table"]
    assert t.uns["spatialdata_attrs"]["region"] == "cell_boundaries"
    assert t.uns["hopt_st"]["image_mpp"]["he_image"] == pytest.approx(0.5)
    ext = get_extent(sd.images["he_image"], coordinate_system="micrometers")
    assert ext["x"] == pytest.approx((-20, 320)) and ext["y"] == pytest.approx((-20, 256))
    cells = get_extent(sd.shapes["cell_boundaries"], coordinate_system="micrometers")
    assert cells["x"][0] >= 0 and cells["x"][1] <= 320
    hs.pp.embed_tokens(sd, "handcrafted", image_key="he_image", key_added="tok", progress=False)
    hs.pp.token_features(sd, "tok")  # polygons: read by points inside each cell
    X = t.obsm["X_tok"]
    assert X.shape == (t.n_obs, 22) and np.isfinite(X).all()
    # a cell's features describe the cell: cells of the same state are closer to each other than to others
    state = hs.datasets._xenium.xenium_cells(hd_sample).loc[t.obs_names, "state"].to_numpy()
    centroids = np.stack([X[state == k].mean(0) for k in np.unique(state)])
    nearest = np.argmin(((X[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (np.unique(state)[nearest] == state).mean() > 0.7


def test_aggregate_transcripts_and_bins_by_position(hd_outs, xenium_dir):
    """Pooling at N µm by physical position: Xenium transcripts counted per 40 µm square equal a histogram of
    their µm coordinates; 2 µm Visium HD bins summed into 16 µm squares equal Space Ranger's 16 µm bins."""
    sd = hs.io.read_xenium(xenium_dir)
    hs.pp.aggregate_squares(sd, 40, points_key="transcripts")
    t = sd.tables["square_040um"]
    tx = sd.points["transcripts"].compute()
    gene = str(t.var_names[3])
    sel = tx[tx["feature_name"] == gene]
    hist, _, _ = np.histogram2d(sel["y"], sel["x"], bins=[np.arange(0, 281, 40), np.arange(0, 361, 40)])
    got = np.zeros_like(hist)
    got[t.obs["array_row"], t.obs["array_col"]] = t[:, gene].X.toarray().ravel()
    np.testing.assert_array_equal(got, hist)
    assert t.X.sum() == len(tx)
    with pytest.raises(ValueError, match="tables element 'square_040um' already exists in the SpatialData"):
        hs.pp.aggregate_squares(sd, 40, points_key="transcripts")

    hd = hs.io.read_visium_hd(hd_outs, bin_size=[2, 16])
    hs.pp.aggregate_squares(hd, 16, table_name="square_002um", key_added="pooled16")
    mine, sr = hd.tables["pooled16"], hd.tables["square_016um"]
    a = mine.to_df().set_index(mine.obs["array_row"].astype(str) + "_" + mine.obs["array_col"].astype(str))
    b = sr.to_df().set_index(sr.obs["array_row"].astype(str) + "_" + sr.obs["array_col"].astype(str))
    np.testing.assert_array_equal(a.loc[b.index].to_numpy(), b.to_numpy())


# -- CLI -------------------------------------------------------------------------------------------------------


def test_cli_embed_bins_cells_and_predict_bins(
    hd_sample, hd_outs, xenium_dir, tmp_path, cli_process_state, capsys
):
    """`hopt-st embed OUTS --bins 8um`, `embed XENIUM --cells`, then `predict SLIDE.tif --bins 8um` with a
    regressor fit on the bins: a raster of predicted genes at 8 µm over an H&E-only slide."""
    import spatialdata as sd

    from hopt_st._cli import main

    assert (
        main(
            [
                "-q",
                "embed",
                str(hd_outs),
                "--bins",
                "8um",
                "--model",
                "handcrafted",
                "--out",
                str(tmp_path / "hd.zarr"),
            ]
        )
        == 0
    )
    hd = sd.read_zarr(tmp_path / "hd.zarr")
    t = hd.tables["square_008um"]
    assert t.obsm["X_tokens_handcrafted"].shape == (t.n_obs, 22)
    assert hd.images["tokens_handcrafted"].dtype == np.float16
    assert (
        main(
            [
                "-q",
                "embed",
                str(xenium_dir),
                "--cells",
                "--model",
                "handcrafted",
                "--out",
                str(tmp_path / "x.zarr"),
            ]
        )
        == 0
    )
    assert "X_tokens_handcrafted" in sd.read_zarr(tmp_path / "x.zarr").tables["table"].obsm

    reg = hs.tl.fit_expression(t, use_rep="X_tokens_handcrafted", n_top_genes=4)
    reg.save(tmp_path / "ridge_bins")
    slide = hs.datasets.synthetic_visium_hd(width_um=160, height_um=128, seed=5, n_genes=12)
    he = np.asarray(slide.images["he"].transpose("y", "x", "c").data)
    hs.datasets.write_pyramidal_tiff(tmp_path / "slide.tif", np.ascontiguousarray(he), mpp=0.5)
    reg_file = next(tmp_path.glob("ridge_bins*"))
    args = [
        "predict",
        str(tmp_path / "slide.tif"),
        "--bins",
        "8um",
        "--tokens-from",
        str(tmp_path / "hd.zarr"),
    ]
    args += ["--regressor", str(reg_file), "--model", "handcrafted", "--out", str(tmp_path / "pred.zarr")]
    assert main(args) == 0
    assert "predicted_008um" in capsys.readouterr().out
    ras = sd.read_zarr(tmp_path / "pred.zarr").images["predicted_008um"]
    assert ras.sizes["c"] == 4 and np.isfinite(np.asarray(ras.data)).mean() > 0.5
    assert main(args) != 0  # --out exists: refused without --overwrite


def test_token_map_resumes_from_its_checkpoint(hd_sample, tmp_path):
    """With checkpoint_dir, a rerun recomputes nothing that was finished (the encoder is not called) and gives
    the same map; another image is refused."""
    from hopt_st.models import create

    enc = create("handcrafted")
    sd = hs.datasets.synthetic_visium_hd(width_um=160, height_um=128, seed=3, n_genes=12)
    hs.pp.embed_tokens(sd, enc, key_added="a", checkpoint_dir=tmp_path / "ck", progress=False)
    assert (tmp_path / "ck" / "projection.npz").is_file()

    def boom(x):
        raise AssertionError("the encoder ran although every tile was checkpointed")

    enc.tokens = boom
    hs.pp.embed_tokens(sd, enc, key_added="b", checkpoint_dir=tmp_path / "ck", progress=False)
    np.testing.assert_array_equal(np.asarray(sd.images["a"].data), np.asarray(sd.images["b"].data))
    other = hs.datasets.synthetic_visium_hd(width_um=160, height_um=128, seed=4, n_genes=12)
    with pytest.raises(ValueError, match="another run"):
        hs.pp.embed_tokens(
            other, create("handcrafted"), key_added="a", checkpoint_dir=tmp_path / "ck", progress=False
        )


def test_predict_raster_refuses_a_map_of_another_projection(hd_read):
    """A regressor fit on features of one token map is refused on a map reduced by another PCA (the numbers
    would have no meaning); the same projection is accepted."""
    sd, image_key = hd_read
    t = sd.tables["square_016um"]
    hs.pp.token_features(sd, "tok", table_name="square_016um", key_added="X_prov")
    reg = hs.tl.fit_expression(t, use_rep="X_prov", n_top_genes=3)
    slide = hs.datasets.synthetic_visium_hd(width_um=96, height_um=96, seed=8, n_genes=12)
    hs.pp.embed_tokens(slide, "handcrafted", key_added="own", progress=False)  # its own PCA
    with pytest.raises(ValueError, match="projection_sha256"):
        hs.tl.predict_raster(slide, reg, "own")
    proj = sd.attrs["hopt_st"]["token_maps"]["tok"]["projection"]
    hs.pp.embed_tokens(slide, "handcrafted", key_added="same", projection=proj, progress=False)
    hs.tl.predict_raster(slide, reg, "same")
    with pytest.raises(
        ValueError, match="images element 'predicted_raster' already exists in the SpatialData"
    ):
        hs.tl.predict_raster(slide, reg, "same")


def test_read_visium_hd_space_ranger_4_cells(hd_sample, hd_outs):
    """Space Ranger 4's segmented outputs: spatialdata-io's cell table and polygons, placed in micrometres by
    read_visium_hd; each cell sums the 2 µm bins it holds; token-map features read over the polygons."""
    from spatialdata import get_extent

    sd = hs.io.read_visium_hd(hd_outs, bin_size=2)
    cells = sd.tables["cell_segmentations"]
    shapes_key = cells.uns["spatialdata_attrs"]["region"]
    ext = get_extent(sd.shapes[shapes_key], coordinate_system="micrometers")
    assert ext["x"] == pytest.approx((0, 320), abs=1e-6) and ext["y"] == pytest.approx((0, 256), abs=1e-6)
    truth_cells = hs.datasets._xenium.xenium_cells(hd_sample)
    assert cells.n_obs == len(truth_cells)
    # the 2 µm bins whose centre lies in the first cell's polygon carry exactly its counts
    import shapely

    t2 = sd.tables["square_002um"]
    xy = np.asarray(t2.obsm["spatial"]) * 0.5
    inside = shapely.contains_xy(truth_cells["polygon"].iloc[0], xy[:, 0], xy[:, 1])
    np.testing.assert_array_equal(np.asarray(t2.X[inside].sum(0)).ravel(), cells.X[0].toarray().ravel())
    key = next(k for k in sd.images if k.endswith("_full_image"))
    hs.pp.embed_tokens(sd, "handcrafted", image_key=key, key_added="tok", progress=False)
    hs.pp.token_features(sd, "tok", table_name="cell_segmentations")
    assert np.isfinite(cells.obsm["X_tok"]).all()


def test_outs_writers_refuse_an_existing_folder_unless_overwrite(hd_sample, tmp_path):
    """write_visium_hd_outs and write_xenium_outs refuse an existing folder (naming it and overwrite=True)
    and a missing parent before any work; with overwrite=True the old folder is replaced whole."""
    for write, name in [
        (lambda p, **kw: hs.datasets.write_visium_hd_outs(hd_sample, p, bin_sizes=(8,), **kw), "Visium HD"),
        (lambda p, **kw: hs.datasets.write_xenium_outs(hd_sample, p, **kw), "Xenium"),
    ]:
        out = tmp_path / name.replace(" ", "_")
        out.mkdir()
        (out / "stray.txt").write_text("mine")
        with pytest.raises(
            FileExistsError, match=rf"{name} .*{out.name}'? already exists: pass overwrite=True"
        ):
            write(out)
        assert sorted(p.name for p in out.iterdir()) == ["stray.txt"]  # untouched
        with pytest.raises(FileNotFoundError, match="does not exist"):
            write(tmp_path / "no_such_parent" / "out")
        assert write(out, overwrite=True) == out
        names = {p.name for p in out.iterdir()}
        assert "stray.txt" not in names and names & {"feature_slice.h5", "experiment.xenium"}
