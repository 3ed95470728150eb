"""Measured expression in the space a regressor predicts (the "target")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from ..io._counts import non_count_values

TARGETS = ("log1p", "normalize_log1p", "none")
#: what the values of each target are, for colour bars and axis labels
TARGET_LABELS = {
    "log1p": "log1p counts",
    "normalize_log1p": "log1p of counts per 10,000",
    "none": "expression as given",
}


def _check_counts(M, what: str) -> None:
    bad = non_count_values(M)
    if bad.size:
        raise ValueError(
            f"{what} does not hold raw counts (found negative, non-integer or non-finite values, e.g. "
            f"{np.unique(bad)[:5].tolist()}: already log-transformed or normalised data?). Pass layer= naming a "
            "layer with raw counts, or target='none' to fit the values as they are, e.g. "
            "hs.tl.fit_expression(adata, use_rep=..., target='none')."
        )


def target_matrix(
    adata: AnnData,
    genes: Sequence[str],
    *,
    target: Literal["log1p", "normalize_log1p", "none"] = "log1p",
    layer: str | None = None,
) -> np.ndarray:
    """Measured expression of ``genes`` in the target space, as a dense float32 array.

    Parameters
    ----------
    adata
        Spots x genes, raw counts in ``X`` (or in ``layers[layer]``).
    genes
        Genes to return, in this order.
    target
        ``"log1p"``: ``log(1 + counts)`` of raw counts (HEST's choice). ``"normalize_log1p"``: counts scaled to
        10,000 per spot over all genes (``scanpy.pp.normalize_total``), then log1p. ``"none"``: values as stored.
    layer
        Layer holding the counts; ``X`` when None.

    Returns
    -------
    numpy.ndarray
        (n_obs, n_genes) float32.
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {TARGETS}.")
    genes = [str(g) for g in genes]
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(
            f"{len(missing)} of {len(genes)} genes are not in adata.var_names, e.g. {missing[:5]}; "
            "choose genes present in the data (check gene symbols vs ids)."
        )
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"layer={layer!r} is not in adata.layers ({list(adata.layers)}).")
    M = adata.X if layer is None else adata.layers[layer]
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    idx = adata.var_names.get_indexer(genes)
    sub = M[:, idx]
    if target != "none":
        _check_counts(sub, where)
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    sub = sub.astype(np.float64)
    if target == "normalize_log1p":
        _check_counts(M, where)
        total = np.asarray(M.sum(axis=1)).ravel().astype(np.float64)
        total[total == 0] = 1.0
        sub = sub / total[:, None] * 1e4
    if target in ("log1p", "normalize_log1p"):
        sub = np.log1p(sub)
    return sub.astype(np.float32)


def _sparse_target(M, target: str) -> sp.csr_matrix:
    """``M`` (raw counts) in the target space as float64 CSR; every target keeps zeros at zero."""
    M = sp.csr_matrix(M, dtype=np.float64, copy=True)
    if target == "normalize_log1p":
        total = np.asarray(M.sum(axis=1)).ravel()
        total[total == 0] = 1.0
        M = sp.csr_matrix(M.multiply(1e4 / total[:, None]))
    if target in ("log1p", "normalize_log1p"):
        M.data = np.log1p(M.data)
    return M


def top_variable_genes(
    adata: AnnData | Sequence[AnnData],
    n_top: int,
    *,
    layer: str | None = None,
    target: str = "log1p",
    genes: Sequence[str] | None = None,
) -> list[str]:
    """The ``n_top`` genes whose target expression varies most over the spots.

    Computed from sparse per-gene sums (every target keeps zeros at zero), so whole transcriptomes stay sparse.

    Parameters
    ----------
    adata
        Spots x genes with raw counts in ``X`` (or ``layers[layer]``); a list pools the spots of several
        samples.
    n_top
        Number of genes to return.
    layer
        Layer holding the counts; ``X`` when None.
    target
        Target space, see :func:`target_matrix`.
    genes
        Candidate genes (default: every gene of the first AnnData); ties are broken by this order.

    Returns
    -------
    The genes, most variable first.
    """
    adatas = [adata] if isinstance(adata, AnnData) else list(adata)
    genes = [str(g) for g in (adatas[0].var_names if genes is None else genes)]
    if n_top > len(genes):
        raise ValueError(f"n_top_genes={n_top} but there are only {len(genes)} candidate genes.")
    s1, s2, n = np.zeros(len(genes)), np.zeros(len(genes)), 0
    for a in adatas:
        if layer is not None and layer not in a.layers:
            raise KeyError(f"layer={layer!r} is not in adata.layers ({list(a.layers)}).")
        M = a.X if layer is None else a.layers[layer]
        if target != "none":
            _check_counts(M, "adata.X" if layer is None else f"adata.layers[{layer!r}]")
        idx = a.var_names.get_indexer(genes)
        if (idx < 0).any():
            missing = [g for g, i in zip(genes, idx) if i < 0]
            raise KeyError(f"{len(missing)} candidate genes are not in adata.var_names, e.g. {missing[:5]}.")
        T = _sparse_target(M, target)[:, idx]
        s1 += np.asarray(T.sum(axis=0)).ravel()
        s2 += np.asarray(T.multiply(T).sum(axis=0)).ravel()
        n += T.shape[0]
    var = s2 / n - (s1 / n) ** 2
    order = np.argsort(-var, kind="stable")[:n_top]
    return [genes[j] for j in order]
