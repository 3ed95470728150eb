"""Peak memory of ``hopt_st.io.read_hest`` on a synthetic 40k x 40k pyramidal slide.

Writes (in a child process, tile band by tile band, JPEG tiles) a 40,000 x 40,000 px pyramidal BigTIFF plus
matching ``st/`` and ``metadata/`` files into a temporary HEST folder, then, in fresh processes, reads it with
``read_hest``, touches a few windows (level-0 patches, a 2048 px window of level 2, the whole coarsest level)
and prints the peak resident memory (ru_maxrss). Two readers are measured, interleaved for ``--rounds`` rounds
(a fresh process each time): after ``import hopt_st`` (which also imports scanpy, spatialdata, ... for the other
sub-packages) and after importing only the reader modules. The baseline is each process's RSS right after its
imports, measured in the same process; the slide's decoded size is printed for comparison.

Usage::

    python benchmarks/read_hest_memory.py [--size 40000] [--rounds 3] [--keep DIR]
    python benchmarks/read_hest_memory.py --smoke      # a 2048 px slide, one round (for the test suite)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import interleave, load, peak_rss_mb, summary  # noqa: E402

LIMIT_MB = 500.0


def write_slide(root: Path, size: int, seed: int = 0) -> str:
    """Write wsis/, st/, metadata/ for sample 'BIG' (run in a child process)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    from scipy import sparse

    from hopt_st.datasets import synthetic_visium, write_pyramidal_tiff

    mpp = 0.5
    sd = synthetic_visium(n_spots=120, image_mpp=mpp, seed=seed, n_genes=10)
    tex = np.ascontiguousarray(np.asarray(sd.images["he"].data.compute()).transpose(1, 2, 0))
    th, tw = tex.shape[:2]

    def tile_fn(y0, x0, h, w):
        rows = (y0 + np.arange(h)) % th
        cols = (x0 + np.arange(w)) % tw
        return tex[rows][:, cols]

    for sub in ("wsis", "st", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_pyramidal_tiff(
        root / "wsis" / "BIG.tif", shape=(size, size), tile_fn=tile_fn, mpp=mpp, compression="jpeg"
    )
    t_write = time.perf_counter() - t0
    # spots on a 100 µm hexagonal grid over the slide
    step = 100 / mpp
    ys = np.arange(step, size - step, step * np.sqrt(3) / 2)
    xy = np.array(
        [(x + (i % 2) * step / 2, y) for i, y in enumerate(ys) for x in np.arange(step, size - step, step)]
    )
    rng = np.random.default_rng(seed)
    n = len(xy)
    obs = pd.DataFrame(
        {"pxl_col_in_fullres": xy[:, 0], "pxl_row_in_fullres": xy[:, 1]},
        index=[f"B{i:06d}-1" for i in range(n)],
    )
    a = ad.AnnData(sparse.csr_matrix(rng.poisson(2.0, (n, 50)).astype(np.float32)), obs=obs)
    a.var_names = [f"G{i}" for i in range(50)]
    a.obsm["spatial"] = xy
    a.write_h5ad(root / "st" / "BIG.h5ad")
    meta = {
        "pixel_size_um_estimated": mpp,
        "st_technology": "Visium",
        "patient": "P0",
        "organ": "Synthetic",
        "oncotree_code": "SYN",
        "spot_diameter": 55.0,
        "inter_spot_dist": 100.0,
    }
    (root / "metadata" / "BIG.json").write_text(json.dumps(meta))
    return f"wrote {size} x {size} px slide, {n} spots in {t_write:.1f} s ({(root / 'wsis' / 'BIG.tif').stat().st_size / 1e6:.0f} MB on disk)"


def _lean_import() -> None:
    """Import hopt_st.io's reader modules without running the package __init__ files (no torch/scanpy)."""
    import types

    here = Path(__file__).resolve().parents[1] / "hopt_st"
    for name, path in (("hopt_st", here), ("hopt_st.io", here / "io")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod


def read_and_touch(root: Path, size: int, lean: bool) -> None:
    """Child process: import, read_hest, touch windows, print the figures."""
    import numpy as np

    if lean:
        _lean_import()
        from hopt_st.io._hest import read_hest
    else:
        import hopt_st  # noqa: F401  (the baseline includes the package's own imports)
        from hopt_st.io import read_hest

    label = "lean import (hopt_st.io._hest only)" if lean else "full import (import hopt_st)"
    base = peak_rss_mb()
    t0 = time.perf_counter()
    sd = read_hest(root, "BIG")
    t_open = time.perf_counter() - t0
    after_open = peak_rss_mb()
    img = sd.images["he"]
    levels = list(img.children)
    lvl0 = img["scale0"]["image"].data
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    means = []
    for _ in range(20):
        y, x = rng.integers(0, size - 224, 2)
        means.append(float(lvl0[:, y : y + 224, x : x + 224].compute().mean()))
    win = img["scale2"]["image"].data[:, 1000:3048, 1000:3048].compute()
    coarse = img[levels[-1]]["image"].data.compute()
    t_touch = time.perf_counter() - t0
    peak = peak_rss_mb()
    decoded_mb = 3 * size * size / 2**20
    print(f"[{label}]")
    print(f"  levels: {[tuple(img[k]['image'].shape[1:]) for k in levels]}")
    print(
        f"  read_hest open: {t_open * 1000:.0f} ms; touched 20 level-0 patches, a {win.shape[1]} px level-2 "
        f"window and the whole coarsest level {coarse.shape[1:]} in {t_touch:.1f} s (mean pixel {np.mean(means):.0f})"
    )
    print(f"  RSS after imports (baseline): {base:.0f} MB")
    print(f"  peak RSS after read_hest: {after_open:.0f} MB; after touching windows: {peak:.0f} MB")
    print(
        f"  read_hest + windows add {peak - base:.0f} MB over the baseline; level 0 decoded would be "
        f"{decoded_mb:.0f} MB ({decoded_mb / max(peak - base, 1):.0f}x more)"
    )
    verdict = "PASS" if peak < LIMIT_MB else ("PASS (increment)" if peak - base < LIMIT_MB else "FAIL")
    print(f"  peak {peak:.0f} MB vs limit {LIMIT_MB:.0f} MB: {verdict}")
    print(
        json.dumps(
            {"peak_rss_mb": peak, "baseline_mb": base, "increment_mb": peak - base, "open_ms": t_open * 1000}
        )
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=40_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--keep", type=Path, default=None, help="write the slide here and keep it (reused if present)"
    )
    p.add_argument("--smoke", action="store_true", help="a 2048 px slide, one round (for the test suite)")
    p.add_argument("--_write", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_read", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_lean", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.rounds = 2048, 1
    if args._write is not None:
        print(write_slide(args._write, args.size))
        return
    if args._read is not None:
        read_and_touch(args._read, args.size, args._lean)
        return

    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(tmp.name) if tmp else args.keep
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "wsis" / "BIG.tif").is_file() and args.smoke:  # small: written in this process
        print(write_slide(root, args.size))
    elif not (root / "wsis" / "BIG.tif").is_file():
        out = subprocess.run(
            [sys.executable, __file__, "--size", str(args.size), "--_write", str(root)],
            check=True,
            capture_output=True,
            text=True,
        )
        print(out.stdout.strip().splitlines()[-1])
    print(f"{args.rounds} interleaved rounds, each reader in a fresh process; {load()}")
    shown = set()

    def reader(lean: bool):
        def run() -> dict:
            cmd = [sys.executable, __file__, "--size", str(args.size), "--_read", str(root)] + (
                ["--_lean"] if lean else []
            )
            lines = (
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
            )
            if lean not in shown:  # the details once per reader
                shown.add(lean)
                print("\n".join(lines[:-1]))
            return json.loads(lines[-1])

        return run

    res = interleave(
        {"full import (import hopt_st)": reader(False), "lean import (hopt_st.io._hest only)": reader(True)},
        args.rounds,
    )
    print(f"summary ({load()}):")
    summary(res, "peak_rss_mb", "full import (import hopt_st)", unit="MB peak RSS", higher_is_better=False)
    rows = summary(
        res,
        "increment_mb",
        "full import (import hopt_st)",
        unit="MB over the imports",
        higher_is_better=False,
    )
    worst = max(r["max"] for r in rows.values())
    print(
        f"read_hest + windows add at most {worst:.0f} MB over the imports (limit {LIMIT_MB:.0f} MB: {'PASS' if worst < LIMIT_MB else 'FAIL'})"
    )
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
