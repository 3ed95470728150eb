"""Spatial context: each spot's embedding next to the mean embedding of its spatial neighbours."""

from __future__ import annotations

import warnings

import numpy as np


def _squidpy():
    """``import squidpy`` without its import-time docstring notices (docrep's ``SyntaxWarning: 'n_jobs' is not
    a valid key!``: third-party noise about squidpy's own docstrings, nothing a user can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".* is not a valid key!", category=SyntaxWarning)
        import squidpy

    return squidpy


def neighbour_mean(adata, X: np.ndarray, *, n_neighs: int = 6) -> np.ndarray:
    """Mean of ``X`` over each spot's ``n_neighs`` nearest spots (squidpy's ``spatial_neighbors_knn`` graph).

    Uses ``obsm["spatial"]``; the graph is returned by squidpy (``copy=True``), ``adata`` is not modified.
    A spot without neighbours (a sample of one spot) keeps its own embedding.
    """
    import anndata as ad

    if "spatial" not in adata.obsm:
        raise KeyError(
            "spatial_context=True needs spot coordinates in adata.obsm['spatial'] (x, y); none found."
        )
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if len(xy) < 2:
        return np.asarray(X, dtype=np.float32)
    tmp = ad.AnnData(obs=adata.obs[[]].copy(), obsm={"spatial": xy})  # squidpy reads AnnData, writes nothing
    k = min(n_neighs, len(xy) - 1)  # kneighbors() needs n_neighs < n_spots
    A = _squidpy().gr.spatial_neighbors_knn(tmp, n_neighs=k, copy=True).connectivities
    A = A.tocsr().astype(np.float64)
    deg = np.asarray(A.sum(axis=1)).ravel()
    out = A @ X
    has = deg > 0
    out[has] /= deg[has, None]
    out[~has] = X[~has]
    return out.astype(np.float32)
