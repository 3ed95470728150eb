"""The benchmark scripts run (``--smoke``: tiny inputs, on the CPU), so that they cannot rot.

They print figures, not assertions about speed (timings never go into tests); what is checked here is that every
part runs and reports. ``embed.py``, ``patches.py``, ``embed_gpu.py`` and ``regression.py`` run in this process
(their imports are already paid); ``read_hest_memory.py``, ``synthetic_memory.py``, ``wholeslide.py`` measure
fresh processes by design and ``cohort.py`` starts Dask worker processes, so they run as scripts.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_embed_benchmark_smoke(capsys):
    assert _script("embed").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "round 2/2 hopt_st.pp.embed (default plan)" in out
    assert "ratio to naive per-spot loop: min" in out and "OK at 1e-5" in out


def test_patches_benchmark_smoke(capsys, tmp_path):
    _script("patches").main(["--smoke", "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    for line in (
        "[1] resize-bound",
        "spatialdata ImageTilesDataset (rasterize 224)",
        "max |diff| 0 grey levels",  # hopt_st's patches = the PIL loop's, bit for bit
        "[2] level present",
        "[3] large slide",
        "shuffled / sorted tiles/s",
        "summed PSS",
    ):
        assert line in out, line
    res = json.loads((tmp_path / "p.json").read_text())
    assert set(res) >= {"resize_bound", "level_present", "big", "peak_pss_total_mb"}


def test_embed_gpu_benchmark_smoke(capsys, tmp_path):
    assert _script("embed_gpu").main(["--smoke", "--json", str(tmp_path / "g.json")]) == 0
    res = json.loads((tmp_path / "g.json").read_text())
    assert res["setup"]["sdpa_fused_attn"] is True
    # the encoder hands CUDA the channels-last view of the uint8 NHWC batch; on the CPU it copies to NCHW in one
    # pass (CPU convolutions are ~3x faster on it): the smoke run is on the CPU
    assert res["setup"]["device"] == "CPU" and res["setup"]["patch_embed_input_channels_last"] is False
    assert {r["dtype"] for r in res["compute"] if "tiles_per_s" in r} >= {"bf16"}
    assert "fp32 vs bf16" in res["numerics"]
    kinds = {r["workers"] for r in res["end_to_end"]["runs"]}
    assert kinds == {"processes", "threads"} and all(r["finite"] for r in res["end_to_end"]["runs"])
    assert "plain timm fp16 loop" in res["end_to_end"]["baseline"]
    assert res["skipped"] == []
    assert "(c2)" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["read_hest_memory.py"])
def test_memory_benchmark_smoke(script):
    r = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lean import (hopt_st.io._hest only)" in r.stdout and "limit 500 MB: PASS" in r.stdout


def test_synthetic_memory_benchmark_smoke():
    r = subprocess.run(
        [sys.executable, str(BENCH / "synthetic_memory.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "round 1/1: image" in r.stdout and "limit 2,000 MB: PASS" in r.stdout


def test_mil_benchmark_smoke(capsys, tmp_path):
    assert _script("mil").main(["--smoke", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "ratio to meanpool" in out and "bags are read one at a time" in out
    assert "attention inside the planted patch" in out
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["speed"]["rows"]["abmil"]["median"] > 0
    assert 0 <= res["known_answers"]["attention_share"] <= 1


def test_regression_benchmark_smoke(capsys, tmp_path):
    """Every case runs and reports its deviation from the reference restatement of HEST's probe."""
    assert _script("regression").main(["--smoke", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "scikit-learn PCA solver: randomized" in out and "PCA solver: full" in out
    exact = [ln for ln in out.splitlines() if ln.strip().startswith(("hopt_st exact", "bench.run exact"))]
    assert len(exact) == 2
    for line in exact:  # the default path gives the reference's numbers to rounding
        assert max(float(v) for v in line.split("   ")[-1].split(",")) < 1e-12, line
    assert list(tmp_path.iterdir()) == []  # the end-to-end case's files are removed


def test_cohort_benchmark_smoke(tmp_path):
    """1 vs 2 Dask worker processes embed the same cohort: both report, and their embeddings are identical."""
    r = subprocess.run(
        [sys.executable, str(BENCH / "cohort.py"), "--smoke", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 worker : median" in r.stdout and "2 workers: median" in r.stdout
    assert "embeddings of 1 and 2 workers: identical" in r.stdout
    assert list(tmp_path.iterdir()) == []  # its temporary folder is removed


def test_wholeslide_benchmark_smoke():
    r = subprocess.run(
        [sys.executable, str(BENCH / "wholeslide.py"), "--smoke"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("tiles of 112 µm", "patch reading alone (baseline)", "reading + handcrafted embedding"):
        assert line in r.stdout, line
    pearson = float(r.stdout.split("vs the known expression: ")[1].split()[0])
    assert pearson > 0.5 and "-> OK (limit 2 GB)" in r.stdout


def test_subspot_benchmark_smoke(capsys, tmp_path):
    assert _script("subspot").main(["--smoke", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "round 2/2 one patch per bin" in out and "one patch per bin / token map: min" in out
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["forwards_per_mm2"]["one patch per bin"] == pytest.approx(1e6 / 64)  # 8 µm bins: 15,625 / mm²
