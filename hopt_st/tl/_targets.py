"""Measured expression in the space a regressor predicts (the "target")."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

TARGETS = ("log1p", "normalize_log1p", "none")


def _check_counts(M, what: str) -> None:
    data = M.data if sp.issparse(M) else np.asarray(M)
    if data.size == 0:
        return
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{what} contains NaN or infinite values; raw counts are required for this target.")
    if data.min() < 0 or not np.all(np.equal(np.mod(data, 1), 0)):
        raise ValueError(
            f"{what} does not hold raw counts (found negative or non-integer values, e.g. already "
            "log-transformed or normalised data). Pass layer= naming a layer with raw counts, or "
            "target='none' to use the values as they are."
        )


def target_matrix(adata, genes, *, target: str = "log1p", layer: str | None = None) -> np.ndarray:
    """Measured expression of ``genes`` in the target space, as a dense float32 array.

    Parameters
    ----------
    adata : anndata.AnnData
        Spots x genes, raw counts in ``X`` (or in ``layers[layer]``).
    genes : list of str
        Genes to return, in this order.
    target : {"log1p", "normalize_log1p", "none"}
        ``"log1p"``: ``log(1 + counts)`` of raw counts (HEST's choice). ``"normalize_log1p"``: counts scaled to
        10,000 per spot over all genes (``scanpy.pp.normalize_total``), then log1p. ``"none"``: values as stored.
    layer : str, optional
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


def top_variable_genes(adata, n_top: int, *, layer: str | None = None, target: str = "log1p") -> list[str]:
    """The ``n_top`` genes with the highest variance of the target expression (ties by name order)."""
    if n_top > adata.n_vars:
        raise ValueError(f"n_top_genes={n_top} but the data has only {adata.n_vars} genes.")
    Y = target_matrix(adata, list(adata.var_names), target=target, layer=layer).astype(np.float64)
    var = Y.var(axis=0)
    order = np.argsort(-var, kind="stable")[:n_top]
    return [str(adata.var_names[i]) for i in order]
