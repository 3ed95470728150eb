"""Cohort benchmark: ``pp.embed_cohort`` on a Dask ``LocalCluster`` of 1 vs 2 worker processes.

Both clusters (one thread per worker, so one torch thread each) embed the same synthetic HEST-1k cohort
(``write_hest_layout(layout="hest1k")``) with the same small random-weight ViT read from a weights file, in
interleaved rounds; each round rewrites every sample (``overwrite=True``). Cluster start-up and the first
build of the encoder on each worker are not timed (a warm-up round). Prints samples/min and tiles/s per
cluster size (median over rounds, and the best round) and the ratio 2 workers / 1 worker, and checks that both
wrote bit-identical embeddings.

Run: ``python benchmarks/cohort.py [--samples 6] [--spots 120] [--rounds 3]``
(``--smoke``: 2 samples of 16 spots, a one-block ViT, one round, for the test suite). Its files live in a
temporary folder (``--workdir``: inside that folder), removed at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hopt_st as hs
from hopt_st import models

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import small_vit_spec  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--spots", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--smoke", action="store_true", help="2 small samples, one-block ViT, 1 round (test suite)"
    )
    ap.add_argument("--workdir", default=None, help="folder for the temporary files (default: system temp)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.samples, args.spots, args.rounds = 2, 16, 1
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="hopt_cohort_bench_", dir=args.workdir) as tmp:
        _bench(args, Path(tmp))
    return 0


def _bench(args, work: Path) -> None:
    from distributed import Client, LocalCluster
    from safetensors.torch import save_file

    hs.datasets.write_hest_layout(
        work / "hest", layout="hest1k", n_samples=args.samples, n_spots=args.spots, image_mpp=1.0
    )
    cohort = hs.io.read_cohort(work / "hest")
    depth = 1 if args.smoke else 4
    spec = small_vit_spec("bench-cohort-vit", size=112, mpp=1.0, depth=depth, dim=48 if args.smoke else 192)
    torch.manual_seed(0)
    weights = work / "vit.safetensors"
    save_file(
        {k: v.contiguous() for k, v in models.create(spec, pretrained=False).backbone.state_dict().items()},
        str(weights),
    )

    def run(client, out) -> tuple[float, int]:
        t0 = time.perf_counter()
        df = hs.pp.embed_cohort(
            cohort, spec, out, client=client, weights=str(weights), overwrite=True, progress=False
        )
        dt = time.perf_counter() - t0
        if (df["status"] != "done").any():
            raise SystemExit(f"some samples failed:\n{df}")
        return dt, int(df["n_spots"].sum())

    sizes = (1, 2)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR
        ) as c1,
        LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR
        ) as c2,
        Client(c1, set_as_default=False) as k1,
        Client(c2, set_as_default=False) as k2,
    ):
        clients = {1: k1, 2: k2}
        for n in sizes:  # warm-up: imports and the encoder build on every worker
            run(clients[n], work / f"out{n}")
        tiles = 0
        for _ in range(args.rounds):
            for n in sizes:
                dt, tiles = run(clients[n], work / f"out{n}")
                times[n].append(dt)

    for sid in cohort["sample_id"]:
        a = hs.io.read_embeddings(work / "out1" / spec.name / f"{sid}.h5").embeddings
        b = hs.io.read_embeddings(work / "out2" / spec.name / f"{sid}.h5").embeddings
        if not np.array_equal(a, b):
            raise SystemExit(f"sample {sid}: 1 and 2 workers wrote different embeddings")

    print(
        f"cohort: {args.samples} synthetic HEST-1k samples, {tiles} tiles ({args.spots} spots each); model: ViT "
        f"(dim {spec.dim}, depth {depth}, {spec.input_size} px), fp32 CPU, 1 thread per worker; {args.rounds} "
        "interleaved rounds"
    )
    for n in sizes:
        med, best = statistics.median(times[n]), min(times[n])
        print(
            f"{n} worker{'s' if n > 1 else ' '}: median {med:6.2f} s  {args.samples / med * 60:7.1f} samples/min  "
            f"{tiles / med:7.1f} tiles/s   (best {best:6.2f} s, {tiles / best:7.1f} tiles/s)"
        )
    ratios = [t1 / t2 for t1, t2 in zip(times[1], times[2])]
    print(
        f"ratio 2 workers / 1 worker (throughput): median {statistics.median(ratios):.2f}x, "
        f"best rounds {min(times[1]) / min(times[2]):.2f}x"
    )
    print("embeddings of 1 and 2 workers: identical")


if __name__ == "__main__":
    sys.exit(main())
