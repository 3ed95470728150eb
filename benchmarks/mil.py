"""Slide-level MIL: training speed and peak memory on bags read from files, and the synthetic known answers.

Speed (default): ``--bags`` embedding files of ``--tiles`` x ``--dim`` float32 (HEST's layout, as
``embed_cohort`` writes them; 10,000 x 1,536 = 61 MB each) are written to a temporary folder. Rounds interleave,
each side in a fresh process (so each peak RSS is its own):

* ``meanpool`` (the baseline): fit :class:`hopt_st.tl.MeanPoolMIL` (every bag read once, its mean kept);
* ``abmil``: ``--steps`` training steps of :class:`hopt_st.tl.ABMIL` (one bag read from its file per step).

Prints bags/s (bags consumed per second of training) and peak RSS per side, the per-round ratio ABMIL /
mean pooling, and the size of all bags together (what a reader that loads the cohort would hold).

Known answers (``--known-answers``): :func:`hopt_st.datasets.synthetic_mil_cohort` (80 slides, 40 patients) through
the protocol (5 patient folds; learning rate and steps chosen by 5-fold CV inside each training set), for the
localised label, the global label and permuted localised labels; prints the AUC of ABMIL and mean pooling and
the share of ABMIL's attention inside the planted patch.

    python benchmarks/mil.py [--rounds 3] [--bags 8] [--tiles 10000] [--dim 1536] [--steps 16] [--device cpu]
    python benchmarks/mil.py --known-answers
    python benchmarks/mil.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_cmd, interleave, load, peak_rss_mb, ratio, run_json, summary  # noqa: E402


def _write_bags(folder: Path, n: int, tiles: int, dim: int) -> list[Path]:
    from hopt_st.io import write_embeddings

    rng = np.random.default_rng(0)
    paths = []
    for slide in range(n):
        emb = rng.standard_normal((tiles, dim), dtype=np.float32)
        coords = np.column_stack([np.arange(tiles) % 100, np.arange(tiles) // 100]) * 224
        p = folder / "bench" / f"slide{slide:03d}.h5"
        prov = {"model": "bench", "weights_sha256": "none", "mpp": 0.5, "patch_size": 224}
        write_embeddings(p, emb, [f"t{j}" for j in range(tiles)], coords=coords, provenance=prov)
        paths.append(p)
    return paths


def _child(side: str, folder: str, steps: int, device: str) -> dict:
    """One side in this (fresh) process; prints one JSON line."""
    import sklearn.linear_model  # noqa: F401 - imports are not what is timed
    import torch

    import hopt_st as hs

    paths = sorted(Path(folder).glob("bench/*.h5"))
    bags = hs.io.Bags(paths)
    y = np.arange(len(bags)) % 2
    base = peak_rss_mb()
    t0 = time.perf_counter()
    if side == "meanpool":
        hs.tl.MeanPoolMIL().fit(bags, y)
        n = len(bags)
    else:
        hs.tl.ABMIL(lr=1e-4, steps=steps, device=device).fit(bags, y)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        n = steps + len(bags)  # training steps + the one pass of the input standardisation
    dt = time.perf_counter() - t0
    peak = peak_rss_mb()
    return {
        "bags_per_s": n / dt,
        "seconds": dt,
        "peak_rss_mb": peak,
        "rss_before_mb": base,
        "peak_added_mb": peak - base,
    }


def speed(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="hopt_st_mil_bench_") as tmp:
        t0 = time.perf_counter()
        paths = _write_bags(Path(tmp), args.bags, args.tiles, args.dim)
        total_mb = sum(p.stat().st_size for p in paths) / 2**20
        print(
            f"{args.bags} bags of {args.tiles} tiles x {args.dim} dims (float32 files, {total_mb:.0f} MB in all, "
            f"{total_mb / args.bags:.0f} MB each) written in {time.perf_counter() - t0:.1f} s; {load()}",
            flush=True,
        )
        script = str(Path(__file__).resolve())

        def side(name):
            return lambda: run_json(
                child_cmd(
                    script, "--child", name, "--dir", tmp, "--steps", args.steps, "--device", args.device
                )
            )

        res = interleave({"meanpool": side("meanpool"), "abmil": side("abmil")}, args.rounds)
        print(f"\nABMIL ({args.steps} steps, {args.device}) vs mean pooling, {args.rounds} rounds:")
        rows = summary(res, "bags_per_s", "meanpool", unit="bags/s")
        summary(res, "peak_rss_mb", "meanpool", unit="MB", higher_is_better=False)
        summary(res, "peak_added_mb", "meanpool", unit="MB above the imports", higher_is_better=False)
        r = ratio(res, "bags_per_s", "abmil", "meanpool")
        added = max(m["peak_added_mb"] for ms in res.values() for m in ms)
        print(
            f"  largest peak above the imports {added:.0f} MB with {args.bags} bags ({total_mb:.0f} MB in all); "
            "bags are read one at a time, so it does not grow with --bags"
        )
        return {"bags_mb": total_mb, "rows": rows, "ratio": r, "results": res}


def known_answers(args) -> dict:
    import torch

    import hopt_st as hs
    from hopt_st.datasets._mil import planted_tiles
    from hopt_st.tl._mil_protocol import summarize

    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory(prefix="hopt_st_mil_known_") as tmp:
        n = 16 if args.smoke else 80
        labels = hs.datasets.synthetic_mil_cohort(tmp, n_slides=n, seed=0)
        bags = hs.io.Bags.from_cohort(tmp, "synthetic", labels)
        labels["permuted"] = np.random.default_rng(1).permutation(labels["localised"].to_numpy())
        grid = {"lrs": (1e-3,), "steps": (10,) if args.smoke else (100, 200, 400)}
        folds = {"n_splits": 2, "inner_splits": 2} if args.smoke else {"n_splits": 5, "inner_splits": 5}
        t0 = time.perf_counter()
        for target in ("localised",) if args.smoke else ("localised", "global", "permuted"):
            res = hs.tl.cross_validate_mil(
                bags, labels, target, mil=["abmil", "meanpool"], progress=False, **grid, **folds
            )
            s = summarize(res).set_index("mil")
            out[target] = {m: float(s.loc[m, "score_mean"]) for m in ("abmil", "meanpool")}
            print(
                f"  {target:9s} AUC (mean of {len(s) and int(s['n_folds'].iloc[0])} patient folds): "
                f"ABMIL {out[target]['abmil']:.3f}  mean pooling {out[target]['meanpool']:.3f}",
                flush=True,
            )
        # attention: one ABMIL per outer fold of the localised label, on its test slides
        y = labels["localised"].to_numpy()
        planted = planted_tiles(tmp)
        folds_ = hs.tl._mil_protocol.patient_folds(y, labels["patient"], folds["n_splits"], 0, "binary")
        shares, areas = [], []
        for train, test in folds_:
            m = hs.tl.fit_mil(
                bags.subset(train), y[train], mil="abmil", n_splits=folds["inner_splits"], **grid
            )
            for i in test:
                if y[i]:
                    mask = planted[bags.sample_ids[i]]
                    shares.append(m.attention(bags[i])[mask].sum())
                    areas.append(mask.mean())
        out["attention_share"], out["patch_area"] = float(np.mean(shares)), float(np.mean(areas))
        print(
            f"  attention inside the planted patch (positive test slides): {out['attention_share']:.3f} of the mass "
            f"on {out['patch_area']:.3f} of the tissue ({out['attention_share'] / out['patch_area']:.0f}x its area); "
            f"{time.perf_counter() - t0:.0f} s"
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bags", type=int, default=8)
    ap.add_argument("--tiles", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--known-answers", action="store_true", help="the synthetic known answers instead of speed"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny inputs: checks that every part runs")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.dir, args.steps, args.device)))
        return 0
    if args.smoke:
        args.rounds, args.bags, args.tiles, args.dim, args.steps = 1, 3, 200, 64, 4
    if args.known_answers:
        print("Synthetic cohort with planted labels, the slide-level protocol:")
        res = {"known_answers": known_answers(args)}
    else:
        res = {"speed": speed(args)}
        if args.smoke:
            print("Synthetic known answers (smoke):")
            res["known_answers"] = known_answers(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
