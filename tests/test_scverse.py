"""scverse ways in and out: AnnData (squidpy's Visium reader, an .h5ad + JPEG) and SpatialData through
pp.embed -> tl.fit_expression -> predict_expression -> the predictions table drawn by spatialdata-plot, whose
drawn colours are checked against the predicted values; the "micrometers" coordinate system; the CLI."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import spatialdata_plot  # noqa: F401 - registers the .pl accessor
from matplotlib.collections import PatchCollection
from matplotlib.colors import Normalize
from spatialdata import bounding_box_query, get_extent

import hopt_st as hs
from hopt_st._cli import main
from hopt_st.datasets import synthetic_visium, write_pyramidal_tiff, write_spaceranger_outs
from hopt_st.tl._predictions import MEASURED_LAYER

CROP = Path(__file__).resolve().parents[2] / "shared" / "data" / "visium_crop"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    """A Space Ranger outs/ folder of a synthetic sample plus its full-resolution scan as a pyramidal TIFF."""
    root = tmp_path_factory.mktemp("outs")
    sdata = synthetic_visium(n_spots=100, seed=4, n_genes=30)
    write_spaceranger_outs(sdata, root / "outs")
    image = np.asarray(sdata.images["he"].data.compute()).transpose(1, 2, 0)
    write_pyramidal_tiff(root / "scan.tif", np.ascontiguousarray(image), compression="zlib")
    return root / "outs", root / "scan.tif"


def _spot_colours(ax) -> np.ndarray:
    """RGB face colours of the one spot collection of a panel, in table row order (spatialdata-plot)."""
    colls = [c for c in ax.collections if isinstance(c, PatchCollection)]
    assert len(colls) == 1
    return np.asarray(colls[0].get_facecolors())[:, :3]


def _check_drawn(fig, gene: str, predicted: np.ndarray, measured: np.ndarray) -> None:
    """The predicted panel shows cmap(norm(predicted)), the measured panel cmap(norm(measured)), one norm."""
    ax_m, ax_p = fig.axes[0], fig.axes[1]
    assert ax_p.get_title().startswith(f"{gene}\npredicted, Pearson r = ")
    both = np.concatenate([measured, predicted])
    norm = Normalize(*np.percentile(both, [1, 99]))  # robust=True: shared 1st-99th percentiles
    viridis = plt.get_cmap("viridis")
    np.testing.assert_allclose(_spot_colours(ax_p), viridis(norm(predicted))[:, :3], atol=1e-6)
    np.testing.assert_allclose(_spot_colours(ax_m), viridis(norm(measured))[:, :3], atol=1e-6)
    assert np.abs(_spot_colours(ax_p) - viridis(norm(measured))[:, :3]).max() > 0.1  # not the measured values


def test_squidpy_anndata_with_source_image_equals_the_spatialdata_route(outs, encoder):
    import squidpy as sq

    path, scan = outs
    adata = sq.read.visium(path, source_image_path=scan, library_id="synthetic")
    assert adata.uns["spatial"][next(iter(adata.uns["spatial"]))]["metadata"]["source_image_path"]
    sdata = hs.io.read_visium(path, fullres_image_file=scan)
    # the same spots cut from the same full-resolution scan (level 0: 0.5 µm/px), whichever way the data came in
    full = next(k for k in sdata.images if k.endswith("_full_image"))
    p_ad = hs.pp.patches(adata, patch_size=56, target_mpp=0.5)
    p_sd = hs.pp.patches(sdata, image_key=full, patch_size=56, target_mpp=0.5)
    np.testing.assert_array_equal(p_ad[np.arange(len(p_ad))], p_sd[np.arange(len(p_sd))])
    hs.pp.embed(adata, encoder, target_mpp=0.5, progress=False)
    hs.pp.embed(sdata, encoder, target_mpp=0.5, image_key=full, progress=False)
    np.testing.assert_array_equal(adata.obsm["X_tiny-vit"], sdata["table"].obsm["X_tiny-vit"])
    assert adata.uns["hopt_st"]["embeddings"]["X_tiny-vit"]["mpp"] == 0.5

    reg = hs.tl.fit_expression(adata, use_rep="X_tiny-vit", n_top_genes=5)
    pred = hs.tl.predict_expression(adata, reg, copy=True)
    assert "predicted" not in adata.obsm  # copy=True writes nothing
    gene = reg.genes_[0]
    values = reg.predict(adata.obsm["X_tiny-vit"])[:, 0]
    np.testing.assert_allclose(pred[:, gene].X.ravel(), values, rtol=1e-5)
    measured = np.log1p(adata[:, gene].X.toarray().ravel())
    np.testing.assert_allclose(pred[:, gene].layers[MEASURED_LAYER].ravel(), measured, rtol=1e-6)
    fig = hs.pl.expression(pred, gene, return_fig=True)
    assert len(fig.axes[1].images) == 1  # the hires H&E of uns["spatial"] under the spots
    _check_drawn(fig, gene, pred[:, gene].X.ravel(), measured)
    # squidpy draws the predictions table too, on the H&E of uns["spatial"]
    ax = sq.pl.spatial_scatter(pred, color=gene, return_ax=True)
    drawn = [c for c in ax.collections if c.get_array() is not None]
    np.testing.assert_allclose(np.asarray(drawn[0].get_array()), pred[:, gene].X.ravel(), rtol=1e-6)


@pytest.mark.skipif(not CROP.is_dir(), reason="../shared/data/visium_crop not present")
def test_visium_crop_h5ad_and_jpeg_through_api_and_cli(encoder, weights, tiny_vit_spec, tmp_path, capsys):
    adata = ad.read_h5ad(CROP / "test_data.h5ad")
    # API: one call
    hs.pp.embed(adata, encoder, image=CROP / "test_img.jpg", progress=False)
    assert adata.obsm["X_tiny-vit"].shape == (49, 64)
    assert (adata.obs["patch_fraction_inside"] > 0.9).all()
    # its X is log-normalised, not counts: use the values as they are
    reg = hs.tl.fit_expression(adata, use_rep="X_tiny-vit", n_top_genes=4, target="none")
    pred = hs.tl.predict_expression(adata, reg, copy=True)
    gene = reg.genes_[0]
    measured = adata[:, gene].X.toarray().ravel()
    np.testing.assert_allclose(pred[:, gene].layers[MEASURED_LAYER].ravel(), measured, rtol=1e-6)
    _check_drawn(hs.pl.expression(pred, gene, return_fig=True), gene, pred[:, gene].X.ravel(), measured)
    # CLI: one call, same embeddings
    out = tmp_path / "embedded.h5ad"
    with hs.models.registered(tiny_vit_spec()):
        rc = main(["-q", "embed", str(CROP / "test_data.h5ad"), "--image", str(CROP / "test_img.jpg"),
                   "--model", "tiny-vit", "--weights", str(weights), "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    back = ad.read_h5ad(out)
    assert back.obsm["X_tiny-vit"].shape == (49, 64)
    # the pixel size follows read_visium's rule: 65 µm / spot_diameter_fullres
    sd = hs.io.from_anndata(adata, image=CROP / "test_img.jpg")
    assert sd["table"].uns["hopt_st"]["image_mpp"]["full_image"] == pytest.approx(65 / 89.44, rel=1e-3)


def test_spatialdata_route_predictions_table_and_spatialdata_plot(encoder):
    sdata = synthetic_visium(n_spots=80, seed=2, n_genes=30)
    hs.pp.embed(sdata, encoder, progress=False)
    table = sdata["table"]
    reg = hs.tl.fit_expression(table, use_rep="X_tiny-vit", n_top_genes=5)
    hs.tl.predict_expression(sdata, reg)
    pred = sdata["predicted"]
    assert list(pred.var_names) == reg.genes_ and (pred.obs_names == table.obs_names).all()
    np.testing.assert_array_equal(pred.X, table.obsm["predicted"].to_numpy())  # the obsm copy is kept
    np.testing.assert_allclose(pred.layers[MEASURED_LAYER], hs.tl.target_matrix(table, reg.genes_))
    assert pred.uns["spatialdata_attrs"]["region"] == "spots"
    with pytest.raises(ValueError, match="already exists"):
        hs.tl.predict_expression(sdata, reg)
    gene = reg.genes_[0]
    # spatialdata-plot itself, on the user's SpatialData: with table_name it draws the predictions
    fig, ax = plt.subplots(figsize=(4, 4))
    sdata.pl.render_shapes("spots", color=gene, table_name="predicted").pl.show(
        ax=ax, coordinate_systems="global", show=False
    )
    values = pred[:, gene].X.ravel()
    expected = plt.get_cmap("viridis")(Normalize(values.min(), values.max())(values))[:, :3]
    np.testing.assert_allclose(_spot_colours(ax), expected, atol=1e-6)
    # hs.pl.expression draws the same table, returns None unless asked for the figure
    assert hs.pl.expression(sdata, gene) is None
    _check_drawn(plt.gcf(), gene, values, pred[:, gene].layers[MEASURED_LAYER].ravel())


def test_micrometers_coordinate_system(outs):
    path, _ = outs
    for sdata, mpp in [
        (synthetic_visium(n_spots=60, seed=0, image_mpp=0.5), 0.5),
        (hs.io.read_visium(path), 65 / 130.0),  # the synthetic sample is at 0.5 µm/px: 130 px per 65 µm
    ]:
        px_cs = next(c for c in sdata.coordinate_systems if c != "micrometers" and "downscaled" not in c)
        px, um = (
            get_extent(sdata, coordinate_system=px_cs),
            get_extent(sdata, coordinate_system="micrometers"),
        )
        for ax_name in ("x", "y"):
            np.testing.assert_allclose(np.multiply(px[ax_name], mpp), um[ax_name], rtol=1e-3)
        # a 300 µm square query in µm keeps the spots whose centres lie in it
        shapes_key = next(iter(sdata.shapes))
        sub = bounding_box_query(
            sdata[shapes_key], axes=("x", "y"), min_coordinate=[0, 0], max_coordinate=[300, 300],
            target_coordinate_system="micrometers",
        )  # fmt: skip
        xy = np.column_stack([sdata[shapes_key].geometry.x, sdata[shapes_key].geometry.y]) * mpp
        inside = ((xy >= 0) & (xy <= 300)).all(axis=1)
        assert set(sub.index) >= set(sdata[shapes_key].index[inside]) and len(sub) > 0


def test_hires_only_anndata_says_how_much_patches_are_upsampled(outs, caplog):
    import squidpy as sq

    path, _ = outs
    adata = sq.read.visium(path, library_id="synthetic")
    with caplog.at_level("WARNING", logger="hopt_st"):
        p = hs.pp.patches(adata)
    msg = next(r.getMessage() for r in caplog.records if "upsampled" in r.getMessage())
    hires = adata.uns["spatial"][next(iter(adata.uns["spatial"]))]["scalefactors"]["tissue_hires_scalef"]
    assert f"upsampled {0.5 / hires / 0.5:.2f}x" in msg  # 0.5 µm/px scan shrunk by scalef, back to 0.5
    assert "fullres-image" in msg and "image=" in msg
    assert len(p) == adata.n_obs


def test_embed_forwards_slide_arguments_and_copies(encoder):
    sdata = synthetic_visium(n_spots=40, seed=1, n_genes=20)
    adata = sdata["table"]
    # copy=True leaves the input alone and returns the embedded copy
    out = hs.pp.embed(sdata, encoder, progress=False, copy=True)
    assert "X_tiny-vit" not in adata.obsm and out["table"].obsm["X_tiny-vit"].shape == (40, 64)
    assert out.images["he"] is sdata.images["he"]  # images shared, tables copied
    # a spot moved off the image: outside="drop" leaves a NaN row, "raise" refuses
    moved = hs.pp.embed(sdata, encoder, progress=False, copy=True, image_mpp=0.5, target_mpp=4.0)
    assert moved["table"].uns["hopt_st"]["embeddings"]["X_tiny-vit"]["mpp"] == 4.0
    geoms = sdata.shapes["spots"]
    far = geoms.copy()
    far.loc[far.index[0], "geometry"] = type(far.geometry.iloc[0])(1e6, 1e6)
    sdata.shapes["spots"] = far
    with pytest.raises(ValueError, match="entirely outside"):
        hs.pp.embed(sdata, encoder, progress=False, copy=True)
    dropped = hs.pp.embed(sdata, encoder, progress=False, copy=True, outside="drop")["table"].obsm[
        "X_tiny-vit"
    ]
    assert np.isnan(dropped[0]).all() and np.isfinite(dropped[1:]).all()
    with pytest.raises(TypeError, match="copy=True applies"):
        hs.pp.embed(np.zeros((2, 56, 56, 3), np.uint8), encoder, copy=True, progress=False)
    with pytest.raises(ValueError, match="image= and library_id= apply to an AnnData"):
        hs.pp.patches(sdata, image="x.tif")


def test_cli_space_ranger_folder_with_fullres_image(outs, weights, tiny_vit_spec, tmp_path, capsys):
    path, scan = outs
    with hs.models.registered(tiny_vit_spec()):
        rc = main(["-q", "embed", str(path), "--fullres-image", str(scan), "--model", "tiny-vit",
                   "--weights", str(weights), "--out", str(tmp_path / "s.zarr")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    import spatialdata as sd

    back = sd.read_zarr(tmp_path / "s.zarr")
    emb = back["table"].uns["hopt_st"]["embeddings"]["X_tiny-vit"]
    assert emb["mpp"] == 2.0 and any(k.endswith("_full_image") for k in back.images)
    rc = main(["embed", str(path), "--image", str(scan), "--sample", "x", "--model", "tiny-vit"])
    assert rc != 0 and "--fullres-image/--image applies to" in capsys.readouterr().err


MINI = CROP.parent / "visium_mini"


@pytest.mark.skipif(not MINI.is_dir(), reason="../shared/data/visium_mini not present")
def test_from_anndata_leaves_out_blank_placeholders_and_records_pixel_sizes():
    import squidpy as sq

    adata = sq.read.visium(MINI)  # its hires PNG is a fully transparent placeholder (README of shared/data)
    sdata = hs.io.from_anndata(adata)
    assert list(sdata.images) == ["lowres_image"]
    sf = adata.uns["spatial"]["custom"]["scalefactors"]
    mpp = sdata["table"].uns["hopt_st"]
    assert mpp["fullres_mpp"] == pytest.approx(65 / sf["spot_diameter_fullres"])
    assert mpp["image_mpp"]["lowres_image"] == pytest.approx(mpp["fullres_mpp"] / sf["tissue_lowres_scalef"])
    # spots land on the lowres image through its scale factor; the table is a copy annotating them
    np.testing.assert_allclose(hs.io.get_image_mpp(sdata), mpp["image_mpp"]["lowres_image"])
    assert sdata["table"] is not adata and sdata["table"].n_vars == adata.n_vars
    with pytest.raises(ValueError, match="image_mpp="):
        bare = adata.copy()
        del bare.uns["spatial"]["custom"]["scalefactors"]["spot_diameter_fullres"]
        hs.io.from_anndata(bare)
    with pytest.raises(KeyError, match="library_id='nope'"):
        hs.io.from_anndata(adata, library_id="nope")
