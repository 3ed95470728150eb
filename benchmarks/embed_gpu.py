"""GPU benchmark: the H-optimus-1 architecture (random weights) through ``hopt_st``, prepared to run once on a lent GPU.

One run (< 8 minutes on an H200; a time budget skips the optional parts it could not finish) prints, and writes
as JSON to ``$OUT/embed_gpu.json`` (or ``--json``):

* **set-up**: device, torch/CUDA versions, cores, whether timm's attention uses
  ``F.scaled_dot_product_attention`` and whether the flash-attention kernel runs (a profiled bf16 forward), and
  whether the patch-embedding convolution receives channels-last input (on CUDA uint8 NHWC batches are permuted,
  not copied; on the CPU the encoder copies them to NCHW in one pass by design, so it reports False there);
* **(a) compute only**, on device-resident uint8 batches (normalisation included): tiles/s for bf16 and fp16
  autocast at batch sizes 64-512, and with ``torch.compile`` (bf16 and fp16 at one batch size), with the peak
  GPU memory of each and the % of 1,300 tiles/s; plus **(c1) a plain timm fp16 model** (``model.half()``,
  pre-normalised fp16 input) as the compute baseline;
* **numerics**: max |difference| (absolute, relative to the largest fp32 value) and the smallest cosine
  similarity between the fp32, bf16, fp16 and compiled embeddings of the same tiles (one batch);
* **(b) end to end** from a synthetic 40k x 40k px JPEG pyramidal TIFF (0.25 µm/px, 256 px tiles) with
  >= 10,000 Visium spots in shuffled order, through ``pp.embed(sdata)`` with N reader processes (and N threads
  for comparison): tiles/s, % of 1,300 tiles/s, GPU utilisation (sampled by ``nvidia-smi``), peak GPU memory and
  the peak host memory of the reader and its workers (summed PSS);
* **(c2) the end-to-end baseline**: a plain loop (per spot: window through tifffile's zarr store, PIL,
  torchvision ``ToTensor`` + ``Normalize``, batches to the GPU, ``model.half()`` forward) on the first
  ``--baseline-spots`` spots, interleaved with ``pp.embed`` on the same spots for ``--rounds`` rounds (fresh
  readers each): the ratio pp.embed / baseline (min / median).

* **(d) token map**: ``pp.embed_tokens`` (one forward per 224 px tile on a half-tile lattice, patch tokens reduced
  by PCA on the device and blended into a float16 map) over ``--token-area-mm`` mm of the same slide, through the
  same loop as ``pp.embed`` (bf16, reader processes): tiles/s (to compare with (b)), forwards per mm², peak GPU
  memory and host memory, and the seconds for the 8 µm bins' features (``pp.token_features``).

``--smoke`` runs every part on the CPU with a one-block ViT and a small slide in under a minute (the test
suite runs it so that the script cannot rot).

Run (one GPU): ``python benchmarks/embed_gpu.py [--workers 15] [--budget-s 450]``; on a lent nvidia-h200 machine
(whose image lacks spatialdata & co.) through ``benchmarks/run_embed_gpu.sh``, which says how to carry the wheels
listed in ``benchmarks/h200_wheels.txt``. The JSON is rewritten after every part, so a run stopped at its time limit
keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MemorySampler, interleave, load, small_vit_spec, summary  # noqa: E402
from patches import hex_spots, make_sdata, make_tiff_fast  # noqa: E402

import hopt_st as hs  # noqa: E402
from hopt_st import models  # noqa: E402

TARGET_TILES_PER_S = 1300.0
MPP = 0.25


# --------------------------------------------------------------------------------------------- helpers
class Budget:
    """Wall-clock budget of the run: optional parts are skipped when they would not fit."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, need_s: float, what: str, skipped: list) -> bool:
        if self.left() >= need_s:
            return True
        skipped.append(what)
        print(
            f"  [budget] skipped {what}: needs ~{need_s:.0f} s, {max(self.left(), 0):.0f} s left", flush=True
        )
        return False


class GpuSampler:
    """GPU utilisation (%) sampled every 100 ms by ``nvidia-smi`` while the block runs (None without it)."""

    def __init__(self, device: torch.device):
        self.samples: list[float] = []
        self._proc = None
        self._thread = None
        if device.type != "cuda":
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        cmd = [
            "nvidia-smi",
            f"--id={index}",
            "--query-gpu=utilization.gpu",
            "--format=csv,noheader,nounits",
            "-lms",
            "100",
        ]
        with contextlib.suppress(OSError):
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append(float(line.strip()))

    def __enter__(self):
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)
            self._thread.join(timeout=5)

    def mean(self) -> float | None:
        s = self.samples[2:] if len(self.samples) > 4 else self.samples  # drop the ramp-up
        return float(np.mean(s)) if s else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def synthetic_tiles(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """H&E-coloured noise: pink background with purple blobs, uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 64, (n, size, size, 1), dtype=np.uint8)
    tiles = np.empty((n, size, size, 3), np.uint8)
    tiles[..., 0] = 190 + base[..., 0] // 2
    tiles[..., 1] = 120 + base[..., 0]
    tiles[..., 2] = 170 + base[..., 0] // 2
    return tiles


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def timed_forward(model, x: torch.Tensor, device, dtype, min_tiles: int) -> float:
    """tiles/s of ``model(x)`` (2 warm-up calls, then >= min_tiles tiles)."""
    iters = max(3, -(-min_tiles // len(x)))
    with torch.inference_mode(), autocast(device, dtype):
        for _ in range(2):
            model(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync(device)
    return len(x) * iters / (time.perf_counter() - t0)


def fmt(v, nd=1, unit="") -> str:
    return "n/a" if v is None else f"{v:.{nd}f}{unit}"


# --------------------------------------------------------------------------------------------- set-up checks
def attention_checks(enc, device) -> dict:
    """SDPA in timm's attention blocks, the flash kernel in a profiled forward, channels-last conv input."""
    blocks = list(getattr(enc.backbone, "blocks", []))
    out = {"sdpa_fused_attn": bool(blocks) and all(getattr(b.attn, "fused_attn", False) for b in blocks)}
    seen = {}

    def hook(_mod, args):
        seen["channels_last"] = bool(args[0].is_contiguous(memory_format=torch.channels_last))
        seen["stride"] = tuple(args[0].stride())

    h = enc.backbone.patch_embed.proj.register_forward_pre_hook(hook)
    x = torch.from_numpy(synthetic_tiles(2)).to(device)
    try:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with (
                profile(activities=[ProfilerActivity.CUDA]) as prof,
                torch.inference_mode(),
                autocast(device, dtype),
            ):
                enc(x)
                sync(device)
            names = [e.key for e in prof.key_averages()]
            out["flash_kernels"] = sorted({n for n in names if "flash" in n.lower()})[:4]
            out["flash_attention_used"] = bool(out["flash_kernels"])
            with contextlib.suppress(Exception):  # flash forced: fails loudly if it does not apply
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with (
                    sdpa_kernel([SDPBackend.FLASH_ATTENTION]),
                    torch.inference_mode(),
                    autocast(device, dtype),
                ):
                    enc(x)
                out["flash_only_forward_ok"] = True
        else:
            with torch.inference_mode():
                enc(x)
            out["flash_attention_used"] = None  # no flash kernels on the CPU
    finally:
        h.remove()
    out["patch_embed_input_channels_last"] = seen.get("channels_last")
    return out


# --------------------------------------------------------------------------------------------- parts
def part_compute(enc, spec, device, args, budget, skipped) -> list[dict]:
    print(f"\n(a) compute only: device-resident uint8 batches, normalisation included; {load()}")
    rows = []
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for bs in args.batch_sizes:
            if not budget.allows(args.est_config_s, f"compute {name} batch {bs}", skipped):
                continue
            x = torch.from_numpy(synthetic_tiles(bs, spec.input_size, seed=bs)).to(device)
            reset_peak(device)
            try:
                tps = timed_forward(enc, x, device, dtype, args.min_tiles)
                row = dict(
                    dtype=name, batch_size=bs, compile=False, tiles_per_s=tps, peak_gpu_gib=peak_gib(device)
                )
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at 512, or fp16 autocast on some CPUs
                row = dict(dtype=name, batch_size=bs, compile=False, error=f"{type(e).__name__}: {e}"[:200])
            rows.append(row)
            print(_compute_line(row), flush=True)
            del x
    return rows


def part_compile(enc, spec, device, args, budget, skipped) -> tuple[list[dict], dict]:
    """torch.compile for bf16 and fp16 at the end-to-end batch size (the shape pp.embed pads to)."""
    print(f"\n(a') torch.compile at batch {args.e2e_batch_size}; {load()}")
    rows, compiled = [], {}
    bs = args.e2e_batch_size
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if not budget.allows(args.est_compile_s, f"torch.compile {name}", skipped):
            continue
        x = torch.from_numpy(synthetic_tiles(bs, spec.input_size, seed=bs)).to(device)
        t0 = time.perf_counter()
        model = torch.compile(enc)
        try:
            with torch.inference_mode(), autocast(device, dtype):
                model(x)
                sync(device)
            t_compile = time.perf_counter() - t0
            reset_peak(device)
            tps = timed_forward(model, x, device, dtype, args.min_tiles)
            row = dict(
                dtype=name, batch_size=bs, compile=True, tiles_per_s=tps, peak_gpu_gib=peak_gib(device)
            )
            row["compile_s"] = t_compile
            compiled[name] = model
        except Exception as e:  # noqa: BLE001
            row = dict(dtype=name, batch_size=bs, compile=True, error=f"{type(e).__name__}: {e}"[:200])
        rows.append(row)
        print(_compute_line(row), flush=True)
    if "bf16" in compiled:  # pp.embed(compile=True) reuses it: same autocast dtype, batches padded to bs
        object.__setattr__(enc, "_hopt_compiled", compiled["bf16"])
    return rows, compiled


def _compute_line(r: dict) -> str:
    head = f"  {r['dtype']} batch {r['batch_size']:4d} compile={r['compile']!s:5}"
    if "error" in r:
        return f"{head}: {r['error']}"
    extra = f" (compiled in {r['compile_s']:.0f} s)" if "compile_s" in r else ""
    return (
        f"{head}: {r['tiles_per_s']:8.1f} tiles/s = {r['tiles_per_s'] / TARGET_TILES_PER_S:6.1%} of 1,300 | peak GPU "
        f"{fmt(r['peak_gpu_gib'], 1, ' GiB')}{extra}"
    )


def part_timm_compute(enc, spec, device, args) -> dict:
    """(c1) plain timm fp16: the backbone in half precision on pre-normalised fp16 input."""
    import copy

    half = copy.deepcopy(enc.backbone).half().eval()
    bs = args.baseline_batch_size
    x = torch.randn(bs, 3, spec.input_size, spec.input_size, device=device).half()
    reset_peak(device)
    try:
        tps = timed_forward(half, x, device, torch.float32, args.min_tiles)  # already fp16: no autocast
        row = dict(tiles_per_s=tps, batch_size=bs, peak_gpu_gib=peak_gib(device))
    except Exception as e:  # noqa: BLE001 - fp16 matmuls are not implemented on every CPU
        row = dict(error=f"{type(e).__name__}: {e}"[:200], batch_size=bs)
    del half
    print(
        f"(c1) plain timm model.half() on fp16 input, batch {bs}: "
        + (
            row["error"]
            if "error" in row
            else f"{row['tiles_per_s']:.1f} tiles/s = {row['tiles_per_s'] / TARGET_TILES_PER_S:.1%} of 1,300"
        ),
        flush=True,
    )
    return row


def part_numerics(enc, compiled, spec, device, n: int, chunk: int, embs: dict) -> dict:
    """Embeddings of the same ``n`` tiles (batches of ``chunk``: the compiled shape) in every precision;
    ``embs`` keeps those already computed."""
    print(f"\nnumerics: embeddings of the same {n} tiles")
    x = torch.from_numpy(synthetic_tiles(n, spec.input_size, seed=7)).to(device)
    for name, dtype, model in (
        ("fp32", torch.float32, enc),
        ("bf16", torch.bfloat16, enc),
        ("fp16", torch.float16, enc),
        *(
            (f"compiled {k}", {"bf16": torch.bfloat16, "fp16": torch.float16}[k], m)
            for k, m in compiled.items()
        ),
    ):
        if name in embs:
            continue
        try:
            with torch.inference_mode(), autocast(device, dtype):
                embs[name] = (
                    torch.cat([model(x[i : i + chunk]).float() for i in range(0, n, chunk)]).cpu().numpy()
                )
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: {type(e).__name__}: {e}"[:200])
    ref = embs["fp32"]
    scale = float(np.abs(ref).max())
    out = {}
    names = list(embs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            d = np.abs(embs[a] - embs[b])
            cos = (embs[a] * embs[b]).sum(1) / (
                np.linalg.norm(embs[a], axis=1) * np.linalg.norm(embs[b], axis=1)
            )
            out[f"{a} vs {b}"] = dict(
                max_abs=float(d.max()), max_rel=float(d.max() / scale), min_cosine=float(cos.min())
            )
            print(
                f"  {a:>14s} vs {b:<14s}: max |diff| {d.max():.3e} ({d.max() / scale:.2e} of max |fp32|), min cosine {cos.min():.6f}"
            )
    return out


def naive_loop(tiff: Path, xy: np.ndarray, backbone_half, spec, device, batch_size: int) -> float:
    """(c2) per spot: window from tifffile's zarr store -> PIL -> ToTensor/Normalize -> fp16 batches on the device."""
    import tifffile
    import zarr
    from PIL import Image
    from torchvision import transforms

    from hopt_st.pp._geometry import choose_level, patch_boxes

    tif = tifffile.TiffFile(tiff)
    shapes = [tuple(lv.shape[:2]) for lv in tif.series[0].levels]
    choice = choose_level(shapes, MPP, spec.mpp)
    z = zarr.open(tif.aszarr(level=choice.level), mode="r")
    boxes, (sy, sx) = patch_boxes(xy, choice.downsample, spec.input_size * spec.mpp / MPP)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    t0 = time.perf_counter()
    buf = []
    with torch.inference_mode():
        for y0, x0 in boxes:
            win = np.asarray(z[max(y0, 0) : y0 + sy, max(x0, 0) : x0 + sx])
            img = Image.fromarray(win)
            if win.shape[:2] != (spec.input_size, spec.input_size):
                img = img.resize((spec.input_size, spec.input_size), Image.Resampling.BILINEAR)
            buf.append(tf(img))
            if len(buf) == batch_size:
                backbone_half(torch.stack(buf).to(device).half()).float().cpu()
                buf = []
        if buf:
            backbone_half(torch.stack(buf).to(device).half()).float().cpu()
    sync(device)
    tif.close()
    return len(xy) / (time.perf_counter() - t0)


def end_to_end_runs(sdata, enc, device, args, budget, skipped, plans) -> list[dict]:
    """pp.embed(sdata) in bf16 for each (workers, n) plan: tiles/s, GPU utilisation and memory, host memory."""
    n_spots = sdata.tables["table"].n_obs
    runs = []
    for kind, n in plans:
        if not budget.allows(n_spots / 400 + 15, f"end-to-end {kind} x{n}", skipped):
            continue
        reset_peak(device)
        key = f"X_{kind.replace('+', '_')}_{n}"
        with GpuSampler(device) as gpu, MemorySampler() as mem:
            t = time.perf_counter()
            hs.pp.embed(
                sdata, enc, device=device, dtype="bf16", batch_size=args.e2e_batch_size, key_added=key,
                workers=kind.split("+")[0], num_workers=n, compile=kind.endswith("compile"), progress=False,
            )  # fmt: skip
            sync(device)
            dt = time.perf_counter() - t
        emb = sdata.tables["table"].obsm[key]
        row = dict(
            workers=kind, n=n, tiles=n_spots, seconds=dt, tiles_per_s=n_spots / dt,
            gpu_util_mean_pct=gpu.mean(), peak_gpu_gib=peak_gib(device), peak_host_pss_mb=mem.peak_pss_mb,
            peak_host_rss_largest_mb=mem.peak_rss_mb, processes=mem.peak_processes, finite=bool(np.isfinite(emb).all()),
        )  # fmt: skip
        runs.append(row)
        print(
            f"  {kind:18s} x{n:<3d}: {row['tiles_per_s']:8.1f} tiles/s = {row['tiles_per_s'] / TARGET_TILES_PER_S:6.1%} of "
            f"1,300 | GPU util {fmt(row['gpu_util_mean_pct'], 0, ' %')} | peak GPU {fmt(row['peak_gpu_gib'], 1, ' GiB')} | "
            f"host PSS {row['peak_host_pss_mb']:.0f} MB ({row['processes']} processes) | finite {row['finite']}",
            flush=True,
        )
    return runs


def part_end_to_end(enc, spec, device, args, budget, skipped, tiff: Path) -> tuple[dict, object]:
    t0 = time.perf_counter()
    make_tiff_fast(tiff, args.size)
    xy = hex_spots(args.size, MPP, args.n_spots)
    sdata = make_sdata(tiff, xy, MPP)
    print(
        f"\n(b) end to end: {args.size} x {args.size} px JPEG pyramidal TIFF at {MPP} µm/px "
        f"({tiff.stat().st_size / 2**20:.0f} MiB, written in {time.perf_counter() - t0:.0f} s), {len(xy)} spots in "
        f"shuffled order, pp.embed bf16 batch {args.e2e_batch_size}; {load()}"
    )
    plans = [("processes", n) for n in args.workers] + [("threads", args.workers[0])]
    runs = end_to_end_runs(sdata, enc, device, args, budget, skipped, plans)
    out = {"runs": runs, "n_spots": len(xy)}
    # (c2) the plain loop vs pp.embed on the same spots, interleaved
    m = min(args.baseline_spots, len(xy))
    if budget.allows(args.rounds * (m / 150 + m / 400 + 20), "end-to-end baseline rounds", skipped):
        import copy

        sub = make_sdata(tiff, xy[:m], MPP)
        half = copy.deepcopy(enc.backbone).half().eval()
        best = (
            max(runs, key=lambda r: r["tiles_per_s"])
            if runs
            else {"workers": "processes", "n": args.workers[0]}
        )

        def run_hopt() -> dict:
            t = time.perf_counter()
            hs.pp.embed(
                sub, enc, device=device, dtype="fp16", batch_size=args.e2e_batch_size, key_added="X_cmp",
                overwrite=True, workers=best["workers"].split("+")[0], num_workers=best["n"], progress=False,
            )  # fmt: skip
            sync(device)
            return {"tiles_per_s": m / (time.perf_counter() - t)}

        sides = {
            "plain timm fp16 loop": lambda: {
                "tiles_per_s": naive_loop(tiff, xy[:m], half, spec, device, args.baseline_batch_size)
            },
            f"pp.embed fp16 ({best['workers'].split('+')[0]} x{best['n']})": run_hopt,
        }
        print(
            f"(c2) {m} spots, plain loop vs pp.embed (fp16 both), {args.rounds} interleaved rounds; {load()}"
        )
        res = interleave(sides, args.rounds)
        out["baseline"] = summary(res, "tiles_per_s", "plain timm fp16 loop", unit="tiles/s")
        del half
    return out, sdata


def part_token_map(enc, device, args, budget, skipped, sdata) -> dict:
    """(d) the token-map path of Visium HD / Xenium features over a square of ``--token-area-mm`` mm."""
    import geopandas as gpd
    import pandas as pd
    import shapely
    from anndata import AnnData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale, set_transformation

    side_um = args.token_area_mm * 1000
    n_tiles = int((side_um / 56 + 1) ** 2)
    if not budget.allows(n_tiles / 300 + 30, f"token map {args.token_area_mm} mm", skipped):
        return {}
    set_transformation(sdata.images["he"], Scale([MPP, MPP], axes=("x", "y")), "micrometers")
    n = int(side_um // 8)
    row, col = np.divmod(np.arange(n * n), n)
    sq = shapely.box(col * 8.0, row * 8.0, col * 8.0 + 8, row * 8.0 + 8)
    sdata.shapes["bins8"] = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=sq), transformations={"micrometers": Identity()}
    )
    obs = pd.DataFrame({"region": pd.Categorical(["bins8"] * len(row)), "bin_id": np.arange(len(row))})
    obs.index = obs.index.astype(str)
    sdata.tables["bins"] = TableModel.parse(
        AnnData(obs=obs), region="bins8", region_key="region", instance_key="bin_id"
    )
    print(
        f"\n(d) token map over {args.token_area_mm} mm x {args.token_area_mm} mm ({len(row)} bins of 8 µm); {load()}"
    )
    reset_peak(device)
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        hs.pp.embed_tokens(
            sdata, enc, image_key="he", table_name="table", extent_um=(0, 0, side_um, side_um), device=device,
            dtype="bf16" if device.type == "cuda" else None, batch_size=args.e2e_batch_size,
            num_workers=args.workers[0], workers="processes", key_added="tok", overwrite=True, progress=False,
        )  # fmt: skip
        sync(device)
        t_map = time.perf_counter() - t0
        hs.pp.token_features(sdata, "tok", table_name="bins", key_added="X_tok", overwrite=True)
        t_feat = time.perf_counter() - t0 - t_map
    rec = sdata.attrs["hopt_st"]["token_maps"]["tok"]
    out = {
        "area_mm": args.token_area_mm,
        "n_tiles": rec["n_tiles"],
        "forwards_per_mm2": rec["n_tiles"] / args.token_area_mm**2,
        "tiles_per_s": rec["n_tiles"] / t_map,
        "map_s": t_map,
        "features_s": t_feat,
        "n_bins": len(row),
        "peak_gpu_gib": peak_gib(device),
        "peak_host_pss_mb": mem.peak_pss_mb,
    }
    print(
        f"  {rec['n_tiles']} tiles ({out['forwards_per_mm2']:.0f} forwards/mm², vs {1e6 / 64:.0f} for one patch per "
        f"8 µm bin) in {t_map:.1f} s = {out['tiles_per_s']:.1f} tiles/s (PCA sample included); features of "
        f"{len(row)} bins {t_feat:.1f} s; peak GPU {fmt(out['peak_gpu_gib'], 2, ' GiB')}, host PSS "
        f"{mem.peak_pss_mb:.0f} MB"
    )
    return out


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = os.cpu_count() or 1
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument(
        "--compile-batch-size", type=int, default=None, help="default: the fastest bf16 batch size"
    )
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile", action="store_true", help="with --smoke: also the torch.compile parts")
    ap.add_argument("--min-tiles", type=int, default=2048, help="tiles per timed compute configuration")
    ap.add_argument("--size", type=int, default=40000, help="side (px) of the end-to-end slide")
    ap.add_argument("--n-spots", type=int, default=12000)
    ap.add_argument(
        "--workers", type=int, nargs="+", default=[max(1, min(16, cores - 1))], help="reader processes"
    )
    ap.add_argument("--e2e-batch-size", type=int, default=256)
    ap.add_argument("--baseline-spots", type=int, default=2000)
    ap.add_argument("--baseline-batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--token-area-mm", type=float, default=3.0, help="(d) side of the token-map square, mm")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="wall-clock budget; optional parts beyond it are skipped",
    )
    ap.add_argument("--json", default=None, help="default: $OUT/embed_gpu.json when OUT is set")
    ap.add_argument(
        "--smoke", action="store_true", help="CPU, one-block ViT, small slide (for the test suite)"
    )
    args = ap.parse_args(argv)
    args.est_config_s, args.est_compile_s = 8.0, 200.0
    logging.basicConfig(level=logging.WARNING)
    if args.smoke:
        device = torch.device("cpu")
        args.batch_sizes, args.min_tiles = [4, 8], 8
        args.no_compile = not args.compile  # compiling takes minutes on a CPU
        args.size, args.n_spots, args.workers, args.e2e_batch_size = 3000, 40, [1], 8
        args.baseline_spots, args.baseline_batch_size, args.rounds = 16, 8, 2
        args.token_area_mm = 0.2
        args.est_config_s = 0.0
    elif not torch.cuda.is_available():
        raise SystemExit("embed_gpu.py needs a CUDA GPU (or --smoke).")
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    budget = Budget(args.budget_s)
    skipped: list[str] = []
    result: dict = {"args": {k: v for k, v in vars(args).items() if not k.startswith("est_")}}
    path = args.json or (os.path.join(os.environ["OUT"], "embed_gpu.json") if os.environ.get("OUT") else None)

    def save() -> None:  # after every part: a run killed at its time limit keeps what it measured
        result["skipped"], result["elapsed_s"] = skipped, budget.elapsed()
        if path:
            Path(path).write_text(json.dumps(result, indent=1, default=str))

    spec = (
        small_vit_spec("bench-gpu-smoke", dim=32, depth=1, heads=2, notes="benchmark smoke test only")
        if args.smoke
        else models.get_spec("h-optimus-1")
    )
    with models.registered(spec, overwrite=True) if args.smoke else contextlib.nullcontext():
        t0 = time.perf_counter()
        enc = models.create(spec.name, pretrained=False, device=device)
        n_params = sum(p.numel() for p in enc.parameters())
        dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(
            f"{dev_name} | torch {torch.__version__} (CUDA {torch.version.cuda}) | {cores} cores | {spec.name} "
            f"architecture, {n_params / 1e9:.3f} B params, random weights (built in {time.perf_counter() - t0:.1f} s) | {load()}"
        )
        result["setup"] = dict(
            device=dev_name, torch=torch.__version__, cuda=torch.version.cuda, cores=cores, params=n_params
        )
        result["setup"].update(attention_checks(enc, device))
        print(
            "set-up: timm attention via F.scaled_dot_product_attention: {sdpa_fused_attn}; flash-attention kernel "
            "in a profiled bf16 forward: {flash}; patch-embedding conv input channels-last: {cl}".format(
                sdpa_fused_attn=result["setup"]["sdpa_fused_attn"],
                flash=result["setup"].get("flash_attention_used"),
                cl=result["setup"]["patch_embed_input_channels_last"],
            )
        )
        # the essential figures first; torch.compile (minutes) last, as far as the budget allows
        result["compute"] = part_compute(enc, spec, device, args, budget, skipped)
        save()
        result["timm_fp16_compute"] = part_timm_compute(enc, spec, device, args)
        save()
        embs: dict = {}
        n_num = args.e2e_batch_size
        result["numerics"] = part_numerics(enc, {}, spec, device, n_num, n_num, embs)
        save()
        with tempfile.TemporaryDirectory() as tmp:
            result["end_to_end"], sdata = part_end_to_end(
                enc, spec, device, args, budget, skipped, Path(tmp) / "slide.tif"
            )
            save()
            result["token_map"] = part_token_map(enc, device, args, budget, skipped, sdata)
            save()
            if not args.no_compile:
                rows, compiled = part_compile(enc, spec, device, args, budget, skipped)
                result["compute"] += rows
                save()
                if compiled:
                    result["numerics"] = part_numerics(enc, compiled, spec, device, n_num, n_num, embs)
                if "bf16" in compiled:
                    print(f"\n(b') end to end with the compiled model; {load()}")
                    plan = [("processes+compile", args.workers[0])]
                    result["end_to_end"]["runs"] += end_to_end_runs(
                        sdata, enc, device, args, budget, skipped, plan
                    )
    save()
    print(
        f"\ndone in {budget.elapsed():.0f} s (budget {args.budget_s:.0f} s); skipped: {skipped or 'nothing'}; {load()}"
    )
    if path:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
