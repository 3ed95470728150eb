"""Spatial context: each spot's embedding next to the mean embedding of its spatial neighbours."""

from __future__ import annotations

import numpy as np


def neighbour_mean(adata, X: np.ndarray, *, n_neighs: int = 6) -> np.ndarray:
    """Mean of ``X`` over each spot's spatial neighbours (squidpy's ``spatial_neighbors`` graph).

    Uses ``obsm["spatial"]`` and a k-nearest-neighbour graph (``coord_type="generic"``); the graph is built on a
    light copy, ``adata`` is not modified. A spot without neighbours keeps its own embedding.
    """
    import anndata as ad
    import squidpy as sq

    if "spatial" not in adata.obsm:
        raise KeyError(
            "spatial_context=True needs spot coordinates in adata.obsm['spatial'] (x, y); none found."
        )
    tmp = ad.AnnData(obs=adata.obs[[]].copy(), obsm={"spatial": np.asarray(adata.obsm["spatial"])})
    sq.gr.spatial_neighbors(tmp, coord_type="generic", n_neighs=min(n_neighs, max(tmp.n_obs - 1, 1)))
    A = tmp.obsp["spatial_connectivities"].tocsr().astype(np.float64)
    deg = np.asarray(A.sum(axis=1)).ravel()
    out = A @ X
    has = deg > 0
    out[has] /= deg[has, None]
    out[~has] = X[~has]
    return out.astype(np.float32)
