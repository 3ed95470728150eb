"""Readers: Visium (real files), HEST-1k and HEST-Benchmark (synthetic layouts), and their bad-input errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import tifffile
from scipy import sparse
from spatialdata.transformations import Identity, get_transformation

from hopt_st.datasets import synthetic_visium, write_pyramidal_tiff, write_spaceranger_outs
from hopt_st.io import get_image_mpp, read_hest, read_hest_bench, read_visium
from hopt_st.io._counts import ensure_raw_counts
from hopt_st.io._elements import get_spot_table, spot_centers
from hopt_st.io._tiff import read_tiff_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _dense(x):
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def _copy_sample(src_root: Path, dst_root: Path, sid: str) -> Path:
    for sub, ext in (("wsis", ".tif"), ("st", ".h5ad"), ("metadata", ".json")):
        (dst_root / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(src_root / sub / f"{sid}{ext}", dst_root / sub / f"{sid}{ext}")
    return dst_root


# ----------------------------------------------------------------------------------------------- HEST-1k


def test_read_hest_round_trip_exact(hest1k_root):
    root = Path(hest1k_root["root"])
    sid = hest1k_root["sample_ids"][0]
    sd = read_hest(root, sid)
    # the same synthetic sample, regenerated (write_hest_layout: sample i uses seed + i)
    ref = synthetic_visium(n_spots=80, image_mpp=0.5, seed=3, n_genes=40, sample_id=sid)
    ref_t = ref.tables["table"]
    table, shapes_key = get_spot_table(sd)
    assert shapes_key == "spots"
    np.testing.assert_array_equal(table.obs_names, ref_t.obs_names)
    np.testing.assert_array_equal(_dense(table.X), _dense(ref_t.X))  # exact counts
    np.testing.assert_array_equal(spot_centers(sd), spot_centers(ref))  # exact coordinates
    np.testing.assert_array_equal(table.obsm["spatial"], ref_t.obsm["spatial"])
    np.testing.assert_allclose(sd.shapes["spots"]["radius"], 55.0)  # 55 µm at 0.5 µm/px
    # lossless (zlib) pyramid: level 0 is the synthetic image, pixel for pixel; coarser levels exist
    img = sd.images["he"]
    assert len(img.children) >= 2
    lvl0 = img["scale0"]["image"]
    assert lvl0.dims == ("c", "y", "x") and lvl0.dtype == np.uint8
    assert get_transformation(lvl0) == Identity()
    np.testing.assert_array_equal(lvl0.data.compute(), ref.images["he"].data.compute())
    s1 = get_transformation(img["scale1"]["image"]).to_affine_matrix(("y", "x"), ("y", "x"))
    np.testing.assert_allclose(np.diag(s1)[:2], 2.0, rtol=1e-3)
    # dask chunks are whole TIFF tiles (256 px)
    assert all(c % 256 == 0 for c in lvl0.data.chunks[1][:-1])
    uns = table.uns["hopt_st"]
    assert uns["image_mpp"] == {"he": 0.5} and uns["fullres_mpp"] == 0.5 and uns["sample_id"] == sid
    assert uns["metadata"]["st_technology"] == "Visium" and uns["metadata"]["patient"]
    assert get_image_mpp(sd) == 0.5
    # explicit image_mpp wins over the metadata
    sd2 = read_hest(root, sid, image_mpp=0.25)
    assert get_image_mpp(sd2) == 0.25
    np.testing.assert_allclose(sd2.shapes["spots"]["radius"], 110.0)


def test_read_hest_xenium_square_pseudo_spots(hest1k_root):
    root = Path(hest1k_root["root"])
    sid = [s for s in hest1k_root["sample_ids"] if s.startswith("SYNX")][0]
    sd = read_hest(root, sid)
    shapes = sd.shapes["spots"]
    assert "radius" not in shapes.columns
    b = shapes.geometry.bounds
    np.testing.assert_allclose(b["maxx"] - b["minx"], 200.0)  # 100 µm at 0.5 µm/px
    np.testing.assert_allclose(b["maxy"] - b["miny"], 200.0)
    st = ad.read_h5ad(root / "st" / f"{sid}.h5ad")
    np.testing.assert_array_equal(spot_centers(sd)[:, 0], st.obs["pxl_col_in_fullres"].to_numpy())
    np.testing.assert_array_equal(spot_centers(sd)[:, 1], st.obs["pxl_row_in_fullres"].to_numpy())
    np.testing.assert_array_equal(_dense(sd.tables["table"].X), _dense(st.X))


def test_read_hest_missing_and_absent(hest1k_root, tmp_path):
    root = Path(hest1k_root["root"])
    sid = hest1k_root["sample_ids"][0]
    with pytest.raises(KeyError, match=r"NOPE.*samples present.*" + sid):
        read_hest(root, "NOPE")
    _copy_sample(root, tmp_path, sid)
    (tmp_path / "metadata" / f"{sid}.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"incomplete.*metadata/{sid}\.json"):
        read_hest(tmp_path, sid)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_hest(tmp_path / "nowhere", sid)


def test_read_hest_bad_counts_nan_coords_and_pixel_size(hest1k_root, tmp_path):
    root = Path(hest1k_root["root"])
    sid = hest1k_root["sample_ids"][0]
    _copy_sample(root, tmp_path, sid)
    st_path = tmp_path / "st" / f"{sid}.h5ad"
    good = ad.read_h5ad(st_path)

    # normalised (non-integer) values and no raw counts anywhere
    bad = good.copy()
    bad.X = sparse.csr_matrix(np.log1p(_dense(bad.X)))
    bad.write_h5ad(st_path)
    with pytest.raises(ValueError, match=rf"{sid}\.h5ad.*raw counts.*non-integer"):
        read_hest(tmp_path, sid)
    # ... but raw counts kept in layers['counts'] are used
    bad.layers["counts"] = good.X.copy()
    bad.write_h5ad(st_path)
    np.testing.assert_array_equal(_dense(read_hest(tmp_path, sid).tables["table"].X), _dense(good.X))

    # NaN spot coordinates
    nan = good.copy()
    nan.obs.loc[nan.obs_names[3], "pxl_col_in_fullres"] = np.nan
    nan.write_h5ad(st_path)
    with pytest.raises(ValueError, match=rf"{sid}\.h5ad.*1 of 80 spots have NaN.*{nan.obs_names[3]}"):
        read_hest(tmp_path, sid)
    good.write_h5ad(st_path)

    # metadata without a pixel size: error unless image_mpp is given
    meta_path = tmp_path / "metadata" / f"{sid}.json"
    meta = json.loads(meta_path.read_text())
    for key in ("pixel_size_um_estimated", "pixel_size_um_embedded"):
        meta.pop(key)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"pixel_size_um_estimated.*image_mpp="):
        read_hest(tmp_path, sid)
    assert get_image_mpp(read_hest(tmp_path, sid, image_mpp=0.5)) == 0.5


def test_read_hest_null_estimated_pixel_size_falls_back_to_embedded(hest1k_root, tmp_path):
    """HEST metadata may carry ``"pixel_size_um_estimated": null`` next to a valid embedded pixel size."""
    root = Path(hest1k_root["root"])
    sid = hest1k_root["sample_ids"][0]
    _copy_sample(root, tmp_path, sid)
    meta_path = tmp_path / "metadata" / f"{sid}.json"
    meta = json.loads(meta_path.read_text())
    meta["pixel_size_um_estimated"] = None
    meta["pixel_size_um_embedded"] = 0.2738
    meta_path.write_text(json.dumps(meta))
    assert get_image_mpp(read_hest(tmp_path, sid)) == pytest.approx(0.2738)
    assert get_image_mpp(read_hest(tmp_path, sid, image_mpp=0.5)) == 0.5  # explicit value still wins


def test_read_hest_non_pyramidal_lazy_and_corrupt_tiff(hest1k_root, tmp_path):
    root = Path(hest1k_root["root"])
    sid = hest1k_root["sample_ids"][0]
    _copy_sample(root, tmp_path, sid)
    wsi = tmp_path / "wsis" / f"{sid}.tif"
    full = tifffile.imread(wsi)  # level 0
    tifffile.imwrite(wsi, full, tile=(128, 128), compression="zlib")  # one level, tiled
    sd = read_hest(tmp_path, sid)
    img = sd.images["he"]
    assert not hasattr(img, "children") or not len(img.children)  # a single (lazy) level
    assert hasattr(img.data, "dask")
    np.testing.assert_array_equal(
        img.data[:, 100:300, 50:250].compute(), full[100:300, 50:250].transpose(2, 0, 1)
    )
    tifffile.imwrite(wsi, full)  # stripped, not tiled: still lazy
    img = read_hest(tmp_path, sid).images["he"]
    assert hasattr(img.data, "dask")
    np.testing.assert_array_equal(img.data[:, -5:, -7:].compute(), full[-5:, -7:].transpose(2, 0, 1))

    wsi.write_bytes(b"II*\x00" + b"\x00garbage" * 100)
    with pytest.raises(ValueError, match=rf"{sid}\.tif.*corrupt"):
        read_hest(tmp_path, sid)
    wsi.write_bytes(b"this is not a tiff at all")
    with pytest.raises(ValueError, match=rf"{sid}\.tif.*corrupt"):
        read_hest(tmp_path, sid)


def test_tiff_writer_reader_pyramid_tile_fn(tmp_path):
    """The tile-callback writer (used by the memory benchmark) writes the same pyramid as from an array."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (700, 1000, 3), dtype=np.uint8)
    calls = []

    def tile_fn(y0, x0, h, w):
        calls.append(h)
        return img[y0 : y0 + h, x0 : x0 + w]

    p = write_pyramidal_tiff(
        tmp_path / "a.tif", shape=img.shape[:2], tile_fn=tile_fn, compression="zlib", tile=128, n_levels=3
    )
    assert max(calls) <= 128  # generated band by band
    tree = read_tiff_image(p)
    shapes = [tree[k]["image"].shape[1:] for k in tree.children]
    assert shapes == [(700, 1000), (350, 500), (175, 250)]
    np.testing.assert_array_equal(tree["scale0"]["image"].data.compute(), img.transpose(2, 0, 1))
    lvl1 = img.reshape(350, 2, 500, 2, 3).astype(float).mean(axis=(1, 3))
    np.testing.assert_allclose(tree["scale1"]["image"].data.compute().transpose(1, 2, 0), lvl1, atol=0.51)
    with tifffile.TiffFile(p) as tf:
        assert tf.pages[0].is_tiled and len(tf.series[0].levels) == 3


# ------------------------------------------------------------------------------------------ HEST-Benchmark


def test_read_hest_bench_round_trip(hest_bench_root):
    info = hest_bench_root
    sd = read_hest_bench(info["root"], info["task"])
    meta = sd.attrs["hest_bench"]
    assert meta["task"] == "SYNTH" and meta["genes"] == info["genes"]
    assert meta["splits"] == info["splits"]
    assert set(sd.tables) == set(info["sample_ids"])
    for sid in info["sample_ids"]:
        assert Path(meta["patches"][sid]).samefile(info["paths"][sid]["patches"])
        table, shapes_key = get_spot_table(sd, sid)
        assert shapes_key == f"{sid}_spots"
        with h5py.File(info["paths"][sid]["patches"]) as f:
            coords = f["coords"][:]
            bc = [b.decode() for b in f["barcode"][:, 0]]
        ref = ad.read_h5ad(info["paths"][sid]["adata"])[bc]
        np.testing.assert_array_equal(table.obs_names, bc)
        np.testing.assert_array_equal(_dense(table.X), _dense(ref.X))
        # HEST's corners: int(centre - patch_size_src // 2), patch_size_src = 224 at 0.5 µm/px
        np.testing.assert_array_equal(coords, np.trunc(ref.obsm["spatial"] - 112))
        # the spots are the expression file's own centres, exactly (not a corner + offset guess)
        np.testing.assert_array_equal(spot_centers(sd, sid), ref.obsm["spatial"])
        assert (table.obs["patient"] == info["patients"][sid]).all()
        assert table.uns["hopt_st"]["sample_id"] == sid
        # hestcore's pixel_size attribute (the slide's µm/px) gives the full-resolution pixel size exactly
        assert table.uns["hopt_st"]["fullres_mpp"] == 0.5
    # also accepts the task folder itself
    assert set(read_hest_bench(info["task_dir"], "SYNTH").tables) == set(info["sample_ids"])


def _hest_like_copy(info, tmp_path, spatial_mpp=0.2125, keep_spatial=True, src_attr=False):
    """Copy the synthetic task and rewrite sample 0 as HEST would have patched a 0.2125 µm/px slide."""
    dst = tmp_path / "SYNTH"
    shutil.copytree(info["task_dir"], dst)
    sid = info["sample_ids"][0]
    src = 224 * 0.5 / spatial_mpp  # 527.06 level-0 px per 224 px patch
    a = ad.read_h5ad(dst / "adata" / f"{sid}.h5ad")
    with h5py.File(dst / "patches" / f"{sid}.h5", "r+") as f:
        bc = [b.decode() for b in f["barcode"][:, 0]]
        centers = np.rint(a[bc].obsm["spatial"] * 2.5) + 300.0  # whole-pixel spot centres on a bigger slide
        del f["coords"]
        f["coords"] = np.trunc(centers - src // 2).astype(np.int64)  # HEST: int(centre - patch_size_src // 2)
        f["img"].attrs.clear()  # HEST's 2024 files record no size
        if src_attr:  # hestcore 1.0.4's attributes (pixel_size: the slide's µm/px)
            f["img"].attrs.update(
                {
                    "patch_size_src": round(src),
                    "patch_size_target": 224,
                    "downsample": src / 224,
                    "pixel_size": spatial_mpp,
                }
            )
    order = {b: i for i, b in enumerate(bc)}
    a.obsm["spatial"] = centers[[order[b] for b in a.obs_names]]
    if not keep_spatial:
        del a.obsm["spatial"]
    a.write_h5ad(dst / "adata" / f"{sid}.h5ad")
    return dst, sid, centers, src


def test_read_hest_bench_places_spots_like_hest_at_other_pixel_sizes(hest_bench_root, tmp_path):
    info = hest_bench_root
    # 1. HEST-like file, no size attribute: centres and pixel size come from obsm['spatial'] vs coords
    dst, sid, centers, src = _hest_like_copy(info, tmp_path / "a")
    table = read_hest_bench(dst, "SYNTH").tables[sid]
    np.testing.assert_array_equal(table.obsm["spatial"], centers)  # a centre+112 guess would be 151 px off
    assert table.uns["hopt_st"]["fullres_mpp"] == pytest.approx(0.2125, rel=0.003)
    # 2. no obsm['spatial'] but the side recorded: centre = coords + patch_size_src // 2 (= 263, not 263.53)
    dst, sid, centers, src = _hest_like_copy(info, tmp_path / "b", keep_spatial=False, src_attr=True)
    table = read_hest_bench(dst, "SYNTH").tables[sid]
    np.testing.assert_array_equal(table.obsm["spatial"], centers)
    assert table.uns["hopt_st"]["fullres_mpp"] == pytest.approx(0.2125, rel=1e-9)


def test_bench_patches_are_cut_from_the_image(hest_bench_root):
    info = hest_bench_root
    sid = info["sample_ids"][1]
    ref = synthetic_visium(n_spots=100, image_mpp=0.5, seed=1, n_genes=60)  # sample 1 uses seed + 1
    full = ref.images["he"].data.compute()
    with h5py.File(info["paths"][sid]["patches"]) as f:
        for i in (0, 17, len(f["coords"]) - 1):
            x, y = f["coords"][i]
            np.testing.assert_array_equal(f["img"][i], full[:, y : y + 224, x : x + 224].transpose(1, 2, 0))


def test_read_hest_bench_errors(hest_bench_root, tmp_path):
    info = hest_bench_root
    with pytest.raises(FileNotFoundError, match=r"task 'IDC' not found.*tasks present.*SYNTH"):
        read_hest_bench(info["root"], "IDC")
    dst = tmp_path / "SYNTH"
    shutil.copytree(info["task_dir"], dst)
    sid = info["sample_ids"][2]
    (dst / "patches" / f"{sid}.h5").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{sid}.*patches/{sid}\.h5.*missing"):
        read_hest_bench(tmp_path, "SYNTH")
    (dst / "var_50genes.json").unlink()
    with pytest.raises(FileNotFoundError, match="var_50genes.json"):
        read_hest_bench(tmp_path, "SYNTH")


# ---------------------------------------------------------------------------------------- Space Ranger


def test_read_visium_missing_files(tmp_path):
    (tmp_path / "filtered_feature_bc_matrix.h5").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"incomplete.*scalefactors_json\.json.*tissue_positions"):
        read_visium(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_visium(tmp_path / "outs")


@pytest.mark.skipif(not (SHARED / "visium_mini").is_dir(), reason="../shared/data/visium_mini not present")
def test_read_visium_mini():
    sd = read_visium(SHARED / "visium_mini", dataset_id="mini")
    table, shapes_key = get_spot_table(sd)
    assert shapes_key == "mini" and table.n_obs == 100
    x = _dense(table.X)
    np.testing.assert_array_equal(x, np.round(x))
    sf = json.loads((SHARED / "visium_mini" / "spatial" / "scalefactors_json.json").read_text())
    fullres = 65.0 / sf["spot_diameter_fullres"]  # Space Ranger: px across a theoretical 65 µm spot
    uns = table.uns["hopt_st"]
    assert uns["fullres_mpp"] == pytest.approx(fullres) and fullres == pytest.approx(0.727, abs=1e-3)
    assert uns["image_mpp"]["mini_hires_image"] == pytest.approx(fullres / sf["tissue_hires_scalef"])
    assert uns["image_mpp"]["mini_lowres_image"] == pytest.approx(fullres / sf["tissue_lowres_scalef"])
    assert get_image_mpp(sd, "mini_lowres_image") == pytest.approx(fullres / sf["tissue_lowres_scalef"])
    np.testing.assert_allclose(table.obsm["spatial"], spot_centers(sd))
    # the first spot of the positions file, in full-res px (x = column, y = row)
    np.testing.assert_allclose(table.obsm["spatial"][0], [9811, 8513])
    for key in ("mini_hires_image", "mini_lowres_image"):
        img = sd.images[key]
        assert img.shape[0] == 3 and img.dtype == np.uint8 and hasattr(img.data, "dask")
    # the transparent hires placeholder is read as data (black), the lowres image is real H&E
    assert int(sd.images["mini_hires_image"].data.max().compute()) == 0
    assert float(sd.images["mini_lowres_image"].data.mean().compute()) > 50
    # image_mpp is µm per full-res pixel and wins
    sd2 = read_visium(SHARED / "visium_mini", dataset_id="mini", image_mpp=0.5)
    assert sd2.tables["table"].uns["hopt_st"]["image_mpp"]["mini_hires_image"] == pytest.approx(
        0.5 / 0.150015
    )


@pytest.mark.skipif(not (SHARED / "visium_mini").is_dir(), reason="../shared/data/visium_mini not present")
def test_read_visium_pixel_size_matches_the_100um_spot_grid():
    """Known answer independent of any scale-factor convention: Visium spots sit on a grid with 100 µm
    between neighbours of one row (two array columns apart) and 100 * sqrt(3) / 2 µm between rows."""
    import pandas as pd

    pos = pd.read_csv(SHARED / "visium_mini" / "spatial" / "tissue_positions_list.csv", header=None)
    row, col, py, px = (pos[i].to_numpy(float) for i in (2, 3, 4, 5))
    A = np.column_stack([col, row, np.ones(len(pos))])
    px_per_col = np.linalg.lstsq(A, px, rcond=None)[0][0]  # full-res px per array column (50 µm)
    py_per_row = np.linalg.lstsq(A, py, rcond=None)[0][1]  # full-res px per array row (86.6 µm)
    mpp_x, mpp_y = 50.0 / px_per_col, 100 * np.sqrt(3) / 2 / py_per_row
    assert mpp_x == pytest.approx(mpp_y, rel=0.01)  # the grid itself is consistent
    sd = read_visium(SHARED / "visium_mini", dataset_id="mini")
    assert sd.tables["table"].uns["hopt_st"]["fullres_mpp"] == pytest.approx(mpp_x, rel=0.01)


def test_space_ranger_writer_round_trips_the_pixel_size(tmp_path):
    sd = synthetic_visium(n_spots=30, n_genes=10, seed=3)  # 0.5 µm per full-res px
    outs = write_spaceranger_outs(sd, tmp_path / "outs")
    sf = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
    assert sf["spot_diameter_fullres"] == pytest.approx(65.0 / 0.5)  # as Space Ranger writes it
    assert read_visium(outs).tables["table"].uns["hopt_st"]["fullres_mpp"] == pytest.approx(0.5)


@pytest.mark.skipif(not (SHARED / "visium_crop").is_dir(), reason="../shared/data/visium_crop not present")
def test_visium_crop_metadata_and_not_raw_counts():
    from PIL import Image

    a = ad.read_h5ad(SHARED / "visium_crop" / "test_data.h5ad")
    with Image.open(SHARED / "visium_crop" / "test_img.jpg") as im:
        w, h = im.size
    assert (w, h) == (950, 1717)
    sf = a.uns["spatial"]["V1_Adult_Mouse_Brain"]["scalefactors"]
    assert 65.0 / sf["spot_diameter_fullres"] == pytest.approx(0.727, abs=1e-3)
    xy = a.obsm["spatial"]
    assert (xy[:, 0] >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] >= 0).all() and (xy[:, 1] < h).all()
    # its X is log-normalised: the raw-counts check must refuse it and say why
    with pytest.raises(ValueError, match=r"test_data\.h5ad.*raw counts.*non-integer"):
        ensure_raw_counts(a, SHARED / "visium_crop" / "test_data.h5ad")


def test_tiff_pyramid_as_reduced_pages(tmp_path):
    """Pyramids stored as reduced-resolution pages (pyvips/HEST style), not sub-IFDs, are read as levels."""
    img = np.random.default_rng(1).integers(0, 255, (512, 768, 3), dtype=np.uint8)
    p = tmp_path / "pages.tif"
    with tifffile.TiffWriter(p, bigtiff=True) as tw:
        tw.write(img, tile=(128, 128), photometric="rgb", compression="zlib")
        for f in (2, 4):
            tw.write(
                img[::f, ::f].copy(), tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=1
            )
    tree = read_tiff_image(p)
    assert [tree[k]["image"].shape[1:] for k in tree.children] == [(512, 768), (256, 384), (128, 192)]
    np.testing.assert_array_equal(tree["scale2"]["image"].data.compute().transpose(1, 2, 0), img[::4, ::4])
    m = get_transformation(tree["scale2"]["image"]).to_affine_matrix(("y", "x"), ("y", "x"))
    np.testing.assert_allclose(np.diag(m)[:2], 4.0)


# ---------------------------------------------------------------------------- pixel-size convention helpers


def test_image_mpp_convention_and_spot_errors():
    from hopt_st.io import set_image_mpp

    sd = synthetic_visium(n_spots=20, seed=2, n_genes=5)
    assert get_image_mpp(sd) == 0.5
    assert get_image_mpp(sd, image_mpp=0.25) == 0.25  # explicit value wins
    with pytest.raises(ValueError, match="plausible"):
        get_image_mpp(sd, image_mpp=-1)
    set_image_mpp(sd, {"he": 0.3})
    assert get_image_mpp(sd) == 0.3
    with pytest.raises(KeyError, match="'hires'.*images are \\['he'\\]"):
        set_image_mpp(sd, {"hires": 1.0})
    sd.tables["table"].uns["hopt_st"]["image_mpp"] = {}
    with pytest.raises(ValueError, match=r"pixel size of image 'he' is unknown.*image_mpp="):
        get_image_mpp(sd)
    # NaN centres are refused with the barcodes named
    shapes = sd.shapes["spots"]
    from shapely.geometry import Point

    shapes.loc[shapes.index[4], "geometry"] = Point(np.nan, np.nan)
    with pytest.raises(ValueError, match=r"1 spots of 'spots' have NaN.*" + sd.tables["table"].obs_names[4]):
        spot_centers(sd)


def test_centers_um_follow_the_table_rows_and_need_micrometers():
    """A table's shape centres in µm are in table row order, whatever the order of the shapes' rows, and shapes
    without a placement in "micrometers" are refused by name."""
    from spatialdata.transformations import remove_transformation

    from hopt_st.io._coords import centers_um

    sdata = synthetic_visium(n_spots=30, seed=0, n_genes=5)
    shapes = sdata.shapes["spots"]
    want = spot_centers(sdata) * 0.5  # full-resolution px at 0.5 µm/px
    sdata.shapes["spots"] = shapes.iloc[::-1]  # the shapes' rows reversed; the table keeps its order
    table, xy = centers_um(sdata)
    assert table is sdata.tables["table"]
    np.testing.assert_array_equal(xy, want)
    assert not np.array_equal(xy, np.column_stack([shapes.geometry.x, shapes.geometry.y])[::-1] * 0.5)
    remove_transformation(sdata.shapes["spots"], "micrometers")
    with pytest.raises(
        ValueError, match="shapes 'spots' is not placed in the 'micrometers' coordinate system"
    ):
        centers_um(sdata)
