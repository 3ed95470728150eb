"""Check that an AnnData holds raw counts (non-negative integers), the input every reader promises."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from anndata import AnnData
from scipy import sparse

logger = logging.getLogger(__name__)


def _values(x) -> np.ndarray:
    if sparse.issparse(x):
        return np.asarray(x.data)
    return np.asarray(x).ravel()


def _non_integer(x, sample: int = 200_000) -> np.ndarray:
    v = _values(x)
    if np.issubdtype(v.dtype, np.integer) or v.dtype == bool:
        return v[:0]
    v = v[:sample] if v.size > sample else v
    bad = (v != np.round(v)) | (v < 0) | ~np.isfinite(v)
    return v[bad]


def ensure_raw_counts(adata: AnnData, path: str | Path) -> None:
    """Make ``adata.X`` raw counts, in place, or raise.

    When ``X`` is not integer-valued but ``layers["counts"]`` or ``adata.raw`` is, that is used instead
    (with a log message); otherwise a ``ValueError`` names the file, shows offending values and the fix.
    """
    bad = _non_integer(adata.X)
    if bad.size == 0:
        return
    for name in ("counts", "raw_counts"):
        if name in adata.layers and _non_integer(adata.layers[name]).size == 0:
            logger.info("%s: X is not raw counts; using layers[%r].", path, name)
            adata.X = adata.layers[name]
            return
    if adata.raw is not None and adata.raw.shape == adata.shape and _non_integer(adata.raw.X).size == 0:
        logger.info("%s: X is not raw counts; using adata.raw.X.", path)
        adata.X = adata.raw.X
        return
    raise ValueError(
        f"{str(path)!r} does not hold raw counts: X has non-integer or negative values "
        f"(e.g. {np.unique(bad)[:5].tolist()}), and there is no integer layers['counts'] or adata.raw. "
        "hopt_st needs the raw UMI counts (it normalises itself): use the unnormalised matrix, e.g. the "
        "Space Ranger filtered_feature_bc_matrix.h5 or the HEST st/{id}.h5ad as downloaded."
    )
