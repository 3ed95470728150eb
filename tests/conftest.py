"""Shared, session-scoped fixtures (small and fast; built once per test session).

- ``synthetic_sdata``: ``hopt_st.datasets.synthetic_visium(n_spots=150, seed=0, n_genes=60)`` at 0.5 µm/px.
  Treat it as read-only (use ``copy.deepcopy`` / build your own to modify).
- ``hest_bench_root``: a HEST-Benchmark root written by ``write_hest_layout(layout="bench")``: task
  ``"SYNTH"``, 3 samples / 3 patients / 3 folds, 100 spots and 60 genes each. The fixture value is the
  ``dict`` returned by the writer (``["root"]``, ``["task"]``, ``["sample_ids"]``, ``["genes"]``, ...).
- ``hest1k_root``: a HEST-1k folder with 2 Visium samples and 1 Xenium-like sample (zlib tiles, lossless);
  the writer's ``dict``.
- ``shared_data``: ``Path`` of ``../shared/data`` (may not exist: skip when needed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_sdata():
    from hopt_st.datasets import synthetic_visium

    return synthetic_visium(n_spots=150, image_mpp=0.5, seed=0, n_genes=60)


@pytest.fixture(scope="session")
def hest_bench_root(tmp_path_factory):
    from hopt_st.datasets import write_hest_layout

    root = tmp_path_factory.mktemp("hest_bench")
    return write_hest_layout(root, layout="bench", task="SYNTH", n_samples=3, n_spots=100, n_genes=60, seed=0)


@pytest.fixture(scope="session")
def hest1k_root(tmp_path_factory):
    from hopt_st.datasets import write_hest_layout

    root = tmp_path_factory.mktemp("hest1k")
    return write_hest_layout(
        root, layout="hest1k", n_samples=2, n_spots=80, n_genes=40, xenium=True, compression="zlib", seed=3
    )
