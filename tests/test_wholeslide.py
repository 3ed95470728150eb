"""Whole slides without spatial data: pixel size, tissue detection, pseudo-spot grid, prediction, maps, CLI.

Ground truth comes from ``datasets.synthetic_slide``: its tissue outline (``shapes["tissue_truth"]``) and, at any
grid, the expected expression of the same tissue model ``synthetic_visium`` draws counts from
(``datasets.synthetic_slide_truth``).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import shapely
import spatialdata as sd
import tifffile
from scipy.spatial import cKDTree
from spatialdata.transformations import get_transformation

import hopt_st as hs
from hopt_st._cli import main
from hopt_st.io._elements import image_levels
from hopt_st.io._mpp import UnknownPixelSizeError

N_GENES = 40
MODEL_SEED = 0


pytestmark = pytest.mark.usefixtures("cli_process_state")  # main() sets up logging


@pytest.fixture(scope="module")
def regressor():
    """Ridge on handcrafted embeddings of a synthetic Visium sample of the same tissue model as the slides."""
    train = hs.datasets.synthetic_visium(n_spots=200, seed=5, n_genes=N_GENES, model_seed=MODEL_SEED)
    hs.pp.embed(train, "handcrafted", progress=False)
    return hs.tl.fit_expression(train["table"], use_rep="X_handcrafted", n_top_genes=20)


@pytest.fixture(scope="module")
def slides():
    """The same tissue (layout seed 3) scanned at 0.5 and at 0.25 µm/px."""
    return {
        mpp: hs.datasets.synthetic_slide(1400, 1000, image_mpp=mpp, seed=3, n_genes=N_GENES)
        for mpp in (0.5, 0.25)
    }


@pytest.fixture(scope="module")
def predicted(regressor):
    """A 2.4 x 1.6 mm slide through predict_slide, with the truth at its grid."""
    slide = hs.datasets.synthetic_slide(2400, 1600, seed=2, n_genes=N_GENES, model_seed=MODEL_SEED)
    out = hs.tl.predict_slide(slide, regressor, model="handcrafted", progress=False)
    assert out is slide
    hs.datasets.synthetic_slide_truth(slide, table_name="grid")
    return slide


def _level0(sdata) -> np.ndarray:
    return np.asarray(image_levels(sdata["he"])[0].data)


def _truth(sdata) -> shapely.Geometry:
    return shapely.union_all(sdata["tissue_truth"].geometry.to_numpy())


def _iou(a, b) -> float:
    return a.intersection(b).area / a.union(b).area


# -- pixel size ------------------------------------------------------------------------------------------------
def _rgb(side: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)


def test_read_slide_pixel_size_from_the_file_or_the_argument(tmp_path):
    hs.datasets.write_pyramidal_tiff(
        tmp_path / "json.tif", _rgb(), mpp=0.5
    )  # tifffile JSON + resolution tags
    tifffile.imwrite(
        tmp_path / "tags.tif", _rgb(), resolution=(1e4 / 0.2738, 1e4 / 0.2738), resolutionunit="CENTIMETER"
    )
    svs = (
        "Aperio Image Library v12.0.15\r\n64x64 (256x256) JPEG/RGB Q=70|AppMag = 40|MPP = 0.2520|Filename = x"
    )
    tifffile.imwrite(tmp_path / "svs.tif", _rgb(), description=svs, metadata=None)
    tifffile.imwrite(tmp_path / "dpi.tif", _rgb(), resolution=(72, 72), resolutionunit="INCH", metadata=None)
    tifffile.imwrite(tmp_path / "none.tif", _rgb(), metadata=None)

    for name, mpp in (("json", 0.5), ("tags", 0.2738), ("svs", 0.252)):
        sdata = hs.io.read_slide(tmp_path / f"{name}.tif")
        assert sdata.attrs["hopt_st"]["image_mpp"] == {"he": pytest.approx(mpp)}, name
        assert not sdata.tables
        assert hs.io.get_image_mpp(sdata) == pytest.approx(mpp)  # found in attrs while there is no table
    # an explicit value wins over the file
    assert hs.io.get_image_mpp(hs.io.read_slide(tmp_path / "svs.tif", image_mpp=0.3)) == 0.3
    # 72 dpi is an image editor's default, not a scan: no pixel size, a clear error
    for name in ("dpi", "none"):
        with pytest.raises(
            UnknownPixelSizeError, match=rf"pixel size of slide .*{name}\.tif.* is unknown.*image_mpp="
        ):
            hs.io.read_slide(tmp_path / f"{name}.tif")
    sdata = hs.io.read_slide(tmp_path / "none.tif", image_mpp=0.5)
    assert hs.io.get_image_mpp(sdata) == 0.5
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        hs.io.read_slide(tmp_path / "missing.tif")


def test_synthetic_slide_tiff_has_the_same_pixels_as_in_memory(tmp_path):
    """Rendering band by band for the TIFF writer gives the in-memory pixels (lossless zlib tiles)."""
    mem = hs.datasets.synthetic_slide(700, 500, seed=4)
    disk = hs.datasets.synthetic_slide(700, 500, seed=4, path=tmp_path / "s.tif", compression="zlib")
    a, b = _level0(mem), _level0(disk)
    assert a.shape == b.shape == (3, 1000, 1400)
    np.testing.assert_array_equal(a, b)
    assert disk.attrs["hopt_st"]["image_mpp"] == {"he": 0.5}  # read back from the TIFF's metadata
    assert _truth(mem).equals(_truth(disk))
    glass = a[:, :20, :20]
    assert glass.min() > 225  # the corners are bare glass


def test_slide_tissue_and_grid_do_not_import_torch():
    code = (
        "import sys, hopt_st as hs; s = hs.datasets.synthetic_slide(700, 500); hs.pp.detect_tissue(s); "
        "hs.pp.tile_grid(s); hs.io.read_slide; hs.tl.predict_slide; assert 'torch' not in sys.modules, 'torch'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


# -- tissue ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_detect_tissue_matches_the_true_outline(slides, mpp):
    sdata = sd.SpatialData(
        images=dict(slides[mpp].images), shapes={"tissue_truth": slides[mpp]["tissue_truth"]}
    )
    sdata.attrs.update(slides[mpp].attrs)
    hs.pp.detect_tissue(sdata)
    tissue = sdata["tissue"]
    assert _iou(shapely.union_all(tissue.geometry.to_numpy()), _truth(sdata)) >= 0.9
    # two pieces (the dust on the glass is not tissue), the large lumen stays a hole
    assert len(tissue) == len(sdata["tissue_truth"]) == 2
    assert len(tissue.geometry.iloc[0].interiors) == 1
    assert tissue["area_um2"].iloc[0] == pytest.approx(tissue.geometry.iloc[0].area * mpp**2)
    with pytest.raises(
        ValueError, match="shapes element 'tissue' already exists in the SpatialData: pass overwrite"
    ):
        hs.pp.detect_tissue(sdata)


def test_detect_tissue_on_a_blank_slide_is_an_error():
    blank = hs.datasets.synthetic_slide(1200, 800, tissue=False)
    with pytest.raises(ValueError, match=r"No tissue found in image 'he'.*looks blank"):
        hs.pp.detect_tissue(blank)
    assert "tissue" not in blank.shapes


def test_detect_tissue_without_pixel_size_is_an_error(tmp_path):
    slide = hs.datasets.synthetic_slide(700, 500, seed=1)
    bare = sd.SpatialData(images={"he": slide["he"]})
    with pytest.raises(UnknownPixelSizeError, match="pixel size of image 'he' is unknown.*image_mpp="):
        hs.pp.detect_tissue(bare)
    hs.pp.detect_tissue(bare, image_mpp=0.5)
    assert len(bare["tissue"]) >= 1


# -- grid ------------------------------------------------------------------------------------------------------
def _tiles_um(sdata, mpp):
    return np.asarray(sdata["grid"].obsm["spatial"]) * mpp


@pytest.mark.parametrize("preset", ["tiles", "visium"])
def test_tile_grid_spacing_in_um_on_tissue_only(slides, preset):
    centres = {}
    for mpp, slide in slides.items():
        sdata = sd.SpatialData(images=dict(slide.images), shapes={"tissue_truth": slide["tissue_truth"]})
        sdata.attrs.update(slide.attrs)
        hs.pp.detect_tissue(sdata)
        hs.pp.tile_grid(sdata, preset=preset)
        table, shapes = sdata["grid"], sdata["grid_shapes"]
        spec = hs.pp._grid.PRESETS[preset]
        assert table.uns["hopt_st"]["image_mpp"] == {"he": mpp}
        assert table.uns["hopt_st"]["fullres_mpp"] == mpp
        assert table.uns["hopt_st"]["grid"]["spacing_um"] == spec["spacing_um"]
        xy = np.asarray(table.obsm["spatial"])
        # on the lattice at the requested spacing in µm, whatever the µm/px
        step, half = spec["spacing_um"], spec["size_um"] / 2
        row = table.obs["array_row"].to_numpy()
        row_step = step * np.sqrt(3) / 2 if preset == "visium" else step
        offset = (row % 2) * step / 2 if preset == "visium" else 0.0
        np.testing.assert_allclose(xy[:, 1] * mpp, half + row * row_step, atol=1e-6)
        k = (xy[:, 0] * mpp - half - offset) / step
        np.testing.assert_allclose(k, np.round(k), atol=1e-6)
        d, _ = cKDTree(xy).query(xy, k=2)
        assert (
            np.mean(np.isclose(d[:, 1] * mpp, step)) >= 0.9
        )  # neighbours (but a lone tile on a small piece)
        # every tile is on tissue: by the true outline, no tile on bare glass, nearly all centres inside
        truth = _truth(sdata)
        footprints = (
            shapes.geometry.to_numpy()
            if preset == "tiles"
            else shapely.buffer(shapes.geometry.to_numpy(), shapes["radius"].to_numpy())
        )
        frac = shapely.area(shapely.intersection(footprints, truth)) / shapely.area(footprints)
        assert frac.min() > 0.5
        assert shapely.contains_xy(truth, xy[:, 0], xy[:, 1]).mean() >= 0.95
        side = spec["size_um"] / mpp
        h, w = _level0(sdata).shape[1:]
        assert (
            xy.min() >= side / 2 - 1e-6 and xy[:, 0].max() <= w - side / 2 and xy[:, 1].max() <= h - side / 2
        )
        assert table.obs["tissue_fraction"].min() >= 0.75
        # placed in µm too, like the image (spatialdata-plot draws them in "micrometers")
        to_um = get_transformation(shapes, "micrometers").to_affine_matrix(("x", "y"), ("x", "y"))
        np.testing.assert_allclose(np.diag(to_um)[:2], [mpp, mpp])
        # the table annotates the shapes, tile by tile (spot_centers goes through the shapes)
        np.testing.assert_allclose(hs.io._elements.spot_centers(sdata, "grid"), xy)
        centres[mpp] = _tiles_um(sdata, mpp)
    # the same tissue scanned at 0.25 and 0.5 µm/px gets the same tiles (up to a few at the edge)
    d, _ = cKDTree(centres[0.5]).query(centres[0.25])
    assert (d < 1e-6).mean() >= 0.9
    assert abs(len(centres[0.5]) - len(centres[0.25])) <= 0.1 * len(centres[0.5])


def test_tissue_mask_is_the_polygons_pixel_centres():
    """The scanline fill behind tissue fractions agrees with shapely, holes and islands in holes included."""
    from hopt_st.pp._grid import _rasterize

    t = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    ring = np.column_stack([np.cos(t), np.sin(t)])
    lobed = ring * (1 + 0.1 * np.cos(5 * t))[:, None]
    region = shapely.MultiPolygon(
        [
            shapely.Polygon(200 + 150 * lobed, [200 + 60 * ring]),
            shapely.Polygon(200 + 20 * ring),  # an island in the hole
            shapely.box(380.3, 10.7, 395.2, 60.1),
        ]
    )
    for px in (1.0, 3.3):
        h, w = int(400 / px), int(420 / px)
        yy, xx = np.mgrid[0:h, 0:w]
        expected = shapely.contains_xy(region, (xx + 0.5) * px, (yy + 0.5) * px)
        np.testing.assert_array_equal(_rasterize(region, h, w, px), expected)


def test_tile_grid_refuses_bad_requests(slides):
    slide = slides[0.5]
    sdata = sd.SpatialData(images=dict(slide.images))
    sdata.attrs.update(slide.attrs)
    with pytest.raises(ValueError, match=r"no tissue shapes 'tissue'.*detect_tissue"):
        hs.pp.tile_grid(sdata)
    with pytest.raises(ValueError, match="preset = 'xenium'"):
        hs.pp.tile_grid(sdata, preset="xenium", tissue_key=None)
    with pytest.raises(ValueError, match="shape = 'hexagon'"):
        hs.pp.tile_grid(sdata, shape="hexagon", tissue_key=None)
    with pytest.raises(ValueError, match="min_tissue_fraction"):
        hs.pp.tile_grid(sdata, min_tissue_fraction=1.5, tissue_key=None)
    with pytest.raises(ValueError, match="taken by the images element 'he'"):
        hs.pp.tile_grid(sdata, tissue_key=None, table_name="he")
    # the whole image, with custom squares that touch
    hs.pp.tile_grid(sdata, tissue_key=None, size_um=200)
    xy = np.asarray(sdata["grid"].obsm["spatial"]) * 0.5
    assert len(xy) == 7 * 5 and np.allclose(np.unique(xy[:, 0]), 100 + 200 * np.arange(7))  # 1400 x 1000 µm
    with pytest.raises(
        ValueError, match="shapes element 'grid_shapes' already exists in the SpatialData: pass overwrite"
    ):
        hs.pp.tile_grid(sdata, tissue_key=None)
    # several grid tables: the slide's own pixel size (sdata.attrs) still answers
    hs.pp.tile_grid(sdata, tissue_key=None, key_added="g2", table_name="grid2", preset="visium")
    hs.pp.tile_grid(sdata, tissue_key=None, key_added="g3", table_name="grid3", size_um=300)
    assert sdata["grid3"].uns["hopt_st"]["image_mpp"] == {"he": 0.5}


# -- prediction --------------------------------------------------------------------------------------------------
def test_predicted_maps_follow_the_known_field(predicted, regressor):
    table = predicted["grid"]
    assert table.n_obs > 50
    assert table.uns["hopt_st"]["embeddings"]["X_handcrafted"]["model"] == "handcrafted"
    pred = table.obsm["predicted"]
    assert list(pred.columns) == list(regressor.genes_)
    truth = table.obsm["expected_log1p"][pred.columns].to_numpy()
    r = hs.tl.pearson_per_gene(truth, pred.to_numpy())
    print("per-gene Pearson, predicted vs true expression:", np.round(r, 3))
    assert np.mean(r) >= 0.8, np.round(r, 2)
    assert np.median(r) >= 0.8
    # and the maps are of this slide's field, not of any smooth map: tiles shuffled, the correlation is gone
    rng = np.random.default_rng(0)
    shuffled = hs.tl.pearson_per_gene(truth[rng.permutation(len(truth))], pred.to_numpy())
    assert np.mean(np.abs(shuffled)) < 0.3


def test_predict_slide_refuses_a_regressor_for_another_model(regressor, register_spec, tiny_vit_spec):
    slide = hs.datasets.synthetic_slide(700, 500, seed=1, n_genes=N_GENES)
    with pytest.raises(
        ValueError, match=r"fitted on 'handcrafted' embeddings.*cannot predict from 'h-optimus-1'"
    ):
        hs.tl.predict_slide(slide, regressor, model="h-optimus-1")
    assert "tissue" not in slide.shapes  # refused before anything was computed
    # a custom embedding key does not name the model: the provenance recorded at fit time does
    custom = copy.deepcopy(regressor)
    custom.use_rep = "X_my_run"
    register_spec(tiny_vit_spec("tiny-64"))
    with pytest.raises(ValueError, match=r"fitted on 'handcrafted' embeddings \(use_rep 'X_my_run'\)"):
        hs.tl.predict_slide(slide, custom, model="tiny-64")
    # neither names it (a regressor fit on bare arrays): the embedding size still tells
    custom.provenance_ = {}
    with pytest.raises(ValueError, match="takes 32-dimensional embeddings .* but 'tiny-64' gives 64"):
        hs.tl.predict_slide(slide, custom, model="tiny-64")
    assert "tissue" not in slide.shapes


def test_predict_slide_from_a_tiff_without_pixel_size(tmp_path, regressor):
    slide = hs.datasets.synthetic_slide(700, 500, seed=1)
    rgb = np.ascontiguousarray(_level0(slide).transpose(1, 2, 0))
    hs.datasets.write_pyramidal_tiff(tmp_path / "nompp.tif", rgb)
    with pytest.raises(UnknownPixelSizeError, match="pixel size of slide .* is unknown.*image_mpp="):
        hs.tl.predict_slide(tmp_path / "nompp.tif", regressor, model="handcrafted")


def _tiles(ax):
    """The tiles of a panel (spatialdata-plot: one PatchCollection, predictions-table row order)."""
    from matplotlib.collections import PatchCollection

    return next(c for c in ax.collections if isinstance(c, PatchCollection))


def test_slide_expression_draws_tiles_as_squares_or_circles(predicted, regressor):
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    genes = list(regressor.genes_[:3])
    assert hs.pl.slide_expression(predicted, genes) is None  # scanpy's convention, as pl.expression
    plt.close("all")
    fig = hs.pl.slide_expression(predicted, genes, return_fig=True)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [f"{g} (predicted)" for g in genes]
    tiles = _tiles(panels[0])
    paths = tiles.get_paths()
    assert len(paths) == predicted["grid"].n_obs
    size = np.array([[e.width, e.height] for e in (p.get_extents() for p in paths)])
    np.testing.assert_allclose(size, np.broadcast_to(size[0], size.shape), rtol=1e-6)  # equal squares ...
    assert len(paths[0].vertices) <= 6  # ... drawn as squares, not circles
    values = predicted["predicted"][:, genes[0]].X.ravel()  # the predictions table
    np.testing.assert_allclose(values, predicted["grid"].obsm["predicted"][genes[0]].to_numpy(), rtol=1e-6)
    expected = plt.get_cmap("viridis")(Normalize(*np.percentile(values, [1, 99]))(values))[:, :3]
    np.testing.assert_allclose(np.asarray(tiles.get_facecolors())[:, :3], expected, atol=1e-6)
    plt.close(fig)
    hs.pp.tile_grid(predicted, preset="visium", key_added="spots_v", table_name="grid_v")
    grid_v = predicted["grid_v"]  # any embeddings will do to draw circles
    grid_v.obsm["X_handcrafted"] = np.random.default_rng(0).normal(
        size=(grid_v.n_obs, regressor.n_features_in_)
    )
    hs.tl.predict_expression(predicted, regressor, table_name="grid_v", key_added="predicted_v")
    fig = hs.pl.slide_expression(
        predicted, genes[0], table_name="grid_v", predicted_key="predicted_v", return_fig=True
    )
    paths = _tiles(fig.axes[0]).get_paths()
    assert len(paths) == grid_v.n_obs and len(paths[0].vertices) > 6  # circles
    plt.close(fig)
    with pytest.raises(KeyError, match=r"\['NOPE'\] were not predicted"):
        hs.pl.slide_expression(predicted, ["NOPE"])


# -- command line ------------------------------------------------------------------------------------------------
def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("hopt-st: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_predict_writes_predictions_and_maps(tmp_path, capsys, regressor):
    slide = tmp_path / "slide.tif"
    hs.datasets.synthetic_slide(1400, 1000, seed=2, n_genes=N_GENES, path=slide)
    reg = tmp_path / "ridge.safetensors"
    regressor.save(reg)
    out = tmp_path / "slide_pred.zarr"
    args = ("predict", slide, "--regressor", reg, "--model", "handcrafted", "--out", out)
    rc, stdout, err = _run(capsys, "-q", *args)
    assert rc == 0, err
    assert "tiles (square, 112 µm every 112 µm)" in stdout
    written = sd.read_zarr(out)
    table = written["grid"]
    assert list(table.obsm["predicted"].columns) == list(regressor.genes_)
    assert table.uns["hopt_st"]["predictions"]["predicted"]["regressor_file"] == "ridge.safetensors"
    assert set(written.shapes) == {"tissue", "grid_shapes"} and list(written.images) == ["he_thumbnail"]
    assert set(written.tables) == {"grid", "predicted"}
    assert written["predicted"].uns["hopt_st"]["prediction"]["regressor_file"] == "ridge.safetensors"
    assert max(written["he_thumbnail"].shape[1:]) <= 2000
    for gene in regressor.genes_[:3]:
        assert (tmp_path / f"slide_pred_{gene}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    # the maps draw on the stored thumbnail: the output is self-contained
    import matplotlib.pyplot as plt

    plt.close(hs.pl.slide_expression(written, regressor.genes_[0], return_fig=True))

    # an existing output is never replaced without --overwrite
    before = sorted(p.name for p in out.rglob("*"))
    rc, _, err = _run(capsys, *args)
    assert rc == 1 and "--overwrite" in _error(err)
    assert sorted(p.name for p in out.rglob("*")) == before
    # a regressor for another model, a slide without pixel size, unknown genes: one clear line each
    rc, _, err = _run(
        capsys, "predict", slide, "--regressor", reg, "--model", "h-optimus-1", "--out", tmp_path / "x.zarr"
    )
    assert rc == 1 and "fitted on 'handcrafted' embeddings" in _error(err)
    rgb = np.ascontiguousarray(np.asarray(sd.read_zarr(out)["he_thumbnail"].data).transpose(1, 2, 0))
    hs.datasets.write_pyramidal_tiff(tmp_path / "nompp.tif", rgb)
    rc, _, err = _run(
        capsys,
        "predict",
        tmp_path / "nompp.tif",
        "--regressor",
        reg,
        "--model",
        "handcrafted",
        "--out",
        tmp_path / "y.zarr",
    )
    assert rc == 1 and "pass --image-mpp" in _error(err)
    rc, _, err = _run(capsys, *args, "--genes", "NOPE", "--overwrite")
    assert rc == 1 and "--genes ['NOPE'] are not predicted" in _error(err)
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_atomic_dir_replaces_a_folder_only_once_the_new_one_is_complete(tmp_path):
    from hopt_st._atomic import atomic_dir

    out = tmp_path / "a.zarr"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_dir(out) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("half")
        raise RuntimeError("interrupted")
    assert [p.name for p in out.iterdir()] == ["old"] and list(tmp_path.iterdir()) == [out]
    with atomic_dir(out) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"] and list(tmp_path.iterdir()) == [out]
