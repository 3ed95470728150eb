"""CPU benchmark: ``hopt_st.pp.embed`` vs the per-spot loop HEST / TRIDENT-style pipelines use.

Both embed the same ~2,000 spots of ``synthetic_visium`` (224 px patches at 0.5 µm/px) with the same
small randomly initialised ViT (a narrow ``vit_small_patch14_reg4_dinov2``), in fp32 on the CPU:

* baseline: for each spot crop the patch from the in-memory image (decoding the whole image is *not*
  timed, which favours the baseline), ``PIL.Image.fromarray`` -> torchvision ``ToTensor`` + ``Normalize``,
  stack into batches, fp32 forward under ``torch.no_grad``;
* hopt_st: ``pp.embed(sdata, encoder)`` end to end from the SpatialData (lazy patch reading in threads,
  prefetch overlapped with compute, uint8 to the encoder, normalisation inside, ``inference_mode``).

Checks both give the same embeddings (max abs difference <= 1e-5) and prints tiles/s and their ratio.

Run: ``python benchmarks/embed.py [--n-spots 2000] [--threads 2] [--batch-size 32]``
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

import hopt_st as hs
from hopt_st import models


def small_vit_spec() -> models.ModelSpec:
    return models.ModelSpec(
        name="bench-small-vit",
        dim=192,
        input_size=224,
        mpp=0.5,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        timm_name="vit_small_patch14_reg4_dinov2",
        timm_kwargs=dict(
            img_size=224,
            embed_dim=192,
            depth=4,
            num_heads=3,
            init_values=1e-5,
            num_classes=0,
            dynamic_img_size=False,
        ),
        notes="benchmark only",
    )


def baseline(sdata, backbone, spec, batch_size: int) -> tuple[np.ndarray, float]:
    """Per-spot crop -> PIL -> torchvision transforms -> batched fp32 forward."""
    img = np.asarray(sdata.images["he"]["scale0"]["image"].data.compute()).transpose(1, 2, 0)  # not timed
    img = np.ascontiguousarray(img)
    xy = sdata.shapes["spots"].loc[sdata.tables["table"].obs["spot_id"].to_numpy()]
    centers = np.column_stack([xy.geometry.x.to_numpy(), xy.geometry.y.to_numpy()])
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    p = spec.input_size
    out, buf = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for cx, cy in centers:
            x0 = int(np.floor(cx - p / 2 + 0.5))
            y0 = int(np.floor(cy - p / 2 + 0.5))
            buf.append(tf(Image.fromarray(img[y0 : y0 + p, x0 : x0 + p])))
            if len(buf) == batch_size:
                out.append(backbone(torch.stack(buf)).numpy())
                buf = []
        if buf:
            out.append(backbone(torch.stack(buf)).numpy())
    return np.concatenate(out), time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-spots", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    spec = models.register(small_vit_spec(), overwrite=True)
    sdata = hs.datasets.synthetic_visium(n_spots=args.n_spots, seed=0)
    n = sdata.tables["table"].n_obs
    enc = models.create(spec.name, pretrained=False)

    # warm-up (allocator, thread pools) on a few tiles, not timed
    hs.pp.embed(hs.pp.patches(sdata, patch_size=224, target_mpp=0.5)[np.arange(8)], enc, progress=False)

    emb_base, t_base = baseline(sdata, enc.backbone, spec, args.batch_size)
    t0 = time.perf_counter()
    hs.pp.embed(sdata, enc, device="cpu", batch_size=args.batch_size, progress=False, key_added="X_bench")
    t_hopt = time.perf_counter() - t0
    emb_hopt = sdata.tables["table"].obsm["X_bench"]

    diff = float(np.abs(emb_hopt - emb_base).max())
    print(
        f"spots: {n}, model: ViT (dim {spec.dim}, depth 4, 224 px), fp32 CPU, {args.threads} threads, batch {args.batch_size}"
    )
    print(
        f"baseline per-spot loop (crop->PIL->torchvision->fp32): {t_base:7.2f} s  {n / t_base:8.1f} tiles/s"
    )
    print(
        f"hopt_st.pp.embed (from SpatialData, end to end)      : {t_hopt:7.2f} s  {n / t_hopt:8.1f} tiles/s"
    )
    print(f"ratio hopt_st / baseline tiles/s: {t_base / t_hopt:.2f}x")
    print(f"max |difference| of embeddings: {diff:.2e} ({'OK' if diff <= 1e-5 else 'MISMATCH'} at 1e-5)")
    if diff > 1e-5:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
