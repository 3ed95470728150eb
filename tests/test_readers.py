"""Reading patches in other threads and processes: TiffLevel, read order, Patches.dataloader, pp.embed's plan."""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel

import hopt_st as hs
from hopt_st._patchset import ArrayPatches, Patches
from hopt_st.datasets import write_pyramidal_tiff
from hopt_st.io._tiff import TiffLevel, read_tiff_image
from hopt_st.pp._engine import plan_readers
from hopt_st.pp._geometry import spatial_order

MPP = 0.5


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 1500 x 1800 px JPEG pyramidal TIFF (128 px tiles) and its level 0 as tifffile decodes it."""
    rng = np.random.default_rng(0)
    img = np.clip(
        np.cumsum(rng.integers(-4, 5, (1500, 1800, 3)), axis=1) // 4 + rng.integers(60, 200, (1500, 1, 3)),
        0,
        255,
    ).astype(np.uint8)
    path = write_pyramidal_tiff(
        tmp_path_factory.mktemp("slide") / "s.tif", img, mpp=MPP, tile=128, n_levels=2
    )
    return path, tifffile.imread(path)


def _sdata(path, n=120, seed=0):
    """Spots scattered over the slide in shuffled table order."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(100, 1400, (n, 2))
    ids = pd.Index([f"s{i:04d}" for i in range(n)])
    shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(n, 20.0), index=ids)
    obs = pd.DataFrame({"region": pd.Categorical(["spots"] * n), "spot_id": ids.to_numpy()}, index=ids)
    table = TableModel.parse(
        ad.AnnData(np.zeros((n, 1), np.float32), obs=obs),
        region="spots",
        region_key="region",
        instance_key="spot_id",
    )
    table.uns["hopt_st"] = {"image_mpp": {"he": MPP}, "fullres_mpp": MPP}
    return SpatialData(
        images={"he": read_tiff_image(path)}, shapes={"spots": shapes}, tables={"table": table}
    )


def _windows(level: TiffLevel, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(40):
        y, x = rng.integers(0, 1400, 2)
        out.append(level[y : y + 100, x : x + 90])
    return out


_SHARED: dict = {}


def _read_in_child(seed: int) -> list[np.ndarray]:
    return _windows(_SHARED["level"], seed)


def test_tiff_level_reads_like_tifffile_pickles_and_is_fork_safe(slide):
    path, full = slide
    level = TiffLevel(path)
    assert level.shape == full.shape and level.chunks == (128, 128, 3) and level.dtype == np.uint8
    for key in [
        np.s_[10:300, 5:700],
        np.s_[-7:, -5:],
        np.s_[::3, 1::7, 1],
        np.s_[5, 3:9],
        np.s_[0:0],
        np.s_[..., 2],
    ]:
        np.testing.assert_array_equal(level[key], full[key])
    again = pickle.loads(pickle.dumps(level))  # holds a path, not an open file
    np.testing.assert_array_equal(again[100:260, 300:520], full[100:260, 300:520])
    # forked children inherit the parent's open file and read concurrently: each opens its own
    _SHARED["level"] = level
    expected = [_windows(level, seed) for seed in range(4)]
    if "fork" in mp.get_all_start_methods():
        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map(_read_in_child, range(4))
        for a, b in zip(got, expected):
            for wa, wb in zip(a, b):
                np.testing.assert_array_equal(wa, wb)
    np.testing.assert_array_equal(level[:50, :50], full[:50, :50])  # the parent's handle still reads


def test_tiff_level_refuses_a_changed_file(slide, tmp_path):
    path, full = slide
    copy = tmp_path / "c.tif"
    copy.write_bytes(path.read_bytes())
    level = TiffLevel(copy)
    clone = pickle.loads(pickle.dumps(level))
    tifffile.imwrite(copy, full[:100, :100])
    with pytest.raises(ValueError, match="changed on disk"):
        clone[:10, :10]


def test_read_order_is_spatial_and_results_come_back_in_table_order(slide):
    path, _ = slide
    p = hs.pp.patches(_sdata(path), patch_size=32, target_mpp=1.0)
    order = p.read_order()
    assert sorted(order.tolist()) == list(range(len(p)))
    boxes = p._boxes.astype(float)
    step = lambda o: np.hypot(*np.diff(boxes[o], axis=0).T).mean()  # noqa: E731
    assert step(order) < step(np.arange(len(p))) / 3  # neighbours follow each other
    ref = np.stack([p[i] for i in range(len(p))])  # one at a time, table order
    np.testing.assert_array_equal(p.to_numpy(), ref)
    np.testing.assert_array_equal(
        p.read_order([7, 3, 50]), np.array([7, 3, 50])[spatial_order(boxes[[7, 3, 50]], 64)]
    )
    # Morton order visits 2x2 blocks of cells before moving on
    cells = np.array([[y, x] for y in range(4) for x in range(4)]) * 10.0
    np.testing.assert_array_equal(spatial_order(cells, 10)[:4], [0, 1, 4, 5])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_in_processes_gives_the_same_patches(slide, context):
    if context not in mp.get_all_start_methods():
        pytest.skip(f"no {context} start method here")
    path, _ = slide
    p = hs.pp.patches(_sdata(path), patch_size=32, target_mpp=1.0)
    ref = p.to_numpy()
    n_workers = 2 if context == "fork" else 1  # a spawned worker imports hopt_st and torch: one is enough
    loader = p.dataloader(16, num_workers=n_workers, multiprocessing_context=context)
    assert loader.pin_memory == torch.cuda.is_available()
    for _ in range(2):  # persistent workers serve a second pass
        got = np.zeros_like(ref)
        seen = []
        for idx, batch in loader:
            assert idx.dtype == torch.int64 and batch.dtype == torch.uint8
            got[idx.numpy()] = batch.numpy()
            seen.append(idx.numpy())
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(len(p)))
    # each worker reads one contiguous run of the Morton-ordered batches
    chunks = np.array_split(p.read_order(), range(16, len(p), 16))
    first = [np.flatnonzero([np.array_equal(s, c) for c in chunks])[0] for s in seen]
    runs = np.array_split(np.arange(len(chunks)), n_workers)
    assert sorted(first[k] for k in range(0, len(first), n_workers)) == list(runs[0])


def test_embed_reads_inline_in_threads_or_processes_with_the_same_result(slide, caplog, tiny_vit_spec):
    path, _ = slide
    sd = _sdata(path, n=40)
    enc = hs.models.create(tiny_vit_spec("tiny-readers", embed_dim=32), pretrained=False)
    with caplog.at_level(logging.INFO, logger="hopt_st"):
        ref = hs.pp.embed(sd, enc, key_added="X_inline", batch_size=8, progress=False)
    assert any("in the computing thread" in r.getMessage() for r in caplog.records)
    emb = sd.tables["table"].obsm["X_inline"]
    for workers, n in (("threads", 2), ("processes", 2)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hopt_st"):
            hs.pp.embed(
                sd,
                enc,
                key_added=f"X_{workers}",
                batch_size=8,
                workers=workers,
                num_workers=n,
                progress=False,
            )
        assert any(
            f"with 2 {'worker processes' if workers == 'processes' else 'threads'}" in r.getMessage()
            for r in caplog.records
        )
        np.testing.assert_allclose(sd.tables["table"].obsm[f"X_{workers}"], emb, rtol=1e-5, atol=1e-6)
    assert ref is None
    with pytest.raises(ValueError, match="workers must be one of"):
        hs.pp.embed(sd, enc, key_added="X_bad", workers="fibres", progress=False)


def test_plan_readers_sizes_readers_and_torch_threads_together(monkeypatch):
    import hopt_st.pp._engine as engine

    monkeypatch.setattr(engine, "available_cores", lambda: 16)
    arr = ArrayPatches(np.zeros((4, 8, 8, 3), np.uint8))

    class Sliced(Patches):  # stands for patches cut from an image
        def _read(self, idx):
            return np.zeros((len(idx), 8, 8, 3), np.uint8)

    sliced = Sliced(np.arange(4).astype(str), None, 8, None, None)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    t = torch.get_num_threads()
    assert plan_readers(sliced, cpu, None, "auto") == ("inline", 0, min(t, 16))
    assert plan_readers(sliced, cpu, 3, "auto") == ("threads", 3, min(t, 13))
    assert plan_readers(sliced, cuda, None, "auto") == ("processes", 15, 1)
    assert plan_readers(arr, cuda, None, "auto") == ("threads", 15, 1)  # in memory: no processes
    assert plan_readers(sliced, cuda, 4, "threads") == ("threads", 4, min(t, 12))
    assert plan_readers(sliced, cpu, None, "processes") == ("processes", 15, 1)
    monkeypatch.setattr(engine, "available_cores", lambda: 64)
    assert plan_readers(sliced, cuda, None, "auto")[1] == 16  # at most 16 readers by default
    with pytest.raises(ValueError, match="num_workers"):
        plan_readers(sliced, cpu, -1, "auto")

    class NotPatches:
        def iter_batches(self, *a, **k):
            yield from ()

    with pytest.raises(ValueError, match="Patches source"):
        plan_readers(NotPatches(), cpu, 2, "processes")
