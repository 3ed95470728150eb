"""Plots: check what is drawn (panels, titles, colour limits, written values, bar order), not just files."""

from __future__ import annotations

import dask.array as da
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from geopandas import GeoDataFrame
from matplotlib.collections import PatchCollection
from matplotlib.colors import Normalize
from shapely.geometry import Point
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale

import hopt_st as hs
from hopt_st.pl._tissue import tissue_view


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _sdata(n_side=6, image_scale=1.0, img_side=400, pyramid=None, with_pred=True, seed=0, mark=2):
    """Spots on a grid in full-res px; image pixels are ``image_scale`` full-res px each (Scale transform).

    The image is white with a red (2 mark + 1) px square mark under the first spot (so tests can check the spots land on it).
    """
    rng = np.random.default_rng(seed)
    step = 50.0
    xs, ys = np.meshgrid(np.arange(n_side) * step + 60, np.arange(n_side) * step + 80)
    xy = np.column_stack([xs.ravel(), ys.ravel()])
    n = len(xy)
    ids = [f"s{i}" for i in range(n)]
    img = np.full((3, img_side, img_side), 255, np.uint8)
    cx, cy = (xy[0] / image_scale).round().astype(int)
    img[0, cy - mark : cy + mark + 1, cx - mark : cx + mark + 1] = 255
    img[1:, cy - mark : cy + mark + 1, cx - mark : cx + mark + 1] = 0
    tr = Identity() if image_scale == 1.0 else Scale([image_scale, image_scale], axes=("x", "y"))
    image = Image2DModel.parse(
        da.from_array(img, chunks=(3, 128, 128)),
        dims=["c", "y", "x"],
        scale_factors=pyramid,
        transformations={"global": tr},
    )
    shapes = ShapesModel.parse(
        GeoDataFrame({"radius": np.full(n, 20.0)}, geometry=[Point(*p) for p in xy], index=ids),
        transformations={"global": Identity()},
    )
    genes = ["GA", "GB", "GC"]
    lam = np.column_stack([1 + xy[:, 0] / 50, 1 + xy[:, 1] / 50, np.full(n, 3.0)])
    counts = rng.poisson(lam).astype(np.float32)
    adata = AnnData(sp.csr_matrix(counts))
    adata.obs_names = [f"bc{i}" for i in range(n)]
    adata.var_names = list(genes)
    adata.obs["region"] = pd.Categorical(["spots"] * n)
    adata.obs["spot_id"] = ids
    adata.obsm["spatial"] = xy
    table = TableModel.parse(adata, region="spots", region_key="region", instance_key="spot_id")
    if with_pred:
        meas = np.log1p(counts)
        pred = meas.copy()
        pred[:, 0] = meas[:, 0] * 0.5 + 0.3  # perfectly correlated, different range
        pred[:, 1] = meas[::-1, 1]  # reversed rows: anti-correlated-ish
        pred[:, 2] = rng.normal(size=n)
        table.obsm["predicted"] = pd.DataFrame(pred, index=table.obs_names, columns=genes)
        table.uns["hopt_st"] = {
            "predictions": {
                "predicted": {"genes": genes, "target": "log1p", "use_rep": "X", "method": "ridge"}
            }
        }
    return SpatialData(images={"he": image}, shapes={"spots": shapes}, tables={"table": table})


def _spot_collections(ax):
    return [c for c in ax.collections if isinstance(c, PatchCollection)]


def _colours(ax) -> np.ndarray:
    """RGB face colours of a panel's spots (spatialdata-plot: one PatchCollection, table row order)."""
    return np.asarray(_spot_collections(ax)[0].get_facecolors())[:, :3]


def _centres(ax) -> np.ndarray:
    """Spot centres and diameters in data coordinates (the circles' path extents)."""
    ext = [p.get_extents() for p in _spot_collections(ax)[0].get_paths()]
    return np.array([[(e.x0 + e.x1) / 2, (e.y0 + e.y1) / 2, e.x1 - e.x0] for e in ext])


def _viridis(values, lo, hi):
    return plt.get_cmap("viridis")(Normalize(lo, hi)(values))[:, :3]


def test_expression_panels_titles_and_shared_limits():
    sdata = _sdata()
    table = sdata["table"]
    assert hs.pl.expression(sdata, ["GA", "GB"]) is None  # scanpy's convention: no figure returned
    fig = hs.pl.expression(sdata, ["GA", "GB"], robust=False, return_fig=True)
    panels = [ax for ax in fig.axes if _spot_collections(ax)]
    assert len(panels) == 4  # 2 genes x (measured, predicted)
    meas = np.log1p(table[:, ["GA", "GB"]].X.toarray())
    pred = table.obsm["predicted"][["GA", "GB"]].to_numpy()
    for i, gene in enumerate(["GA", "GB"]):
        ax_m, ax_p = panels[2 * i], panels[2 * i + 1]
        r = np.corrcoef(meas[:, i], pred[:, i])[0, 1]
        assert ax_m.get_title() == f"{gene}\nmeasured"
        assert ax_p.get_title() == f"{gene}\npredicted, Pearson r = {r:.2f}"
        # one colour scale for measured and predicted of a gene, covering both; the drawn colours are the
        # measured log1p counts and the predictions, in table order
        both = np.concatenate([meas[:, i], pred[:, i]])
        np.testing.assert_allclose(_colours(ax_m), _viridis(meas[:, i], both.min(), both.max()), atol=1e-6)
        np.testing.assert_allclose(_colours(ax_p), _viridis(pred[:, i], both.min(), both.max()), atol=1e-6)
        assert len(_colours(ax_m)) == table.n_obs
    assert "r = 1.00" in panels[1].get_title()  # GA: prediction is an affine map of the measurement
    # Pearson restricted to a subset of spots (e.g. held-out test spots)
    table.obs["test"] = np.arange(table.n_obs) < 12
    fig2 = hs.pl.expression(sdata, "GB", score_on="test", return_fig=True)
    r_test = np.corrcoef(meas[:12, 1], pred[:12, 1])[0, 1]
    assert fig2.axes[1].get_title() == f"GB\npredicted, Pearson r = {r_test:.2f} (test spots)"
    # each row has its own colour bar, labelled with gene and space, spanning both panels' limits
    bars = [ax for ax in fig.axes if not _spot_collections(ax)]
    assert [ax.get_ylabel() for ax in bars] == ["GA (log1p counts)", "GB (log1p counts)"]
    both = np.concatenate([meas[:, 0], pred[:, 0]])
    np.testing.assert_allclose(bars[0].get_ylim(), (both.min(), both.max()), rtol=1e-5)


def test_expression_image_and_spots_align_through_scale_transform():
    # image pixels are 2 full-res px: spot centres (full-res) must be halved to land on the red mark
    sdata = _sdata(image_scale=2.0, img_side=300)
    view = tissue_view(sdata)
    x, y = view.xy[0]
    px = view.image[int(round(y)), int(round(x))]
    assert tuple(px) == (255, 0, 0)
    assert view.radius == pytest.approx(10.0)
    fig = hs.pl.expression(sdata, "GA", return_fig=True)
    ax = fig.axes[0]
    assert len(ax.images) == 1  # tissue under the spots
    drawn = _centres(ax)
    np.testing.assert_allclose(drawn[:, :2], view.xy, atol=1e-6)
    # spots drawn at their true diameter (in image pixels), or scaled on request
    np.testing.assert_allclose(drawn[:, 2], 2 * view.radius, rtol=1e-6)
    big = hs.pl.expression(sdata, "GA", spot_scale=2.5, return_fig=True).axes[0]
    np.testing.assert_allclose(_centres(big)[:, 2], 2.5 * 2 * view.radius, rtol=1e-6)


def test_expression_picks_small_pyramid_level():
    sdata = _sdata(img_side=4400, pyramid=[2, 2], n_side=6, mark=12)
    view = tissue_view(sdata, max_size=2000)
    assert view.level == 2  # 4400 -> 2200 -> 1100: the finest level <= 2000 px
    x, y = view.xy[0]
    assert tuple(view.image[int(round(y)), int(round(x))]) == (255, 0, 0)
    assert view.radius == pytest.approx(5.0)


def test_expression_anndata_without_image_and_save(tmp_path):
    sdata = _sdata()
    out = tmp_path / "expr.png"
    fig = hs.pl.expression(sdata["table"], ["GC"], save=out, return_fig=True)
    assert out.stat().st_size > 1000
    assert len([ax for ax in fig.axes if _spot_collections(ax)]) == 2
    assert all(len(ax.images) == 0 for ax in fig.axes)


def test_expression_measured_from_the_counts_layer_the_regressor_was_fit_on():
    """scanpy habit: X normalised + log1p in place, raw counts kept in layers['counts']."""
    table = _sdata(with_pred=False)["table"]
    adata = AnnData(table.X.copy(), obs=table.obs[[]].copy(), var=table.var.copy())
    adata.obsm["spatial"] = table.obsm["spatial"]
    adata.layers["counts"] = adata.X.copy()
    counts = adata.X.toarray()
    adata.X = sp.csr_matrix(np.log1p(counts / counts.sum(1, keepdims=True) * 1e4))
    adata.obsm["X_emb"] = np.log1p(counts)  # an embedding that carries the expression
    reg = hs.tl.fit_expression(adata, use_rep="X_emb", genes=["GA", "GB"], layer="counts")
    hs.tl.predict_expression(adata, reg)
    fig = hs.pl.expression(adata, "GA", robust=False, return_fig=True)
    ax_m, ax_p = [ax for ax in fig.axes if _spot_collections(ax)]
    meas, pred = np.log1p(counts[:, 0]), adata.obsm["predicted"]["GA"].to_numpy()
    both = np.concatenate([meas, pred])
    np.testing.assert_allclose(_colours(ax_m), _viridis(meas, both.min(), both.max()), atol=1e-6)


def test_expression_errors_name_the_problem():
    sdata = _sdata()
    with pytest.raises(KeyError, match="not predicted"):
        hs.pl.expression(sdata, ["NOPE"])
    with pytest.raises(KeyError, match="run hopt_st.tl.predict_expression"):
        hs.pl.expression(sdata, ["GA"], predicted_key="other")
    with pytest.raises(ValueError, match="empty"):
        hs.pl.expression(sdata, [])
    with pytest.raises(TypeError, match="gene name"):
        hs.pl.expression(sdata, 3)
    with pytest.raises(TypeError, match="SpatialData or AnnData"):
        hs.pl.expression(sdata["table"].to_df(), "GA")
    sdata["table"].obs["flag"] = 1
    with pytest.raises(TypeError, match="boolean column"):
        hs.pl.expression(sdata, "GA", score_on="flag")
    with pytest.raises(KeyError, match="boolean column"):
        hs.pl.expression(sdata, "GA", score_on="nope")


def _bar_order(ax):
    return [t.get_text() for t in ax.get_yticklabels()], [p.get_width() for p in ax.patches]


@pytest.mark.parametrize("kind", ["series", "dict", "frame"])
def test_gene_scores_sorted_bars(kind):
    scores = {"A": 0.2, "B": 0.7, "C": -0.1, "D": 0.45}
    data = {"series": pd.Series(scores), "dict": scores}.get(kind)
    if kind == "frame":
        data = pd.DataFrame({"gene": list(scores), "pearson": list(scores.values())})
    fig = hs.pl.gene_scores(data)
    ax = fig.axes[0]
    names, widths = _bar_order(ax)
    assert names == ["B", "D", "A", "C"]
    np.testing.assert_allclose(widths, [0.7, 0.45, 0.2, -0.1])
    assert ax.yaxis_inverted()  # best at the top
    assert "mean r = 0.312 (dashed) over 4 genes" in ax.get_title()
    # top= keeps the best bars but the mean stays over all genes
    names, _ = _bar_order(hs.pl.gene_scores(data, top=2).axes[0])
    assert names == ["B", "D"]
    assert "mean r = 0.312 (dashed) over 4 genes, top 2 shown" in plt.gcf().axes[0].get_title()


def test_gene_scores_from_bench_results_one_panel_per_model():
    per_gene = pd.DataFrame(
        {
            "task": ["T"] * 4,
            "model": ["m1", "m1", "m2", "m2"],
            "protocol": ["hest"] * 4,
            "gene": ["g1", "g2", "g1", "g2"],
            "pearson": [0.1, 0.5, 0.6, 0.3],
        }
    )
    res = pd.DataFrame(
        {"task": ["T", "T"], "model": ["m1", "m2"], "protocol": ["hest"] * 2, "pearson_mean": [0.3, 0.45]}
    )
    res.attrs["per_gene"] = per_gene
    fig = hs.pl.gene_scores(res, top=1)
    assert len(fig.axes) == 2
    assert _bar_order(fig.axes[0]) == (["g2"], [0.5])
    assert _bar_order(fig.axes[1]) == (["g1"], [0.6])
    assert fig.axes[0].get_title().startswith("m1")
    with pytest.raises(ValueError, match="attrs"):
        hs.pl.gene_scores(pd.DataFrame({"task": ["T"], "pearson_mean": [0.1]}))


def test_benchmark_heatmap_values_written():
    res = pd.DataFrame(
        {
            "task": ["IDC", "PRAD", "IDC", "PRAD"] * 2,
            "model": ["handcrafted", "handcrafted", "h-optimus-1", "h-optimus-1"] * 2,
            "protocol": ["hest"] * 4 + ["strict"] * 4,
            "pearson_mean": [0.1234, 0.2, 0.5, 0.4, 0.1, 0.15, 0.45, 0.35],
            "pearson_std": [0.01] * 8,
            "n_folds": [2] * 8,
        }
    )
    fig = hs.pl.benchmark(res)
    heat = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert [ax.get_title() for ax in heat] == ["protocol: hest", "protocol: strict"]
    ax = heat[0]
    mat = ax.images[0].get_array()
    assert mat.shape == (2, 3)  # models x (tasks + Average)
    np.testing.assert_allclose(mat[0], [0.1234, 0.2, (0.1234 + 0.2) / 2])
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts[(0, 0)] == "0.123\n± 0.010"
    assert texts[(1, 1)] == "0.400\n± 0.010"
    assert texts[(1, 2)] == "0.450"  # Average, no std
    assert [t.get_text() for t in ax.get_xticklabels()] == ["IDC", "PRAD", "Average"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["handcrafted", "h-optimus-1"]
    # one colour scale for both protocols
    assert heat[0].images[0].get_clim() == heat[1].images[0].get_clim() == (0.0, 0.5)
    with pytest.raises(ValueError, match="lacks columns"):
        hs.pl.benchmark(res.drop(columns="pearson_mean"))


def test_tissue_view_on_space_ranger_lowres(shared_data):
    """Real spatialdata-io output: spots (full-res px) land at full-res x tissue_lowres_scalef on the lowres PNG."""
    import json

    outs = shared_data / "visium_mini"
    if not outs.exists():
        pytest.skip("../shared/data/visium_mini is absent")
    sdata = hs.io.read_visium(outs)
    key = next(k for k in sdata.images if k.endswith("lowres_image"))
    scalef = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())["tissue_lowres_scalef"]
    view = tissue_view(sdata, image_key=key, margin=0.0)
    xy_full = np.asarray(sdata["table"].obsm["spatial"], dtype=float)
    # the view is cropped to the spots: compare offsets-free (differences) and the spot radius
    expected = xy_full * scalef
    np.testing.assert_allclose(view.xy - view.xy[0], expected - expected[0], atol=0.01)
    diameter = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())["spot_diameter_fullres"]
    assert view.radius == pytest.approx(diameter / 2 * scalef, rel=1e-3)
    assert view.image.shape[2] == 3 and view.image.max() > 0
