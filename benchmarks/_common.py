"""Shared helpers of the benchmark scripts: interleaved rounds, ratios, load, memory, child processes.

Every script runs its sides interleaved (side A, side B, ..., then again, for ``rounds`` rounds), each run in a
fresh state (a new reader / a new process), and reports per side the min and median, and per round the ratio
of each side to the baseline measured in the same round: so a loaded machine cannot flatter either side.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np


def load() -> str:
    """The 1-minute load average and the core count, e.g. ``"load 1.3 on 2 cores"``."""
    return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its finished children so far."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_now_mb() -> float:
    """Resident memory of this process now (MB; NaN where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def interleave(
    sides: dict[str, Callable[[], dict]], rounds: int, *, verbose: bool = True
) -> dict[str, list[dict]]:
    """Run ``sides`` one after the other, ``rounds`` times; each call returns a dict of measurements."""
    out: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(rounds):
        for name, fn in sides.items():
            m = fn()
            m["load"] = os.getloadavg()[0]
            out[name].append(m)
            if verbose:
                shown = {
                    k: round(v, 2) if isinstance(v, float) else v
                    for k, v in m.items()
                    if not isinstance(v, list)
                }
                print(f"  round {r + 1}/{rounds} {name}: {shown}", flush=True)
    return out


def summary(
    results: dict[str, list[dict]], key: str, baseline: str, *, unit: str, higher_is_better: bool = True
) -> dict:
    """Print min / median of ``key`` per side and min / median of the per-round ratios side / baseline."""
    rows = {}
    base = np.array([m[key] for m in results[baseline]], dtype=float)
    for name, ms in results.items():
        v = np.array([m[key] for m in ms], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):  # a side measured as 0 (e.g. no memory added)
            ratio = v / base if higher_is_better else base / v
        rows[name] = {
            "min": float(v.min()),
            "median": float(np.median(v)),
            "max": float(v.max()),
            "ratio_min": float(ratio.min()),
            "ratio_median": float(np.median(ratio)),
        }
        r = (
            ""
            if name == baseline
            else f" | ratio to {baseline}: min {ratio.min():.2f}x, median {np.median(ratio):.2f}x"
        )
        print(f"  {name:44s} {key} [{unit}] min {v.min():9.1f} median {np.median(v):9.1f}{r}")
    return rows


def run_json(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run a child process that prints one JSON object on its last line of stdout; return it."""
    res = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}, timeout=timeout
    )
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def child_cmd(script: str, *args) -> list[str]:
    return [sys.executable, script, *[str(a) for a in args]]


class MemorySampler:
    """Samples, every ``interval`` s, the summed proportional set size (PSS: shared pages split between the
    processes sharing them) and the largest RSS over this process and all its descendants."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.peak_pss_mb = 0.0
        self.peak_rss_mb = 0.0
        self.peak_processes = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = self._psutil.Process()
        procs = [me, *me.children(recursive=True)]
        pss = rss = 0.0
        for p in procs:
            try:
                mi = p.memory_full_info()
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
            pss += getattr(mi, "pss", mi.rss)
            rss = max(rss, mi.rss)
        self.peak_pss_mb = max(self.peak_pss_mb, pss / 2**20)
        self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)
        self.peak_processes = max(self.peak_processes, len(procs))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def ratio(results: dict[str, list[dict]], key: str, num: str, den: str) -> dict:
    """Per-round ratio ``num / den`` of ``key`` (both measured in the same round): printed min / median."""
    r = np.array([a[key] / b[key] for a, b in zip(results[num], results[den])], dtype=float)
    print(f"  {num} / {den}: min {r.min():.2f}x, median {np.median(r):.2f}x ({key}, per round)")
    return {"ratio_min": float(r.min()), "ratio_median": float(np.median(r))}


def small_vit_spec(
    name: str = "bench-small-vit",
    *,
    dim: int = 192,
    depth: int = 4,
    heads: int = 3,
    size: int = 224,
    mpp: float = 0.5,
    notes: str = "benchmark only",
):
    """A randomly initialised ViT of H-optimus-1's family (timm ``vit_small_patch14_reg4_dinov2``, 4 register
    tokens, H-optimus-1's normalisation) with ``dim`` / ``depth`` / ``heads`` and ``size`` px inputs at ``mpp``."""
    from hopt_st import models
    from hopt_st.models._spec import HOPTIMUS_MEAN, HOPTIMUS_STD

    return models.ModelSpec(
        name=name,
        dim=dim,
        input_size=size,
        mpp=mpp,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        timm_name="vit_small_patch14_reg4_dinov2",
        timm_kwargs=dict(
            img_size=size,
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            init_values=1e-5,
            num_classes=0,
            dynamic_img_size=False,
        ),
        notes=notes,
    )
