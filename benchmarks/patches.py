"""Benchmark: spot patches from a JPEG-compressed pyramidal TIFF, hopt_st vs spatialdata's ImageTilesDataset.

Writes synthetic H&E-like pyramidal TIFFs (tile by tile, memory-bounded) in a temporary folder, opens them
lazily with hopt_st's TIFF reader, places spots on a jittered grid in shuffled (barcode-like) table order, and
measures, each in a fresh subprocess so that peak RSS is the reader's own:

* tiles/s of ``hopt_st.pp.patches(...).iter_batches`` (224 px at 0.5 µm/px from a 0.25 µm/px slide) and of
  ``spatialdata.dataloader.ImageTilesDataset`` producing the same crops (448 px tile at full resolution, 2x2
  mean to 224 px), on a sample of the same spots; the ratio is printed;
* tiles per CPU-second (per core) of hopt_st with one reading thread and with ``--workers`` threads;
* peak RSS while cutting patches from a larger slide (``--big``, 40k x 40k by default; written from a pool
  of pre-encoded JPEG tiles so that it takes seconds, see :func:`make_tiff_fast`).

Usage::

    python benchmarks/patches.py                      # 20k and 40k slides, ~5,000 spots each
    python benchmarks/patches.py --size 8000 --big 0  # quick run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MPP = 0.25


def _texture(seed: int = 0, side: int = 2048) -> np.ndarray:
    """A periodic H&E-like texture: pink stroma with purple nuclei-sized blobs and fine noise."""
    rng = np.random.default_rng(seed)
    low = rng.random((side // 16, side // 16))
    low = np.repeat(np.repeat(low, 16, axis=0), 16, axis=1)
    nuclei = (rng.random((side // 8, side // 8)) > 0.9).astype(np.float32)
    nuclei = np.repeat(np.repeat(nuclei, 8, axis=0), 8, axis=1)
    noise = rng.normal(0, 6, (side, side))
    r = 230 - 40 * low - 110 * nuclei + noise
    g = 170 - 60 * low - 100 * nuclei + noise
    b = 210 - 20 * low - 40 * nuclei + noise
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def make_tiff(path: Path, side: int) -> Path:
    from hopt_st.datasets import write_pyramidal_tiff

    tex = _texture()
    t = tex.shape[0]

    def tile_fn(y0, x0, h, w):
        ys = (np.arange(y0, y0 + h) * 7 // 5) % t  # non-periodic at the spot spacing
        xs = (np.arange(x0, x0 + w) + y0 // 97) % t
        return tex[ys][:, xs]

    return write_pyramidal_tiff(path, shape=(side, side), tile_fn=tile_fn, mpp=MPP, tile=256)


def make_tiff_fast(path: Path, side: int, tile: int = 256, pool: int = 61) -> Path:
    """A large JPEG pyramidal TIFF written in seconds: each level is a mosaic of ``pool`` distinct tiles,
    JPEG-encoded once and written as pre-compressed tiles (reading still decodes every tile). Levels are
    not downsamples of each other, so this slide serves throughput and memory figures only."""
    import imagecodecs
    import tifffile

    tex = _texture(seed=1)
    rng = np.random.default_rng(1)
    shapes = [(side, side)]
    while min(shapes[-1]) // 2 >= 512:
        shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))

    def encoded(level: int) -> list[bytes]:
        t = tex[:: 2**level, :: 2**level] if 2**level < tex.shape[0] // tile else tex
        out = []
        for _ in range(pool):
            y, x = rng.integers(0, t.shape[0] - tile), rng.integers(0, t.shape[1] - tile)
            out.append(imagecodecs.jpeg_encode(np.ascontiguousarray(t[y : y + tile, x : x + tile]), level=90))
        return out

    def tiles(level: int, h: int, w: int):
        enc = encoded(level)
        for i in range(-(-h // tile)):
            for j in range(-(-w // tile)):
                yield enc[(i * 31 + j * 17) % pool]

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for level, (h, w) in enumerate(shapes):
            opts = dict(
                shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression="jpeg"
            )
            if level == 0:
                opts["subifds"] = len(shapes) - 1
            else:
                opts["subfiletype"] = 1
            tw.write(tiles(level, h, w), **opts)
    return path


def make_sdata(tiff: Path, n_spots: int, seed: int = 0):
    import anndata as ad
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    from hopt_st.io._tiff import read_tiff_image

    image = read_tiff_image(tiff)
    side = int(next(iter(image["scale0"].ds.data_vars.values())).sizes["x"])
    k = int(np.ceil(np.sqrt(n_spots)))
    step = (side - 1000) / k
    g = 500 + step * (np.arange(k) + 0.5)
    rng = np.random.default_rng(seed)
    xy = np.array([(x, y) for y in g for x in g])[:n_spots] + rng.uniform(-20, 20, (min(n_spots, k * k), 2))
    xy = xy[rng.permutation(len(xy))]  # shuffled, like barcode order
    ids = pd.Index([f"spot{i}" for i in range(len(xy))])
    shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), 110.0), index=ids)
    obs = pd.DataFrame({"region": pd.Categorical(["spots"] * len(xy)), "spot_id": ids.to_numpy()}, index=ids)
    table = TableModel.parse(
        ad.AnnData(np.zeros((len(xy), 1), np.float32), obs=obs),
        region="spots",
        region_key="region",
        instance_key="spot_id",
    )
    table.uns["hopt_st"] = {"image_mpp": {"he": MPP}, "fullres_mpp": MPP}
    return SpatialData(images={"he": image}, shapes={"spots": shapes}, tables={"table": table})


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(args) -> dict:
    import hopt_st

    sdata = make_sdata(Path(args.tiff), args.spots)
    out: dict = {"n_spots": len(sdata.tables["table"])}
    if args.mode == "ours":
        t0, c0 = time.perf_counter(), _cpu()
        p = hopt_st.pp.patches(sdata, patch_size=224, target_mpp=0.5)
        n, checksum = 0, 0
        for _, batch in p.iter_batches(64, num_workers=args.workers):
            n += len(batch)
            checksum += int(batch[:, 112, 112].sum())
        out.update(n=n, wall=time.perf_counter() - t0, cpu=_cpu() - c0, checksum=checksum)
        if args.sample:
            out["sample"] = p[np.arange(args.sample)].tolist()
    else:
        from spatialdata.dataloader import ImageTilesDataset

        ds = ImageTilesDataset(
            sdata,
            regions_to_images={"spots": "he"},
            regions_to_coordinate_systems={"spots": "global"},
            tile_dim_in_units=224 * 0.5 / MPP,
            table_name="table",
        )
        _ = ds[0]  # warm-up
        t0, c0 = time.perf_counter(), _cpu()
        tiles = []
        for i in range(args.n_baseline):
            tile = ds[i].images["he"]
            arr = np.asarray(tile.data if not hasattr(tile.data, "compute") else tile.data.compute())
            arr = np.moveaxis(arr, 0, -1)[:448, :448]
            h, w = arr.shape[0] // 2 * 2, arr.shape[1] // 2 * 2
            small = arr[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.float32).mean(axis=(1, 3))
            tiles.append(np.floor(small + 0.5).astype(np.uint8))
        out.update(n=args.n_baseline, wall=time.perf_counter() - t0, cpu=_cpu() - c0)
        if args.sample:
            out["sample"] = [t.tolist() for t in tiles[: args.sample]]
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_child(
    tiff: Path, mode: str, spots: int, workers: int = 1, n_baseline: int = 0, sample: int = 0
) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--tiff", str(tiff), "--spots", str(spots)]
    cmd += ["--workers", str(workers), "--n-baseline", str(n_baseline), "--sample", str(sample)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size", type=int, default=20000, help="side of the main slide in px (0.25 µm/px); 0 to skip"
    )
    ap.add_argument("--spots", type=int, default=5000)
    ap.add_argument("--big", type=int, default=40000, help="side of the RSS slide in px; 0 to skip")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n-baseline", type=int, default=100, help="tiles timed for ImageTilesDataset")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tiff", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sample", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        if args.size:
            t0 = time.perf_counter()
            tiff = make_tiff(tmp / "slide.tif", args.size)
            print(
                f"wrote {args.size} x {args.size} px JPEG pyramidal TIFF ({tiff.stat().st_size / 2**20:.0f} MiB) "
                f"in {time.perf_counter() - t0:.0f} s"
            )
            base = run_child(tiff, "baseline", args.spots, n_baseline=args.n_baseline, sample=8)
            one = run_child(tiff, "ours", args.spots, workers=1, sample=8)
            many = run_child(tiff, "ours", args.spots, workers=args.workers)
            b = base["n"] / base["wall"]
            o1, om = one["n"] / one["wall"], many["n"] / many["wall"]
            bs, os_ = np.array(base["sample"], float), np.array(one["sample"], float)
            same = np.abs(bs - os_)
            shifts = {
                (dy, dx): np.abs(
                    os_[:, 12 + dy : 212 + dy, 12 + dx : 212 + dx] - bs[:, 12:212, 12:212]
                ).mean()
                for dy in range(-2, 3)
                for dx in range(-2, 3)
            }
            best = min(shifts, key=shifts.get)
            print(f"spots: {one['n_spots']}, 224 px patches at 0.5 µm/px (level 1 of the pyramid)")
            print(f"ImageTilesDataset: {b:8.1f} tiles/s ({base['n']} tiles, 1 process)")
            print(f"hopt_st 1 thread : {o1:8.1f} tiles/s  = {o1 / b:6.1f}x ImageTilesDataset")
            print(f"hopt_st {args.workers} threads: {om:8.1f} tiles/s  = {om / b:6.1f}x ImageTilesDataset")
            print(
                f"tiles per CPU-second (per core): hopt_st {one['n'] / one['cpu']:.0f} (1 thread), "
                f"{many['n'] / many['cpu']:.0f} ({args.workers} threads); ImageTilesDataset {base['n'] / base['cpu']:.1f}"
            )
            print(
                f"same crops: mean |hopt_st - ImageTilesDataset| = {same.mean():.2f} grey levels over 8 patches "
                f"(level-1 JPEG vs 2x2 mean of level-0 JPEG); best-matching shift (dy, dx) = {best} px "
                f"({shifts[best]:.2f} vs {shifts[(0, 0)]:.2f} unshifted)"
            )
            print(f"peak RSS ({args.size} px slide): hopt_st {many['maxrss_mb']:.0f} MB")
            tiff.unlink()
        if args.big:
            t0 = time.perf_counter()
            big = make_tiff_fast(tmp / "big.tif", args.big)
            print(
                f"wrote {args.big} x {args.big} px JPEG pyramidal TIFF from pre-encoded tiles "
                f"({big.stat().st_size / 2**20:.0f} MiB) "
                f"in {time.perf_counter() - t0:.0f} s"
            )
            r = run_child(big, "ours", args.spots, workers=args.workers)
            print(
                f"peak RSS ({args.big} px slide, {r['n']} patches, {args.workers} threads): {r['maxrss_mb']:.0f} MB; "
                f"{r['n'] / r['wall']:.1f} tiles/s"
            )


if __name__ == "__main__":
    main()
