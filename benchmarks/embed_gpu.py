"""GPU benchmark: the full H-optimus-1 architecture (random weights) through ``hopt_st.pp.embed``.

Measures tiles/s for fp16 and bf16 autocast, with and without ``torch.compile``, on synthetic uint8
224 px patches held in host memory (so the numbers include the host->device copy of uint8 batches,
normalisation on the device, and the engine's prefetching / asynchronous copy back), plus the bare
``encoder(x)`` forward on a batch already on the device. Reports the fraction of 1,340 tiles/s:
the H200 dense bf16 limit (~790 TFLOP/s) for ~0.59 TFLOP per tile.

Run (one GPU): ``python benchmarks/embed_gpu.py [--n-tiles 4096] [--batch-size 128] [--no-compile]``
Writes the results as JSON to ``$OUT/embed_gpu.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import torch

import hopt_st as hs
from hopt_st import models

LIMIT_TILES_PER_S = 1340.0


def synthetic_tiles(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """H&E-coloured noise: pink background with purple blobs, uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 64, (n, size, size, 1), dtype=np.uint8)
    tiles = np.empty((n, size, size, 3), np.uint8)
    tiles[..., 0] = 190 + base[..., 0] // 2
    tiles[..., 1] = 120 + base[..., 0]
    tiles[..., 2] = 170 + base[..., 0] // 2
    return tiles


def bare_forward(enc, batch_size: int, dtype, iters: int = 10) -> float:
    x = torch.from_numpy(synthetic_tiles(batch_size, seed=1)).cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        for _ in range(3):
            enc(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            enc(x)
        torch.cuda.synchronize()
    return batch_size * iters / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-tiles", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        raise SystemExit("embed_gpu.py needs a CUDA GPU.")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)

    t0 = time.perf_counter()
    enc = models.create("h-optimus-1", pretrained=False, device="cuda")
    n_params = sum(p.numel() for p in enc.parameters())
    print(
        f"{torch.cuda.get_device_name()} | torch {torch.__version__} | H-optimus-1 arch, {n_params / 1e9:.3f} B params, "
        f"random weights (built in {time.perf_counter() - t0:.1f} s)"
    )
    n = args.n_tiles - args.n_tiles % args.batch_size  # whole batches
    tiles = synthetic_tiles(n)
    warm = tiles[: args.batch_size * 2]

    results = []
    for compile_ in [False] if args.no_compile else [False, True]:
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            t_c = time.perf_counter()
            # warm-up (and compilation) on two batches, not timed
            hs.pp.embed(
                warm,
                enc,
                device="cuda",
                dtype=dtype,
                batch_size=args.batch_size,
                compile=compile_,
                progress=False,
            )
            t_warm = time.perf_counter() - t_c
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            emb = hs.pp.embed(
                tiles,
                enc,
                device="cuda",
                dtype=dtype,
                batch_size=args.batch_size,
                compile=compile_,
                progress=False,
            )
            torch.cuda.synchronize()
            tps = n / (time.perf_counter() - t1)
            bare = bare_forward(
                getattr(enc, "_hopt_compiled", enc) if compile_ else enc, args.batch_size, dtype
            )
            ok = bool(np.isfinite(emb).all()) and emb.shape == (n, 1536)
            row = dict(
                dtype=name,
                compile=compile_,
                batch_size=args.batch_size,
                tiles=n,
                pp_embed_tiles_per_s=round(tps, 1),
                bare_forward_tiles_per_s=round(bare, 1),
                fraction_of_1340=round(tps / LIMIT_TILES_PER_S, 3),
                warmup_s=round(t_warm, 1),
                finite=ok,
            )
            results.append(row)
            print(
                f"{name} compile={compile_!s:5}: pp.embed {tps:7.1f} tiles/s ({tps / LIMIT_TILES_PER_S:5.1%} of 1,340) | "
                f"bare forward {bare:7.1f} tiles/s | warm-up {t_warm:5.1f} s | finite {ok}"
            )
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "embed_gpu.json"), "w") as f:
            json.dump(
                dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=results),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
