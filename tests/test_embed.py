"""pp.embed end to end on synthetic Visium data: shapes, provenance, a known answer, resuming after SIGKILL."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeCV
from sklearn.preprocessing import StandardScaler

import hopt_st as hs
from hopt_st import models
from hopt_st._patchset import ArrayPatches
from hopt_st.pp._device import select_device, select_dtype

FAST = "handcrafted-fast"  # the handcrafted encoder on 56 px patches at 2 µm/px (same 112 µm field, 16x fewer px)


def specs_to_register(tiny_vit_spec):
    """Registered for this module by the ``model_specs`` fixture (conftest), unregistered after it."""
    fast = dataclasses.replace(models.get_spec("handcrafted"), name=FAST, input_size=56, mpp=2.0)
    return [fast, tiny_vit_spec("tiny-vit", embed_dim=48)]


pytestmark = pytest.mark.usefixtures("model_specs")


@pytest.fixture(scope="module")
def sdata():
    return hs.datasets.synthetic_visium(n_spots=200, seed=0)


def _pearson(a, b):
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0) + 1e-12)


def _heldout_pearson(x, y, train):
    sc = StandardScaler().fit(x[train])
    ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(sc.transform(x[train]), y[train])
    return float(np.nanmean(_pearson(y[~train], ridge.predict(sc.transform(x[~train])))))


def test_handcrafted_embeddings_recover_synthetic_expression(sdata):
    hs.pp.embed(sdata, "handcrafted", progress=False)
    table = sdata.tables["table"]
    x = table.obsm["X_handcrafted"]
    assert x.shape == (table.n_obs, models.get_spec("handcrafted").dim) and x.dtype == np.float32
    assert np.isfinite(x).all()
    prov = table.uns["hopt_st"]["embeddings"]["X_handcrafted"]
    assert prov["model"] == "handcrafted" and prov["patch_size"] == 224 and prov["mpp"] == pytest.approx(0.5)
    assert (
        prov["dtype"] == "float32" and prov["device"] == "cpu" and prov["hopt_st_version"] == hs.__version__
    )
    assert prov["weights_sha256"] == "none"

    y = np.log1p(table.X.toarray())[:, table.var["state_dependent"].to_numpy()]
    xs = table.obsm["spatial"][:, 0]
    train = xs < np.quantile(xs, 0.6)  # spatially separated held-out block
    r = _heldout_pearson(x, y, train)
    # shuffling spot coordinates = each spot gets another spot's patch
    perm = np.random.default_rng(0).permutation(len(x))
    r_shuffled = _heldout_pearson(x[perm], y, train)
    assert r > 0.5, r
    assert r_shuffled < 0.2 and r > r_shuffled + 0.4, (r, r_shuffled)


def test_small_random_vit_and_overwrite(sdata):
    torch.manual_seed(0)
    enc = models.create("tiny-vit", pretrained=False)
    hs.pp.embed(sdata, enc, key_added="X_vit", progress=False, batch_size=64)
    table = sdata.tables["table"]
    x = table.obsm["X_vit"]
    assert x.shape == (table.n_obs, 48) and x.dtype == np.float32 and np.isfinite(x).all()
    prov = table.uns["hopt_st"]["embeddings"]["X_vit"]
    assert prov["weights_sha256"].startswith("random-init:") and prov["patch_size"] == 56
    # rows follow the table: the encoder applied to pp.patches directly gives the same rows
    p = hs.pp.patches(sdata, patch_size=56, target_mpp=2.0)
    with torch.inference_mode():
        direct = enc(torch.from_numpy(p[np.array([0, 17, 199])])).numpy()
    np.testing.assert_allclose(x[[0, 17, 199]], direct, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="overwrite=True"):
        hs.pp.embed(sdata, enc, key_added="X_vit", progress=False)
    table.obsm["X_vit"] = np.zeros_like(x)
    hs.pp.embed(sdata, enc, key_added="X_vit", overwrite=True, progress=False)
    np.testing.assert_allclose(table.obsm["X_vit"], x, rtol=1e-5, atol=1e-6)


def test_patches_h5_and_array_inputs_return_arrays(sdata, tmp_path):
    hs.pp.embed(sdata, FAST, progress=False, overwrite=True)
    ref = sdata.tables["table"].obsm[f"X_{FAST}"]
    p = hs.pp.patches(sdata, patch_size=56, target_mpp=2.0)
    from_patches = hs.pp.embed(p, FAST, progress=False, batch_size=7, num_workers=2)
    assert from_patches.shape == ref.shape and from_patches.dtype == np.float32
    np.testing.assert_allclose(from_patches, ref, rtol=1e-5, atol=1e-6)
    h5 = tmp_path / "patches.h5"
    p.to_h5(h5)
    np.testing.assert_allclose(hs.pp.embed(str(h5), FAST, progress=False), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        hs.pp.embed(p[np.arange(20)], FAST, progress=False), ref[:20], rtol=1e-5, atol=1e-6
    )
    with pytest.raises(TypeError, match="SpatialData"):
        hs.pp.embed([1, 2, 3], FAST)


def test_reader_errors_surface_instead_of_hanging():
    class Broken(ArrayPatches):
        def iter_batches(self, batch_size, *, indices=None, num_workers=None):
            it = super().iter_batches(batch_size, indices=indices)
            yield next(it)
            raise OSError("disk on fire")

    src = Broken(np.zeros((20, 56, 56, 3), np.uint8))
    with pytest.raises(OSError, match="disk on fire"):
        hs.pp.embed(src, FAST, batch_size=4, progress=False)


def test_device_and_dtype_defaults():
    assert select_device(None).type == ("cuda" if torch.cuda.is_available() else select_device("auto").type)
    assert select_device("cpu") == torch.device("cpu")
    assert select_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert select_dtype(None, torch.device("cpu")) == torch.float32
    assert select_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        select_dtype("int8", torch.device("cpu"))


def test_checkpoint_of_another_run_is_refused(sdata, tmp_path):
    ck = tmp_path / "ck"
    p = hs.pp.patches(sdata, patch_size=56, target_mpp=2.0)
    a = hs.pp.embed(p, FAST, checkpoint_dir=ck, batch_size=50, progress=False)
    assert len(list(ck.glob("emb_*.npz"))) == 4
    b = hs.pp.embed(p, FAST, checkpoint_dir=ck, batch_size=50, progress=False)  # all done: nothing recomputed
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="another run"):
        hs.pp.embed(p, models.create("tiny-vit", pretrained=False), checkpoint_dir=ck, progress=False)
    with pytest.raises(ValueError, match="another run"):
        hs.pp.embed(p[np.arange(10)], FAST, checkpoint_dir=ck, progress=False)


_CHILD = textwrap.dedent(
    """
    import dataclasses, sys, time
    import torch
    torch.set_num_threads(1)
    import hopt_st as hs
    from hopt_st import models
    models.register(dataclasses.replace(models.get_spec("handcrafted"), name="handcrafted-fast",
                                        input_size=56, mpp=2.0), overwrite=True)
    sdata = hs.datasets.synthetic_visium(n_spots=96, seed=5)
    enc = models.create("handcrafted-fast")
    forward = enc.backbone.forward
    def slow(x):
        time.sleep(0.4)
        return forward(x)
    enc.backbone.forward = slow
    hs.pp.embed(sdata, enc, batch_size=8, checkpoint_dir=sys.argv[1], progress=False)
    print("FINISHED")
    """
)


def test_sigkill_then_resume_recomputes_only_unfinished_batches(tmp_path):
    ck = tmp_path / "ck"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with subprocess.Popen(  # the context closes the pipes
        [sys.executable, str(script), str(ck)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        deadline = time.monotonic() + 120
        try:
            while len(list(ck.glob("emb_*.npz"))) < 3:
                assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
                assert time.monotonic() < deadline, "child never wrote 3 batches"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    n_batches = 96 // 8
    finished = len(list(ck.glob("emb_*.npz")))
    assert 3 <= finished < n_batches  # killed mid-run

    sdata = hs.datasets.synthetic_visium(n_spots=96, seed=5)
    enc = models.create(FAST)
    calls = []
    forward = enc.backbone.forward

    def counting(x):
        calls.append(len(x))
        return forward(x)

    enc.backbone.forward = counting
    hs.pp.embed(sdata, enc, batch_size=8, checkpoint_dir=ck, progress=False)
    assert len(calls) == n_batches - finished and sum(calls) == 96 - 8 * finished
    assert not list(Path(ck).glob("*.tmp"))

    fresh = hs.datasets.synthetic_visium(n_spots=96, seed=5)
    hs.pp.embed(fresh, FAST, batch_size=8, progress=False)
    np.testing.assert_allclose(
        sdata.tables["table"].obsm[f"X_{FAST}"], fresh.tables["table"].obsm[f"X_{FAST}"], rtol=1e-6, atol=1e-7
    )


def test_checkpoint_of_spots_placed_elsewhere_is_refused(tmp_path):
    """Same spot ids, model and patch size, but the spots sit elsewhere on the image (e.g. re-registered):
    the finished batches of the old run are embeddings of other tissue and must not be reused."""
    from spatialdata.transformations import Translation, set_transformation

    ck = tmp_path / "ck"
    sd = hs.datasets.synthetic_visium(n_spots=60, seed=1)
    hs.pp.embed(sd, FAST, checkpoint_dir=ck, batch_size=30, progress=False)
    old = sd.tables["table"].obsm[f"X_{FAST}"].copy()
    # shift the spots 100 µm (200 full-res px) to the right on the image
    set_transformation(sd.shapes["spots"], Translation([200.0], axes=("x",)), to_coordinate_system="global")
    fresh = hs.pp.embed(hs.pp.patches(sd, patch_size=56, target_mpp=2.0), FAST, progress=False)
    assert not np.allclose(fresh, old)  # other tissue, other embeddings
    with pytest.raises(ValueError, match="another run"):
        hs.pp.embed(sd, FAST, checkpoint_dir=ck, batch_size=30, overwrite=True, progress=False)
