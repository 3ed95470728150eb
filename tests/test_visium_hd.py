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
    return hs.datasets.write_visium_hd_outs(hd_sample, tmp_path_factory.mktemp("hd") / "outs")


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
    assert set(sd.tables) == {"square_002um", "square_008um", "square_016um"}
    assert sd.tables["square_008um"].n_obs == 40 * 32
    # pooled counts = sum of the 2 µm bins
    np.testing.assert_allclose(sd.tables["square_016um"].X.sum(), hd_sample.tables["square_002um"].X.sum())
    sf = json.loads((hd_outs / "binned_outputs/square_008um/spatial/scalefactors_json.json").read_text())
    assert sf["bin_size_um"] == 8 and sf["microns_per_pixel"] == 0.5


def test_read_visium_hd_adds_micrometers(hd_sample, hd_outs):
    from spatialdata import get_extent

    sd = hs.io.read_visium_hd(hd_outs, bin_size=[8, 16])
    assert set(sd.tables) == {"square_008um", "square_016um"}
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
