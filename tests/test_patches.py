"""pp.patches / Patches / io.read_patches: geometry, resampling, inputs, errors, HEST h5 format.

Exactness is checked against an independent reference: a direct crop (numpy, padded with the fill value)
of the chosen pyramid level, resized with Pillow's own ``Image.resize(..., BILINEAR)`` (the documented filter;
the resampler itself is also checked against a float re-statement of that filter and against torch's
antialiased bilinear). The image's pixel values encode their own coordinates, so a misplaced window cannot
match by accident.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from PIL import Image
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, Translation

import hopt_st
from hopt_st.pp import Patches, patches
from hopt_st.pp._image_reader import LevelReader

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ----------------------------------------------------------------------------------------- helpers
def coord_image(h: int, w: int) -> np.ndarray:
    """(3, h, w) uint8: R = x mod 256, G = y mod 256, B = 256-px block id -- every pixel knows where it is."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx % 256, yy % 256, (xx // 256 * 37 + yy // 256 * 101) % 256]).astype(np.uint8)


def make_sdata(
    img,
    xy,
    *,
    image_mpp=None,
    dims=tuple("cyx"),
    scale_factors=None,
    image_tf=None,
    shapes_tf=None,
    chunks=(128, 128),
):
    n = len(xy)
    c_chunks = (img.shape[0] if dims[0] == "c" else img.shape[-1],)
    ch = c_chunks + tuple(chunks) if dims[0] == "c" else tuple(chunks) + c_chunks
    im = Image2DModel.parse(
        img,
        dims=dims,
        scale_factors=scale_factors,
        chunks=ch,
        transformations=image_tf or {"global": Identity()},
    )
    ids = pd.Index([f"s{i}" for i in range(n)])
    sh = ShapesModel.parse(
        np.asarray(xy, dtype=float),
        geometry=0,
        radius=np.full(n, 5.0),
        index=ids,
        transformations=shapes_tf or {"global": Identity()},
    )
    obs = pd.DataFrame(
        {"region": pd.Categorical(["spots"] * n), "spot_id": ids.to_numpy()},
        index=[f"bc{i}" for i in range(n)],
    )
    t = TableModel.parse(
        ad.AnnData(np.zeros((n, 2), np.float32), obs=obs),
        region="spots",
        region_key="region",
        instance_key="spot_id",
    )
    if image_mpp is not None:
        t.uns["hopt_st"] = {"image_mpp": {"he": float(image_mpp)}, "fullres_mpp": float(image_mpp)}
    return SpatialData(images={"he": im}, shapes={"spots": sh}, tables={"table": t})


def level_yxc(sdata, level: int) -> np.ndarray:
    el = sdata.images["he"]
    da = el if level == 0 and not hasattr(el, "children") else el[f"scale{level}"]["image"]
    return np.moveaxis(np.asarray(da.data.compute() if hasattr(da.data, "compute") else da.data), 0, -1)


def pil_bilinear(crop: np.ndarray, p: int) -> np.ndarray:
    """Pillow's antialiased bilinear resize of a uint8 (h, w, 3) crop to (p, p, 3)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((p, p), Image.Resampling.BILINEAR))


def triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of the antialiased triangle filter as Pillow defines it (``precompute_coeffs``
    in python-pillow/Pillow src/libImaging/Resample.c): centre (j + 0.5) * s, support max(s, 1), rows sum to 1."""
    s = n_in / n_out
    fs = max(s, 1.0)
    w = np.zeros((n_out, n_in))
    for j in range(n_out):
        c = (j + 0.5) * s
        lo, hi = max(int(c - fs + 0.5), 0), min(int(c + fs + 0.5), n_in)
        i = np.arange(lo, hi)
        w[j, lo:hi] = np.clip(1 - np.abs((i - c + 0.5) / fs), 0, None)
        w[j] /= w[j].sum()
    return w


def reference_patches(level_img, centers_px0, downsample, side0, p, fill=255):
    """Direct crop-and-resize: window of round(side0/d) level pixels nearest to each centre, PIL resize."""
    h, w = level_img.shape[:2]
    s = int(np.floor(side0 / downsample + 0.5))
    pad = s + 2
    padded = np.pad(level_img, ((pad, pad), (pad, pad), (0, 0)), constant_values=fill)
    out = []
    for cx, cy in centers_px0:
        x0 = int(np.floor(cx / downsample - s / 2 + 0.5))
        y0 = int(np.floor(cy / downsample - s / 2 + 0.5))
        y0c = min(max(y0, -pad), h)  # far outside: stays within the padding
        x0c = min(max(x0, -pad), w)
        crop = padded[y0c + pad : y0c + pad + s, x0c + pad : x0c + pad + s]
        if crop.shape[:2] != (s, s) or y0c != y0 or x0c != x0:
            crop = np.full((s, s, 3), fill, np.uint8)
        out.append(crop if s == p else pil_bilinear(crop, p))
    return np.stack(out)


def aligned(patch_arr: np.ndarray, reference: np.ndarray, tol: int = 0) -> bool:
    """The alignment check: every patch equals its reference to within ``tol`` grey levels (default: exactly,
    since the reference runs Pillow's own resize)."""
    if patch_arr.shape != reference.shape:
        return False
    return int(np.abs(patch_arr.astype(int) - reference.astype(int)).max()) <= tol


def grid_centers(lo, hi, n=4, jitter=0.37):
    g = np.linspace(lo, hi, n)
    xy = np.array([(x + jitter, y + 2 * jitter) for y in g for x in g])
    return xy


# --------------------------------------------------------------------------------------- exactness
def test_resampler_is_pils_bilinear_filter():
    """Bit-identical to Pillow's BILINEAR; within 1 grey level of the filter computed in float (Pillow rounds
    to uint8 between its two passes) and of torch's antialiased bilinear (the encoders' on-device resize)."""
    import torch
    import torch.nn.functional as F

    from hopt_st.pp._resample import resize

    rng = np.random.default_rng(0)
    for s, p in [(527, 224), (45, 32), (64, 32), (33, 32), (96, 40), (20, 32), (7, 32)]:
        smooth = np.cumsum(rng.integers(-3, 4, (s, s, 3)), axis=1) + np.cumsum(
            rng.integers(-3, 4, (s, 1, 3)), 0
        )
        for crop in (
            rng.integers(0, 256, (s, s, 3), dtype=np.uint8),
            np.clip(smooth + 128, 0, 255).astype(np.uint8),
        ):
            got = resize(crop, p)
            assert got.shape == (p, p, 3) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, pil_bilinear(crop, p))
            wy = triangle_weights(s, p)
            ref = np.einsum("ij,jkc->ikc", wy, crop.astype(np.float64))
            ref = np.einsum("ikc,lk->ilc", ref, wy)
            diff = np.abs(got - np.clip(np.floor(ref + 0.5), 0, 255))
            assert diff.max() <= 1 and diff.mean() < 0.5, (s, p, diff.max(), diff.mean())
            t = F.interpolate(
                torch.from_numpy(crop).permute(2, 0, 1)[None], size=(p, p), mode="bilinear", antialias=True
            )[0].permute(1, 2, 0)
            assert np.abs(got.astype(int) - t.numpy()).max() <= 1
    crop = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert resize(crop, 32) is crop  # 1:1: the window itself


def test_resampler_reused_buffers_give_pillows_patch_for_every_window(monkeypatch):
    """The per-thread reusable image and copy never leak one window into the next: views of a larger image
    (non-contiguous), contiguous windows, shapes that change between calls, windows too large to keep a
    buffer, and four threads at once all give what a fresh ``Image.fromarray(crop).resize`` gives."""
    from concurrent.futures import ThreadPoolExecutor

    from hopt_st.pp import _resample
    from hopt_st.pp._resample import resize

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)
    wins = [
        (int(y), int(x), h, w) for (y, x) in rng.integers(0, 150, (40, 2)) for h, w in [(96, 96), (97, 120)]
    ]

    def one(k):
        y, x, h, w = wins[k]
        crop = img[y : y + h, x : x + w] if k % 3 else img[y : y + h, x : x + w].copy()
        return resize(crop, 40)

    want = [pil_bilinear(img[y : y + h, x : x + w], 40) for y, x, h, w in wins]
    for got, ref in zip([one(k) for k in range(len(wins))], want, strict=True):
        np.testing.assert_array_equal(got, ref)
    with ThreadPoolExecutor(4) as pool:
        for got, ref in zip(pool.map(one, range(len(wins))), want, strict=True):
            np.testing.assert_array_equal(got, ref)
    monkeypatch.setattr(_resample, "_REUSE_MAX_PIXELS", 96 * 96)  # the 97 x 120 windows take no buffer
    for got, ref in zip([one(k) for k in range(len(wins))], want, strict=True):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("target_mpp", [0.75, 1.0, 0.5, 0.4])  # 1.5x and 2x reductions, 1:1, enlargement
def test_exact_level0_fullres_px(target_mpp):
    img = coord_image(500, 700)
    xy = grid_centers(60, 440)
    sd = make_sdata(img, xy, image_mpp=0.5)
    p = patches(sd, patch_size=32, target_mpp=target_mpp)
    side0 = 32 * target_mpp / 0.5
    ref = reference_patches(np.moveaxis(img, 0, -1), xy, 1.0, side0, 32)
    got = p.to_numpy()
    assert got.dtype == np.uint8 and got.shape == (len(xy), 32, 32, 3)
    assert aligned(got, ref)
    assert p.patch_size_src == pytest.approx(side0)
    np.testing.assert_array_equal(p.barcodes, sd.tables["table"].obs_names.to_numpy())
    np.testing.assert_allclose(p.centers, xy)


def test_centre_pixel_encodes_spot_position():
    """Independent of any reference: at 1:1 the patch centre pixel is the spot's own pixel."""
    img = coord_image(600, 600)
    xy = np.array([[300.2, 200.7], [120.5, 450.49], [455.0, 333.3]])
    p = patches(make_sdata(img, xy, image_mpp=0.5), patch_size=32, target_mpp=0.5)
    for k, (cx, cy) in enumerate(xy):
        r, g, _ = p[k][16, 16]
        assert (r, g) == (int(np.floor(cx + 0.5)) % 256, int(np.floor(cy + 0.5)) % 256)


@pytest.mark.parametrize(("target_mpp", "level"), [(0.5, 1), (0.7, 1), (1.0, 2), (0.3, 0)])
def test_exact_from_pyramid_level(target_mpp, level):
    img = coord_image(800, 800)
    xy = grid_centers(100, 700)
    sd = make_sdata(img, xy, image_mpp=0.25, scale_factors=[2, 2])
    p = patches(sd, patch_size=32, target_mpp=target_mpp)
    assert p.level_mpp == pytest.approx(0.25 * 2**level)
    ref = reference_patches(level_yxc(sd, level), xy, 2.0**level, 32 * target_mpp / 0.25, 32)
    assert aligned(p.to_numpy(), ref)


def test_exact_in_transformed_coordinate_system():
    """Visium-hires-like: the image is a 0.5x copy with a Scale to a shared system; shapes are translated."""
    sf = 0.5  # image px per full-res px
    img = coord_image(400, 500)  # the downscaled image
    fullres = grid_centers(150, 750)  # spot centres in full-res px
    own = fullres - np.array([100.0, 50.0])  # the shapes' own coordinates
    sd = make_sdata(
        img,
        own,
        image_tf={"aligned": Scale([1 / sf, 1 / sf], axes=("x", "y"))},
        shapes_tf={"aligned": Translation([100.0, 50.0], axes=("x", "y"))},
    )
    fullres_mpp = 0.25
    hopt_st.io.set_image_mpp(sd, {"he": fullres_mpp / sf})
    p = patches(sd, patch_size=32, target_mpp=0.75)
    ref = reference_patches(np.moveaxis(img, 0, -1), fullres * sf, 1.0, 32 * 0.75 / 0.5, 32)
    assert aligned(p.to_numpy(), ref)
    np.testing.assert_allclose(p.centers, own)
    assert p.patch_size_src == pytest.approx(32 * 0.75 / fullres_mpp)  # in the spots' full-res px


@pytest.mark.parametrize("layout", ["yxc", "cyx"])
def test_exact_through_direct_zarr_path(layout):
    """Images backed by zarr (e.g. TIFFs opened with tifffile's aszarr) are read from the store's own chunks."""
    import dask.array as da
    import zarr

    img = coord_image(600, 640)
    stored = np.ascontiguousarray(np.moveaxis(img, 0, -1)) if layout == "yxc" else img
    chunks = (64, 64, 3) if layout == "yxc" else (3, 64, 64)
    z = zarr.create_array(store=zarr.storage.MemoryStore(), shape=stored.shape, chunks=chunks, dtype=np.uint8)
    z[...] = stored
    d = da.from_zarr(z, chunks=tuple(4 * c if c != 3 else 3 for c in chunks))
    d = d.transpose(2, 0, 1) if layout == "yxc" else d
    xy = grid_centers(40, 600, n=5)
    sd = make_sdata(img, xy, image_mpp=0.5)
    sd.images["he"] = Image2DModel.parse(d, dims=("c", "y", "x"))
    p = patches(sd, patch_size=32, target_mpp=0.75)
    assert p._reader._direct is not None  # the fast path is the one under test
    ref = reference_patches(np.moveaxis(img, 0, -1), xy, 1.0, 48, 32)
    assert aligned(p.to_numpy(), ref)
    np.testing.assert_array_equal(
        np.concatenate([b for _, b in p.iter_batches(3, num_workers=4)]), p.to_numpy()
    )


@pytest.mark.parametrize("corruption", ["swap_xy", "scale_2x", "shift_one_spot"])
def test_alignment_check_catches_corrupted_centres(corruption):
    img = coord_image(800, 800)
    xy = grid_centers(150, 350)  # spacing 66.7 px; corrupted positions stay inside the image
    ref = reference_patches(np.moveaxis(img, 0, -1), xy, 1.0, 48, 32)
    good = patches(make_sdata(img, xy, image_mpp=0.5), patch_size=32, target_mpp=0.75).to_numpy()
    assert aligned(good, ref)
    bad_xy = {"swap_xy": xy[:, ::-1], "scale_2x": xy * 2, "shift_one_spot": xy + [200 / 3, 0]}[corruption]
    bad = patches(make_sdata(img, bad_xy, image_mpp=0.5), patch_size=32, target_mpp=0.75).to_numpy()
    assert not aligned(bad, ref, tol=1)
    # every spot the corruption moved gets a patch far from its reference (the diagonal of a swap stays put)
    wrong = np.abs(bad.astype(int) - ref).reshape(len(xy), -1).mean(axis=1) > 5
    moved = np.hypot(*(bad_xy - xy).T) > 2
    assert moved.sum() >= 12 and (wrong == moved).all()


# ------------------------------------------------------------------------------ edges and outside
def test_edge_spots_padded_and_fraction_recorded():
    img = coord_image(300, 400)
    xy = np.array([[200.0, 150.0], [0.0, 0.0], [399.0, 150.0], [600.0, 600.0]])
    sd = make_sdata(img, xy, image_mpp=0.5)
    with pytest.raises(ValueError, match=r"1 of 4 spots .* entirely outside .*bc3"):
        patches(sd, patch_size=32, target_mpp=0.5)
    p = patches(sd, patch_size=32, target_mpp=0.5, outside="keep", fill=(255, 0, 255))
    frac = sd.tables["table"].obs["patch_fraction_inside"].to_numpy()
    np.testing.assert_allclose(frac, [1.0, 0.25, 17 / 32, 0.0])
    a = p.to_numpy()
    assert (a[1, :16, :16] == [255, 0, 255]).all() and (
        a[1, 16:, 16:] == np.moveaxis(img[:, :16, :16], 0, -1)
    ).all()
    assert (a[3] == [255, 0, 255]).all()
    assert (a[2, :, 17:] == [255, 0, 255]).all() and not (a[2, :, :17] == [255, 0, 255]).all()
    d = patches(sd, patch_size=32, target_mpp=0.5, outside="drop")
    assert len(d) == 3 and list(d.barcodes) == ["bc0", "bc1", "bc2"]
    kept = patches(sd, patch_size=32, target_mpp=0.5, outside="keep").to_numpy()  # fill 255
    np.testing.assert_array_equal(d.to_numpy(), kept[:3])


# ------------------------------------------------------------------------------------ input kinds
def _rgb_result(img_cyx, xy):
    return patches(make_sdata(img_cyx, xy, image_mpp=0.5), patch_size=24, target_mpp=0.75).to_numpy()


def test_input_variants_documented_results():
    rgb = coord_image(200, 260)
    xy = np.array([[60.0, 70.0], [200.3, 130.6], [5.0, 190.0]])
    base = _rgb_result(rgb, xy)
    # RGBA: alpha dropped
    rgba = np.concatenate([rgb, np.full((1, 200, 260), 7, np.uint8)])
    np.testing.assert_array_equal(_rgb_result(rgba, xy), base)
    # grey: replicated to 3 equal channels
    grey = _rgb_result(rgb[:1], xy)
    np.testing.assert_array_equal(grey, np.repeat(base[..., :1], 3, axis=-1))
    # uint16 (full range): v16 = 257 * v8 gives the same patches
    np.testing.assert_array_equal(_rgb_result(rgb.astype(np.uint16) * 257, xy), base)
    # float in [0, 1]
    np.testing.assert_array_equal(_rgb_result(rgb.astype(np.float32) / 255, xy), base)
    # y, x, c input through spatialdata
    yxc = np.ascontiguousarray(np.moveaxis(rgb, 0, -1))
    sd = make_sdata(yxc, xy, image_mpp=0.5, dims=("y", "x", "c"))
    np.testing.assert_array_equal(patches(sd, patch_size=24, target_mpp=0.75).to_numpy(), base)


def test_level_reader_accepts_yxc_and_numpy():
    rgb = np.moveaxis(coord_image(100, 150), 0, -1)
    for data in (rgb, __import__("dask.array").array.from_array(rgb, chunks=(32, 40, 3))):
        r = LevelReader(xr.DataArray(data, dims=("y", "x", "c")))
        (win,) = r.read_windows(np.array([[-3, 140]]), (10, 20), np.array([1, 2, 3], np.uint8))
        assert (win[3:, :10] == rgb[0:7, 140:150]).all()
        assert (win[:3] == [1, 2, 3]).all() and (win[:, 10:] == [1, 2, 3]).all()


def test_bad_inputs_raise_documented_errors():
    xy = np.array([[50.0, 50.0]])
    img = coord_image(100, 100)
    with pytest.raises(TypeError, match="dtype int32"):
        _rgb_result(img.astype(np.int32), xy)
    with pytest.raises(ValueError, match="2 channels"):
        _rgb_result(img[:2], xy)
    with pytest.raises(ValueError, match=r"values in \[0, 1.98\]"):
        _rgb_result(img.astype(np.float32) / 50, xy)
    sd = make_sdata(img, xy)  # no recorded pixel size
    with pytest.raises(ValueError, match="pixel size of image 'he' is unknown"):
        patches(sd)
    sd = make_sdata(img, xy, image_mpp=0.5)
    with pytest.raises(ValueError, match="patch_size"):
        patches(sd, patch_size=0)
    with pytest.raises(ValueError, match="outside"):
        patches(sd, outside="ignore")
    with pytest.raises(ValueError, match="fill"):
        patches(sd, fill=300)
    with pytest.raises(ValueError, match="target_mpp"):
        patches(sd, target_mpp=-1)
    sd = make_sdata(img, xy, image_mpp=0.5, shapes_tf={"other": Identity()})
    with pytest.raises(ValueError, match="share no coordinate system"):
        patches(sd)


# ---------------------------------------------------------------------- Patches API and h5 format
def test_indexing_batches_and_h5_round_trip(tmp_path):
    img = coord_image(400, 400)
    xy = grid_centers(50, 350, n=5)
    sd = make_sdata(img, xy, image_mpp=0.5)
    p = patches(sd, patch_size=16, target_mpp=0.75)
    assert isinstance(p, Patches) and len(p) == 25
    full = p.to_numpy()
    np.testing.assert_array_equal(p[3], full[3])
    np.testing.assert_array_equal(p[-1], full[-1])
    np.testing.assert_array_equal(p[2:9:3], full[2:9:3])
    np.testing.assert_array_equal(p[np.array([7, 1, 7])], full[[7, 1, 7]])
    assert p[[]].shape == (0, 16, 16, 3)
    mask = np.zeros(25, bool)
    mask[[2, 5]] = True
    np.testing.assert_array_equal(p[mask], full[[2, 5]])
    sel = np.array([20, 3, 11, 4, 0, 24, 13])
    got = list(p.iter_batches(2, indices=sel, num_workers=3))
    np.testing.assert_array_equal(np.concatenate([i for i, _ in got]), sel)
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), full[sel])

    path = tmp_path / "patches.h5"
    p.to_h5(path)
    with pytest.raises(FileExistsError):
        p.to_h5(path)
    with h5py.File(path, "r") as f:  # HEST layout
        assert f["img"].shape == (25, 16, 16, 3) and f["img"].dtype == np.uint8
        # HEST's corner: int(centre - patch_size_src // 2), here patch_size_src = 24
        np.testing.assert_array_equal(f["coords"][:], np.trunc(xy - 12).astype(int))
        assert f["barcode"].shape == (25, 1) and f["barcode"][0, 0] == b"bc0"
        # hestcore 1.0.4's attributes, with its meaning: pixel_size is the slide's µm/px (16 px at 0.75 µm/px
        # cut from 24 level-0 px: 0.5 µm/px), patch_size_src the rounded level-0 window
        assert dict(f["img"].attrs) == {
            "patch_size_src": 24,
            "patch_size_target": 16,
            "downsample": pytest.approx(1.5),
            "pixel_size": pytest.approx(0.5),
        }
        assert f.attrs["hopt_st_patch_mpp"] == pytest.approx(0.75)
    q = hopt_st.io.read_patches(path)
    assert isinstance(q, Patches) and len(q) == 25 and q.patch_size == 16 and q.mpp == pytest.approx(0.75)
    np.testing.assert_array_equal(q.to_numpy(), full)
    np.testing.assert_array_equal(q[np.array([5, 2, 5])], full[[5, 2, 5]])
    np.testing.assert_array_equal(q.barcodes, p.barcodes)
    np.testing.assert_allclose(q.centers, xy)
    idx, batch = next(q.iter_batches(4, indices=np.array([9, 8])))
    np.testing.assert_array_equal(batch, full[[9, 8]])
    # picklable, so usable as a torch Dataset with worker processes
    import pickle

    for obj in (p, q):
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(obj))[np.array([4, 1])], full[[4, 1]])


def test_hest_corner_convention_round_trip():
    from hopt_st._patchset import hest_centers, hest_topleft

    rng = np.random.default_rng(3)
    centers = rng.integers(300, 5000, (50, 2)).astype(float)  # whole-pixel spot centres (x, y)
    for src in (224.0, 225.0, 527.0588, 243.6):
        tl = hest_topleft(centers, src)
        np.testing.assert_array_equal(tl, np.trunc(centers - src // 2))  # HEST's dump_patches formula
        np.testing.assert_array_equal(hest_centers(tl, src), centers)
    frac = centers + 0.7  # fractional centres: recovered to within the 1 px HEST's int() drops
    off = frac - hest_centers(hest_topleft(frac, 527.0588), 527.0588)
    assert np.all((off >= 0) & (off < 1))
    with pytest.raises(ValueError, match="patch_size_src"):
        hest_topleft(centers, 0)


def test_read_hest_style_file_without_attributes(tmp_path):
    path = tmp_path / "hest.h5"
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (5, 224, 224, 3), dtype=np.uint8)
    coords = np.array([[10, 20], [30, 40], [50, 60], [70, 80], [90, 100]])
    with h5py.File(path, "w") as f:
        f["img"] = imgs
        f["coords"] = coords
        f["barcode"] = np.array([[b"AAAC-1"], [b"AAAG-1"], [b"AACT-1"], [b"ACGT-1"], [b"TTTT-1"]])
    q = hopt_st.io.read_patches(path)
    assert len(q) == 5 and q.patch_size == 224 and q.mpp == 0.5
    assert list(q.barcodes[:2]) == ["AAAC-1", "AAAG-1"]
    np.testing.assert_allclose(q.centers, coords + 112)
    np.testing.assert_array_equal(q.to_numpy(), imgs)
    # a 0.2125 µm/px slide: patch_size_src = 527.06 and HEST offsets the corner by 527.06 // 2 = 263
    with h5py.File(tmp_path / "hest_0p2125.h5", "w") as f:
        f["img"] = imgs
        f["coords"] = coords
        f["coords"].attrs["patch_size_src"] = 224 * 0.5 / 0.2125
        f["barcode"] = np.array([[b"AAAC-1"], [b"AAAG-1"], [b"AACT-1"], [b"ACGT-1"], [b"TTTT-1"]])
    np.testing.assert_array_equal(hopt_st.io.read_patches(tmp_path / "hest_0p2125.h5").centers, coords + 263)
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["features"] = np.zeros(3)
    with pytest.raises(ValueError, match="not a HEST patch file"):
        hopt_st.io.read_patches(tmp_path / "bad.h5")


def test_read_hestcore_attributes_with_hests_meaning(tmp_path):
    """hestcore 1.0.4 (WSIPatcher.to_h5) on a 0.2125 µm/px slide: patch_size_src = round(224 * 0.5 / 0.2125) = 527,
    downsample = 0.5 / 0.2125, pixel_size = 0.2125 (the slide's). The patches hold 0.2125 * 527 / 224 µm/px and
    HEST's corners sit floor(224 * downsample / 2) = 263 px from the centres."""
    from hopt_st._patchset import ArrayPatches, write_patches_h5

    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 255, (4, 224, 224, 3), dtype=np.uint8)
    coords = np.array([[1000, 2000], [1300, 2000], [1600, 2000], [1900, 2000]])
    path = tmp_path / "hestcore.h5"
    with h5py.File(path, "w") as f:
        f["img"] = imgs
        f["img"].attrs.update(
            {
                "patch_size_src": 527,
                "patch_size_target": 224,
                "downsample": 0.5 / 0.2125,
                "pixel_size": 0.2125,
            }
        )
        f["coords"] = coords
        f["barcode"] = np.array([[b"a"], [b"b"], [b"c"], [b"d"]])
    q = hopt_st.io.read_patches(path)
    assert q.mpp == pytest.approx(0.2125 * 527 / 224) and q.patch_size_src == pytest.approx(
        224 * 0.5 / 0.2125
    )
    np.testing.assert_array_equal(q.centers, coords + 263)
    # our writer without hopt_st fields writes that same file (what write_hest_layout(layout="bench") writes)
    out = tmp_path / "ours.h5"
    write_patches_h5(
        ArrayPatches(imgs, 0.5, list("abcd"), centers=coords + 263, patch_size_src=224 * 0.5 / 0.2125),
        out,
        hopt_st_fields=False,
    )
    with h5py.File(out) as a, h5py.File(path) as b:
        assert set(a) == set(b) == {"img", "coords", "barcode"} and not dict(a.attrs)
        assert set(a["img"].attrs) == set(b["img"].attrs)
        for key in b["img"].attrs:
            assert a["img"].attrs[key] == pytest.approx(b["img"].attrs[key])
        np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
    # an hopt_st file written before hestcore's meaning was adopted: pixel_size was the patches' µm/px
    old = tmp_path / "old.h5"
    with h5py.File(old, "w") as f:
        f["img"] = imgs
        f["coords"] = coords
        f["barcode"] = np.array([[b"a"], [b"b"], [b"c"], [b"d"]])
        for obj in (f, f["img"], f["coords"]):
            obj.attrs.update({"pixel_size": 0.5, "patch_size_src": 527.06, "level0_pixel_size": 0.2125})
    q = hopt_st.io.read_patches(old)
    assert q.mpp == 0.5 and q.patch_size_src == pytest.approx(527.06)


# ------------------------------------------------------------------------------- real Visium crop
def test_visium_crop_patches_at_half_micron(caplog):
    folder = DATA / "visium_crop"
    if not (folder / "test_img.jpg").exists():
        pytest.skip("shared visium_crop data absent")
    rgb = np.asarray(Image.open(folder / "test_img.jpg").convert("RGB"))
    adata = ad.read_h5ad(folder / "test_data.h5ad")
    sf = adata.uns["spatial"]["V1_Adult_Mouse_Brain"]["scalefactors"]
    fullres_mpp = 65.0 / sf["spot_diameter_fullres"]  # ~0.727 µm/px (px across a theoretical 65 µm spot)
    xy = adata.obsm["spatial"].astype(float)
    sd = make_sdata(rgb, xy, image_mpp=fullres_mpp, dims=("y", "x", "c"), chunks=(256, 256))
    with caplog.at_level(logging.WARNING, logger="hopt_st"):
        p = patches(sd, patch_size=224, target_mpp=0.5, outside="keep")
    upsample_warnings = [r for r in caplog.records if "upsampled" in r.getMessage()]
    assert len(upsample_warnings) == 1
    assert p.mpp == 0.5 and p.patch_size_src * fullres_mpp == pytest.approx(112.0)
    got = p.to_numpy()
    assert got.shape == (len(xy), 224, 224, 3)
    ref = reference_patches(rgb, xy, 1.0, 224 * 0.5 / fullres_mpp, 224)
    assert aligned(got, ref)
    # centred: the patch centre matches the image around the spot centre (a shifted window would not)
    k = int(np.argmax(sd.tables["table"].obs["patch_fraction_inside"].to_numpy()))
    cx, cy = xy[k]
    around = rgb[int(cy) - 5 : int(cy) + 5, int(cx) - 5 : int(cx) + 5].mean(axis=(0, 1))
    centre = got[k, 104:120, 104:120].mean(axis=(0, 1))
    assert np.abs(around - centre).max() < 12


def test_patch_file_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way (disk full) leaves the old file byte for byte and no temporary file."""
    from hopt_st._patchset import ArrayPatches

    imgs = np.zeros((3, 8, 8, 3), np.uint8)
    p = ArrayPatches(imgs, 0.5, ["a", "b", "c"], centers=np.full((3, 2), 100.0), patch_size_src=8)
    path = tmp_path / "p.h5"
    p.to_h5(path)
    before = path.read_bytes()
    real = h5py.Group.create_dataset

    def full_disk(self, name, *a, **k):
        if name == "barcode":
            raise OSError(28, "No space left on device")
        return real(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ArrayPatches(imgs + 1, 0.5, ["a", "b", "c"], centers=np.full((3, 2), 100.0), patch_size_src=8).to_h5(
            path, overwrite=True
        )
    assert path.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["p.h5"]
