"""What users hold: plain images (JPEG, PNG, BMP, grayscale, 16-bit, tiny) as slides and as ``image=``, the
OpenSlide extra, processed h5ads in cohorts, and the real ``visium_crop`` (h5ad + JPEG) through embed,
embed-cohort, load_cohort, fit, predict and ``hopt-st predict`` with the JPEG as the slide."""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

import hopt_st as hs
from hopt_st._cli import main
from hopt_st.datasets import synthetic_visium, write_pyramidal_tiff
from hopt_st.io._anndata import _read_image_file  # the reader of embed(image=path), --image
from hopt_st.io._elements import image_levels

CROP = Path(__file__).resolve().parents[2] / "shared" / "data" / "visium_crop"


@pytest.fixture(scope="module")
def he():
    """A synthetic H&E scan, (h, w, 3) uint8."""
    sdata = synthetic_visium(n_spots=60, seed=3, n_genes=10)
    return np.ascontiguousarray(np.asarray(sdata.images["he"].data.compute()).transpose(1, 2, 0))


def _level0(sdata, key="he") -> np.ndarray:
    return np.asarray(image_levels(sdata.images[key])[0].data.compute()).transpose(1, 2, 0)


@pytest.mark.parametrize("fmt", ["png", "bmp", "jpg"])
def test_plain_images_open_as_slides_with_their_pixels(he, tmp_path, fmt):
    path = tmp_path / f"scan.{fmt}"
    Image.fromarray(he).save(path, quality=95)
    expected = np.asarray(Image.open(path).convert("RGB"))  # what embed(image=path) reads
    sdata = hs.io.read_slide(path, image_mpp=0.5)
    np.testing.assert_array_equal(_level0(sdata), expected)
    assert hs.io.get_image_mpp(sdata, "he") == 0.5
    # no pixel size in a plain image: the error names the file and the argument
    with pytest.raises(ValueError, match=rf"scan\.{fmt}.*records none.*image_mpp="):
        hs.io.read_slide(path)


def test_images_without_he_are_refused_with_the_reason(he, tmp_path):
    cases = {
        "gray.tif": lambda p: tifffile.imwrite(p, he[..., 0]),
        "gray_pil.tif": lambda p: Image.fromarray(he[..., 0]).save(p),
        "gray.png": lambda p: Image.fromarray(he[..., 0]).save(p),
        "gray16.png": lambda p: Image.fromarray(he[..., 0].astype(np.uint16) * 257).save(p),
    }
    for name, write in cases.items():
        write(tmp_path / name)
        for read in (lambda p: hs.io.read_slide(p, image_mpp=0.5), _read_image_file):
            with pytest.raises(ValueError, match=rf"{name}' is grayscale.*RGB"):
                read(tmp_path / name)
    Image.fromarray(he[:1, :1]).save(tmp_path / "one.png")
    tifffile.imwrite(tmp_path / "one.tif", he[:1, :1])
    for name in ("one.png", "one.tif"):
        with pytest.raises(ValueError, match=rf"{name}' is 1 x 1 px: too small to hold tissue"):
            hs.io.read_slide(tmp_path / name, image_mpp=0.5)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(hs.io.CorruptFileError, match=r"notes\.txt.*no format hopt_st reads.*TIFF.*PNG"):
        hs.io.read_slide(tmp_path / "notes.txt", image_mpp=0.5)


def test_16bit_rgb_tiff_opens_as_a_slide_and_cuts_the_8bit_patches(he, tmp_path):
    tifffile.imwrite(tmp_path / "scan8.tif", he, tile=(64, 64))
    tifffile.imwrite(tmp_path / "scan16.tif", he.astype(np.uint16) * 257, tile=(64, 64))
    s8, s16 = (hs.io.read_slide(tmp_path / f"scan{b}.tif", image_mpp=0.5) for b in (8, 16))
    np.testing.assert_array_equal(_level0(s16), he.astype(np.uint16) * 257)
    hs.pp.tile_grid(s8, size_um=40, spacing_um=40, shape="square", tissue_key=None)
    hs.pp.tile_grid(s16, size_um=40, spacing_um=40, shape="square", tissue_key=None)
    p8 = hs.pp.patches(s8, table_name="grid", patch_size=32, target_mpp=1.0).to_numpy()
    p16 = hs.pp.patches(s16, table_name="grid", patch_size=32, target_mpp=1.0).to_numpy()
    assert len(p8) > 10
    np.testing.assert_array_equal(p16, p8)


def test_openslide_alpha_is_composited_on_white_glass():
    """Opaque pixels stay, transparent ones (outside the scan) are white, and partly transparent ones mix with
    white in proportion to their alpha (straight alpha, as OpenSlide.read_region gives it)."""
    from hopt_st.io._openslide import composite_on_white

    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128], [0, 0, 0, 51]]], np.uint8)
    got = composite_on_white(rgba)
    # v a/255 + 255 (1 - a/255), rounded
    want = [[200, 100, 50], [255, 255, 255], [227, 177, 152], [204, 204, 204]]
    np.testing.assert_array_equal(got, np.array([want], np.uint8))
    assert composite_on_white(rgba[:, :1]).tolist() == [[[200, 100, 50]]]


def test_openslide_formats_need_the_extra_and_read_through_it(he, tmp_path, monkeypatch):
    from hopt_st.io._openslide import read_openslide_image

    write_pyramidal_tiff(tmp_path / "slide.tif", he, mpp=0.5, compression="zlib")
    # through OpenSlide (generic tiled TIFF): the same pixels and pixel size as the TIFF reader's
    element = read_openslide_image(tmp_path / "slide.tif")
    np.testing.assert_array_equal(np.asarray(image_levels(element)[0].data.compute()).transpose(1, 2, 0), he)
    from hopt_st.io._openslide import openslide_mpp

    assert openslide_mpp(tmp_path / "slide.tif")[0] == pytest.approx(0.5)
    # an .mrxs without OpenSlide installed: the extra is named
    (tmp_path / "slide.mrxs").write_bytes(b"MIRAX index")
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(ValueError, match=r"slide\.mrxs.*needs OpenSlide.*pip install \"hopt-st\[slides\]\""):
        hs.io.read_slide(tmp_path / "slide.mrxs", image_mpp=0.5)


def test_openslide_is_opened_once_for_every_level_and_each_pickled_level_opens_its_own(
    he, tmp_path, monkeypatch
):
    import pickle

    from hopt_st.io import _openslide
    from hopt_st.io._image_file import MIN_SIDE

    # a pyramid OpenSlide reads (reduced levels as pages), down to 13 x 19 px: below the smallest side kept
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tif:
        for f in (1, 2, 4, 8, 16):
            tif.write(
                he[:200:f, :300:f],
                tile=(16, 16),
                photometric="rgb",
                compression="zlib",
                subfiletype=int(f > 1),
                metadata=None,
            )
    opened = []
    real_open = _openslide._open
    monkeypatch.setattr(_openslide, "_open", lambda p: opened.append(p) or real_open(p))
    element = _openslide.read_openslide_image(path)
    assert len(opened) == 1  # every level's size and downsample from one handle, no pixel read yet
    with real_open(Path(path)) as slide:
        dims, downsamples = slide.level_dimensions, slide.level_downsamples
    sides = [min(d) for d in dims]
    assert min(sides) < MIN_SIDE <= max(sides)
    levels = image_levels(element)
    assert [lv.shape[1:] for lv in levels] == [(h, w) for w, h in dims if min(w, h) >= MIN_SIDE]
    # a level pickled to a worker holds no handle and opens the slide itself, reading the same pixels
    level = _openslide.OpenSlideLevel(path, 1, dims[1], downsamples[1])
    clone = pickle.loads(pickle.dumps(level))
    assert clone._slide is None and clone.shape == (dims[1][1], dims[1][0], 3)
    want = np.asarray(levels[1].data.compute()).transpose(1, 2, 0)
    n = len(opened)
    np.testing.assert_array_equal(clone[:], want)
    assert len(opened) == n + 1


def _he_texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth, non-periodic H&E-like colours (pink stroma to purple nuclei) with a gradient across x and y:
    JPEG keeps it within a few grey levels, and no two places, nor the image and its transpose, look alike."""
    rng = np.random.default_rng(seed)

    def noise(cell: int) -> np.ndarray:  # random values every `cell` px, bicubic in between
        small = Image.fromarray(rng.random((h // cell + 3, w // cell + 3), np.float32))  # mode "F"
        big = np.asarray(small.resize((w + 3 * cell, h + 3 * cell), Image.BICUBIC))
        return big[cell : cell + h, cell : cell + w]

    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    t = np.clip(0.6 * noise(48) + 0.4 * noise(16) + 0.35 * x - 0.2 * y, 0, 1)[..., None]
    return np.rint((1 - t) * [236, 160, 200] + t * [95, 50, 145]).astype(np.uint8)


def _box(a: np.ndarray, f: int) -> np.ndarray:
    """`a` downsampled by `f`: means of f x f blocks (how the MIRAX writer builds its levels)."""
    h, w = a.shape[0] // f, a.shape[1] // f
    return a.astype(np.float64).reshape(h, f, w, f, 3).mean(axis=(1, 3))


def test_a_mirax_slide_reads_through_openslide_with_its_pixels_pixel_size_and_patches(tmp_path, monkeypatch):
    import openslide
    from _mirax import write_mirax

    # dask chunks smaller than this small slide (a real one spans many) and not aligned to its 256 px images,
    # so that OpenSlide is asked for regions at offsets, on every level
    monkeypatch.setattr("hopt_st.io._openslide._CHUNK", 600)

    mpp, (h, w) = 0.2425, (1536, 2048)  # not square: an x/y swap changes every shape
    source = _he_texture(h, w)
    scanned = np.ones((3, 4), bool)  # camera photos of 512 px: the left column and a corner were not taken
    scanned[:, 0] = scanned[2, 3] = False
    path = write_mirax(tmp_path / "slide.mrxs", source, mpp=mpp, levels=3, scanned=scanned)
    expected = source.copy()
    expected[~scanned.repeat(512, 0).repeat(512, 1)] = 255  # no scan there: background

    # OpenSlide itself opens it as MIRAX with the written size, pyramid, pixel size and scanned bounds
    with openslide.OpenSlide(str(path)) as slide:
        props = slide.properties
        assert props["openslide.vendor"] == "mirax"
        assert slide.level_dimensions == ((w, h), (w // 2, h // 2), (w // 4, h // 4))
        assert float(props["openslide.mpp-x"]) == float(props["openslide.mpp-y"]) == mpp
        bounds = [int(props[f"openslide.bounds-{k}"]) for k in ("x", "y", "width", "height")]
        assert bounds == [512, 0, 1536, h]  # the scanned photos' extent, reported by OpenSlide
        assert np.asarray(slide.read_region((0, 0), 0, (512, h)))[..., 3].max() == 0  # unscanned: transparent

    # hopt_st's public path: the pixel size from the file, every level's pixels within JPEG error, in
    # OpenSlide's level-0 frame (not cropped to the bounds), unscanned pixels white
    sdata = hs.io.read_slide(path)
    assert hs.io.get_image_mpp(sdata, "he") == mpp
    assert sdata.attrs["hopt_st"]["mpp_source"] == "OpenSlide's openslide.mpp-x"
    elements = image_levels(sdata.images["he"])
    assert elements[0].data.chunks[1:] == ((600, 600, 336), (600, 600, 600, 248))
    levels = [np.asarray(lv.data.compute()).transpose(1, 2, 0) for lv in elements]
    assert [lv.shape for lv in levels] == [(h // f, w // f, 3) for f in (1, 2, 4)]
    level0 = levels[0].astype(np.float64)
    err = np.abs(level0 - expected)
    assert err.mean() < 1.5 and err.max() <= 16, (err.mean(), err.max())
    assert (levels[0][expected.min(axis=-1) == 255] == 255).all()
    # the best alignment is no shift at all: a 1 px offset in x or y would read worse
    shifted = {
        (dy, dx): np.abs(level0[8 + dy : h - 8 + dy, 8 + dx : w - 8 + dx] - expected[8:-8, 8:-8]).mean()
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    }
    assert min(shifted, key=shifted.get) == (0, 0), shifted
    for f, level in zip((2, 4), levels[1:], strict=True):
        err = np.abs(level - _box(expected, f))
        assert err.mean() < 3 and err.max() <= 40, (f, err.mean(), err.max())

    # patches cut by hs.pp.patches equal those cut from the source (a lossless TIFF), at level 0 and from
    # the pyramid; each matches its own place and no other, so a swap or an offset would show
    tifffile.imwrite(tmp_path / "source.tif", expected)
    ref = hs.io.read_slide(tmp_path / "source.tif", image_mpp=mpp)
    for s in (sdata, ref):
        hs.pp.tile_grid(s, size_um=64, spacing_um=64, shape="square", tissue_key=None)
    np.testing.assert_array_equal(sdata["grid"].obsm["spatial"], ref["grid"].obsm["spatial"])
    for target_mpp, size in ((mpp, 256), (1.0, 64)):
        got, want = (
            hs.pp.patches(s, table_name="grid", patch_size=size, target_mpp=target_mpp)
            .to_numpy()
            .astype(np.int16)
            for s in (sdata, ref)
        )
        assert len(got) == len(want) == 35  # 7 x 5 squares of 64 µm (264 px)
        d = np.array([np.abs(want - g).mean(axis=(1, 2, 3)) for g in got])  # slide patch i vs source patch j
        assert d.diagonal().max() < 3, d.diagonal().max()
        tissue = [i for i in range(len(want)) if (want[i] == 255).all(axis=-1).mean() < 0.5]
        assert len(tissue) > 20
        assert all(d[i, i] < 0.3 * np.delete(d[i], i).min() for i in tissue)


@pytest.mark.skipif(not CROP.is_dir(), reason="../shared/data/visium_crop not present")
def test_visium_crop_processed_h5ad_and_jpeg_through_every_step(
    encoder, weights, tiny_vit_spec, tmp_path, capsys, cli_process_state
):
    h5ad, jpeg = CROP / "test_data.h5ad", CROP / "test_img.jpg"
    # embed (API) is the reference: the h5ad as it is, the JPEG as the scan, µm/px from spot_diameter_fullres
    adata = ad.read_h5ad(h5ad)
    hs.pp.embed(adata, encoder, image=jpeg, progress=False)
    ref = adata.obsm["X_tiny-vit"]
    # embed-cohort takes the same row: no image_mpp column, no raw counts; sample_id "NA" stays "NA"
    (tmp_path / "cohort.csv").write_text(f"sample_id,source,image\nNA,{h5ad},{jpeg}\n")
    with hs.models.registered(tiny_vit_spec()):
        rc = main(["-q", "embed-cohort", str(tmp_path / "cohort.csv"), "--model", "tiny-vit",
                   "--weights", str(weights), "--out", str(tmp_path / "emb")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    emb = hs.io.read_embeddings(tmp_path / "emb" / "tiny-vit" / "NA.h5")
    np.testing.assert_allclose(
        emb.embeddings, ref[pd.Index(adata.obs_names).get_indexer(emb.barcodes)], atol=1e-5
    )
    # load_cohort: the processed values as they are (no raw counts to find), under sample "NA"
    cohort = hs.io.load_cohort(tmp_path / "emb", "tiny-vit", tmp_path / "cohort.csv")
    assert cohort.n_obs == 49 and set(cohort.obs["sample_id"]) == {"NA"}
    np.testing.assert_allclose(
        cohort.X.toarray(), adata[cohort.obs["barcode"].to_numpy()].X.toarray(), rtol=1e-6
    )
    # fit: counts are needed only for a count target, and the error says how to fit these values
    with pytest.raises(ValueError, match=r"adata\.X does not hold raw counts.*target='none'"):
        hs.tl.fit_expression(cohort, use_rep="X_tiny-vit", n_top_genes=4)
    reg = hs.tl.fit_expression(cohort, use_rep="X_tiny-vit", n_top_genes=4, target="none")
    # plots: on the scan that was embedded (not the 100 px hires PNG); the colour bar names the quantity
    own = hs.tl.fit_expression(adata, use_rep="X_tiny-vit", n_top_genes=2, target="none")
    fig = hs.pl.expression(hs.tl.predict_expression(adata, own, copy=True), own.genes_[0], return_fig=True)
    drawn = [im.get_array().shape for ax in fig.axes for im in ax.get_images()]
    assert drawn and min(d[0] for d in drawn) > 400  # a crop of the 1717 px JPEG; the hires PNG has 100 px
    assert f"{own.genes_[0]} (expression as given)" in [ax.get_ylabel() for ax in fig.axes]
    plt.close(fig)
    pred = hs.tl.predict_expression(cohort, reg, copy=True)
    assert pred.shape == (49, 4) and np.isfinite(pred.X).all()
    reg.save(tmp_path / "ridge.safetensors")
    # hopt-st predict with the JPEG as the slide (no pixel size in a JPEG: --image-mpp)
    args = ["predict", str(jpeg), "--regressor", str(tmp_path / "ridge.safetensors"), "--model", "tiny-vit",
            "--weights", str(weights), "--min-tissue-fraction", "0", "--out", str(tmp_path / "pred.zarr")]  # fmt: skip
    with hs.models.registered(tiny_vit_spec()):
        assert main(["-q", *args]) == 1
        assert "--image-mpp" in capsys.readouterr().err
        rc = main(["-q", *args, "--image-mpp", str(65 / 89.44)])
    assert rc == 0, capsys.readouterr().err
    import spatialdata as sd

    grid = sd.read_zarr(tmp_path / "pred.zarr")["predicted"]
    assert grid.n_obs > 10 and list(grid.var_names) == reg.genes_ and np.isfinite(grid.X).all()
