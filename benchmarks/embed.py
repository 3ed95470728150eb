"""CPU benchmark: ``hopt_st.pp.embed`` vs the per-spot loop HEST / TRIDENT-style pipelines use.

Both sides embed the same spots of ``synthetic_visium`` (224 px patches at 0.5 µm/px) with the same small
randomly initialised ViT (a narrow ``vit_small_patch14_reg4_dinov2``), in fp32 on the CPU with the same number
of torch threads and the same batch size:

* naive: for each spot crop the patch from the in-memory (c, y, x) image (loading the image is *not* timed,
  which favours this side), ``PIL.Image.fromarray`` -> torchvision ``ToTensor`` + ``Normalize``, stack into
  batches, fp32 forward under ``torch.no_grad``;
* hopt_st: ``pp.embed(sdata, encoder)`` end to end from the SpatialData, with its default reading plan (on the
  CPU: read in the computing thread, Morton order, uint8 batches normalised inside the encoder), each round
  with a new patch reader (cold cache).

The sides run interleaved for ``--rounds`` rounds; the script prints tiles/s (min / median), the per-round
ratio hopt_st / naive (min / median: the figure to quote is the min) and checks both give the same embeddings
(max |difference| <= 1e-5). ``--also threads`` adds pp.embed with 2 reader threads (the former default) as a
third side.

Run: ``python benchmarks/embed.py [--n-spots 1000] [--rounds 3] [--threads 2] [--batch-size 32]``
(``--smoke``: a few spots, for the test suite).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import interleave, load, ratio, small_vit_spec, summary  # noqa: E402

import hopt_st as hs  # noqa: E402
from hopt_st import models  # noqa: E402


def level0_cyx(sdata) -> np.ndarray:
    el = sdata.images["he"]
    da = el["scale0"]["image"] if hasattr(el, "children") and len(el.children) else el
    return np.asarray(da.data.compute())


def spot_xy(sdata) -> np.ndarray:
    xy = sdata.shapes["spots"].loc[sdata.tables["table"].obs["spot_id"].to_numpy()]
    return np.column_stack([xy.geometry.x.to_numpy(), xy.geometry.y.to_numpy()])


def naive(
    img_cyx: np.ndarray, centers: np.ndarray, backbone, spec, batch_size: int
) -> tuple[np.ndarray, float]:
    """Per-spot crop -> PIL -> torchvision transforms -> batched fp32 forward; returns (embeddings, seconds)."""
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    p = spec.input_size
    out, buf = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for cx, cy in centers:
            x0 = int(np.floor(cx - p / 2 + 0.5))
            y0 = int(np.floor(cy - p / 2 + 0.5))
            crop = np.ascontiguousarray(img_cyx[:, y0 : y0 + p, x0 : x0 + p].transpose(1, 2, 0))
            buf.append(tf(Image.fromarray(crop)))
            if len(buf) == batch_size:
                out.append(backbone(torch.stack(buf)).numpy())
                buf = []
        if buf:
            out.append(backbone(torch.stack(buf)).numpy())
    return np.concatenate(out), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-spots", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (both sides)"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--also", nargs="*", default=[], choices=["threads"], help="extra pp.embed sides")
    ap.add_argument("--smoke", action="store_true", help="a few spots and a 1-block ViT (for the test suite)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n_spots, args.rounds, args.batch_size = 24, 2, 8
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    spec = small_vit_spec(depth=1, dim=48) if args.smoke else small_vit_spec()
    t0 = time.perf_counter()
    sdata = hs.datasets.synthetic_visium(n_spots=args.n_spots, seed=0)
    n = sdata.tables["table"].n_obs
    img = level0_cyx(sdata)  # not timed
    centers = spot_xy(sdata)
    print(f"built {n} spots, image {img.shape[2]} x {img.shape[1]} px in {time.perf_counter() - t0:.0f} s")
    with models.registered(spec, overwrite=True):
        enc = models.create(spec.name, pretrained=False)
        # warm-up (allocator, thread pools) on a few tiles, not timed
        naive(img, centers[:8], enc.backbone, spec, args.batch_size)
        hs.pp.embed(hs.pp.patches(sdata, patch_size=224, target_mpp=0.5)[np.arange(8)], enc, progress=False)

        ref: dict = {}
        diffs = []

        def run_naive() -> dict:
            emb, dt = naive(img, centers, enc.backbone, spec, args.batch_size)
            ref["emb"] = emb
            return {"tiles_per_s": n / dt}

        def run_hopt(**kw) -> dict:
            t = time.perf_counter()
            hs.pp.embed(
                sdata, enc, device="cpu", batch_size=args.batch_size, progress=False, key_added="X_bench",
                overwrite=True, **kw,
            )  # fmt: skip
            dt = time.perf_counter() - t
            diffs.append(float(np.abs(sdata.tables["table"].obsm["X_bench"] - ref["emb"]).max()))
            return {"tiles_per_s": n / dt}

        sides = {"naive per-spot loop": run_naive, "hopt_st.pp.embed (default plan)": run_hopt}
        if "threads" in args.also:
            sides["hopt_st.pp.embed (2 reader threads)"] = lambda: run_hopt(workers="threads", num_workers=2)
        print(
            f"{n} spots, ViT dim {spec.dim} depth {spec.timm_kwargs['depth']} at 224 px, fp32 CPU, "
            f"{args.threads} torch threads, batch {args.batch_size}, {args.rounds} interleaved rounds; {load()}"
        )
        res = interleave(sides, args.rounds)
    print(f"summary ({load()} at the end):")
    summary(res, "tiles_per_s", "naive per-spot loop", unit="tiles/s")
    for side in list(sides)[1:]:
        ratio(res, "tiles_per_s", side, "naive per-spot loop")
    diff = max(diffs)
    print(
        f"max |difference| of embeddings over all rounds: {diff:.2e} ({'OK' if diff <= 1e-5 else 'MISMATCH'} at 1e-5)"
    )
    return 0 if diff <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
