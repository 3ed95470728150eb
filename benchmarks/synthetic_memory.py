"""Peak memory of ``hopt_st.datasets.synthetic_visium`` (the image is rendered band by band).

Each round builds the sample in a fresh process (so that its peak resident memory, ``ru_maxrss``, is the
build's own) and reports, against baselines measured in that same process: the RSS right after the imports,
and the size of the uint8 image it returns (level 0 plus the coarser levels, all held in memory). Prints per
round the peak RSS, the build's own increase (peak - imports), that increase over the image's size and the build
time; then min / median over ``--rounds`` rounds and whether the peak stays under 2 GB.

Usage::

    python benchmarks/synthetic_memory.py [--n-spots 2000] [--rounds 3]
    python benchmarks/synthetic_memory.py --smoke      # 100 spots, one round (for the test suite)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import peak_rss_mb, rss_now_mb  # noqa: E402

LIMIT_MB = 2000.0


def _child(n_spots: int, seed: int) -> None:
    """Build one sample; print one JSON line."""
    from hopt_st.datasets import synthetic_visium

    imports_mb = rss_now_mb()
    t0 = time.perf_counter()
    sdata = synthetic_visium(n_spots=n_spots, seed=seed)
    dt = time.perf_counter() - t0
    img = sdata.images["he"]
    levels = [img[k]["image"] for k in img] if hasattr(img, "children") else [img]
    image_mb = sum(lv.data.nbytes for lv in levels) / 2**20
    shape = tuple(int(s) for s in levels[0].shape)
    peak = peak_rss_mb()
    print(
        json.dumps(
            {
                "imports_mb": imports_mb,
                "peak_mb": peak,
                "image_mb": image_mb,
                "shape": shape,
                "n_obs": int(sdata.tables["table"].n_obs),
                "seconds": dt,
            }
        )
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-spots", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="100 spots, one round (for the test suite)")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.n_spots, args.rounds = 100, 1
    if args._child:
        _child(args.n_spots, seed=0)
        return 0
    print(
        f"synthetic_visium(n_spots={args.n_spots}): {args.rounds} rounds, each in a fresh process "
        f"(load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    rows = []
    for r in range(args.rounds):
        res = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--_child", "--n-spots", str(args.n_spots)],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode:
            print(res.stderr[-4000:], file=sys.stderr)
            return 1
        m = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(m)
        own = m["peak_mb"] - m["imports_mb"]
        print(
            f"  round {r + 1}/{args.rounds}: image {m['shape'][2]} x {m['shape'][1]} px ({m['image_mb']:.0f} MB "
            f"uint8, all levels), {m['n_obs']} spots; RSS after imports {m['imports_mb']:.0f} MB, peak "
            f"{m['peak_mb']:.0f} MB (build's own {own:.0f} MB = {own / m['image_mb']:.2f}x the image); "
            f"{m['seconds']:.1f} s"
        )
    peaks = sorted(m["peak_mb"] for m in rows)
    over = sorted((m["peak_mb"] - m["imports_mb"]) / m["image_mb"] for m in rows)
    secs = sorted(m["seconds"] for m in rows)
    med = len(rows) // 2
    worst = peaks[-1]
    print(
        f"peak RSS min {peaks[0]:.0f} / median {peaks[med]:.0f} / max {worst:.0f} MB; build's own memory over "
        f"the image's size min {over[0]:.2f}x / median {over[med]:.2f}x; build min {secs[0]:.1f} s / median "
        f"{secs[med]:.1f} s; limit {LIMIT_MB:,.0f} MB: {'PASS' if worst < LIMIT_MB else 'FAIL'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
