"""Benchmark: features for every 8 µm bin of a Visium HD capture area, token map vs one patch per bin.

The slide is a square of ``--area-mm`` mm (6.5 mm: a full Visium HD capture area, ~660,000 bins of 8 µm) at
0.5 µm/px, built lazily by tiling a rendered ``synthetic_visium_hd`` patch of tissue (a dask array: the image is
never held in memory, reading costs what decoding a chunk costs). Its 8 µm bins are squares in "micrometers".

* token map: ``pp.embed_tokens`` (one forward per 224 px tile on a half-tile lattice) + ``pp.token_features``
  for every bin;
* one patch per bin: ``pp.embed`` of a 224 px patch centred on each of ``--patch-bins`` random bins (all bins
  would take ~forever on a CPU); its time for the whole area is extrapolated from the measured patches/s.

The sides run interleaved for ``--rounds`` rounds (same encoder, batch size, device, threads). Printed per side:
forwards per mm² of tissue, tiles (or patches)/s, seconds for the whole area (extrapolated for the per-bin side),
and peak resident memory above the start of the side (sampled every 50 ms). The ratio per round is the per-bin
side's whole-area seconds over the token side's.

Run: ``python benchmarks/subspot.py [--area-mm 6.5] [--model bench-small-vit|handcrafted] [--rounds 2]
[--patch-bins 2000] [--device cuda]`` (``--smoke``: 0.4 mm, for the test suite).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import interleave, load, ratio, rss_now_mb, small_vit_spec, summary  # noqa: E402

import hopt_st as hs  # noqa: E402


class _PeakRSS:
    """Peak resident memory (MB) above the level at start, sampled in a thread."""

    def __enter__(self):
        self.base = self.peak = rss_now_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_now_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_now_mb())

    @property
    def mb(self) -> float:
        return self.peak - self.base


def build(area_mm: float, seed: int = 0):
    """A lazily tiled H&E of ``area_mm`` mm at 0.5 µm/px and its 8 µm bins as a table + squares."""
    import dask.array as da
    import geopandas as gpd
    import pandas as pd
    import shapely
    from anndata import AnnData
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    tile = hs.datasets.synthetic_visium_hd(512, 512, seed=seed, n_genes=4)
    base = np.asarray(tile.images["he"].data)  # (3, 1024, 1024)
    side_px = int(round(area_mm * 1000 / 0.5))
    reps = int(np.ceil(side_px / base.shape[1]))
    img = da.tile(da.from_array(base, chunks=(3, 1024, 1024)), (1, reps, reps))[:, :side_px, :side_px]
    he = Image2DModel.parse(
        img,
        dims=["c", "y", "x"],
        c_coords=["r", "g", "b"],
        transformations={"global": Identity(), "micrometers": Scale([0.5, 0.5], axes=("x", "y"))},
    )
    n = int(area_mm * 1000 // 8)
    row, col = np.divmod(np.arange(n * n), n)
    boxes = shapely.box(col * 16.0, row * 16.0, col * 16.0 + 16, row * 16.0 + 16)  # px at 0.5 µm/px
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=boxes),
        transformations={"global": Identity(), "micrometers": Scale([0.5, 0.5], axes=("x", "y"))},
    )
    obs = pd.DataFrame({"region": pd.Categorical(["bin_squares"] * len(row)), "bin_id": np.arange(len(row))})
    obs.index = obs.index.astype(str)
    table = AnnData(obs=obs)
    table.obsm["spatial"] = np.column_stack([(col + 0.5) * 16, (row + 0.5) * 16])
    table.uns["hopt_st"] = {"image_mpp": {"he": 0.5}, "fullres_mpp": 0.5}
    table = TableModel.parse(table, region="bin_squares", region_key="region", instance_key="bin_id")
    return SpatialData(images={"he": he}, shapes={"bin_squares": shapes}, tables={"bins": table})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--area-mm", type=float, default=6.5)
    p.add_argument("--model", default="bench-small-vit", help="bench-small-vit (random ViT) or handcrafted")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--patch-bins", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--n-components", type=int, default=256)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        a.area_mm, a.rounds, a.patch_bins, a.model = 0.256, 2, 16, "handcrafted"
    print(f"load {load()}; building a {a.area_mm} mm x {a.area_mm} mm slide (8 µm bins)")
    sdata = build(a.area_mm)
    n_bins = sdata.tables["bins"].n_obs
    area = a.area_mm**2
    if a.model == "bench-small-vit":
        model = hs.models.create(small_vit_spec(), pretrained=False, device=a.device)
    else:
        model = a.model
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(n_bins, min(a.patch_bins, n_bins), replace=False))
    sub = sdata.subset(["he", "bin_squares"])
    sub.tables["bins"] = sdata.tables["bins"][subset].copy()
    common = dict(batch_size=a.batch_size, device=a.device, progress=False)

    def tokens():
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            hs.pp.embed_tokens(
                sdata, model, key_added="tok", n_components=a.n_components, overwrite=True, **common
            )
            t_tok = time.perf_counter() - t0
            hs.pp.token_features(sdata, "tok", table_name="bins", key_added="X_tok", overwrite=True)
            dt = time.perf_counter() - t0
        n_tiles = sdata.attrs["hopt_st"]["token_maps"]["tok"]["n_tiles"]
        return {
            "forwards_per_mm2": n_tiles / area,
            "per_s": n_tiles / t_tok,
            "area_s": dt,
            "features_s": dt - t_tok,
            "peak_mb": mem.mb,
        }

    def per_bin():
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            hs.pp.embed(sub, model, table_name="bins", key_added="X_patch", overwrite=True, **common)
            dt = time.perf_counter() - t0
        return {
            "forwards_per_mm2": n_bins / area,
            "per_s": len(subset) / dt,
            "area_s": n_bins * dt / len(subset),
            "peak_mb": mem.mb,
        }

    print(f"{n_bins} bins of 8 µm; model {getattr(model, 'spec', None) and model.spec.name or model}")
    res = interleave({"token map": tokens, "one patch per bin": per_bin}, a.rounds)
    out = {
        "area_mm": a.area_mm,
        "n_bins": n_bins,
        "forwards_per_mm2": {k: v[0]["forwards_per_mm2"] for k, v in res.items()},
        "per_s": summary(res, "per_s", "one patch per bin", unit="forwards/s"),
        "area_s": summary(res, "area_s", "token map", unit="s (whole area)", higher_is_better=False),
        "peak_mb": {k: max(m["peak_mb"] for m in v) for k, v in res.items()},
    }
    print(f"forwards per mm²: {out['forwards_per_mm2']}")
    print(f"peak memory above start (MB): {out['peak_mb']}")
    out["speedup"] = ratio(res, "area_s", "one patch per bin", "token map")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
