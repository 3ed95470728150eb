"""The predictions table: an AnnData of predicted expression annotating the same spots as the measured one.

Spatial tools draw a table's ``X`` (spatialdata-plot: ``render_shapes(..., table_name=)``; squidpy:
``spatial_scatter``), so predictions live in their own table rather than only in ``obsm`` of the counts.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata.models import TableModel, get_table_keys

from .._constants import UNS_KEY
from .._copying import detached
from ._targets import target_matrix

logger = logging.getLogger(__name__)

#: layer of the predictions table holding the measured values in the predictions' target space
MEASURED_LAYER = "measured"


def _measured(spots: AnnData, genes: list[str], target: str, layer: str | None) -> np.ndarray | None:
    """Measured expression of ``genes`` in the target space (NaN columns for genes not measured), or None when
    the spots hold no measurements of them (e.g. a slide without expression)."""
    present = [g for g in genes if g in spots.var_names]
    if not present:
        return None
    try:
        values = target_matrix(spots, present, target=target, layer=layer)
    except (ValueError, KeyError) as err:
        logger.warning("The predictions table gets no layers[%r]: %s", MEASURED_LAYER, err)
        return None
    if len(present) == len(genes):
        return values
    logger.info(
        "%d of %d predicted genes are not measured in this table; their layers[%r] columns are NaN.",
        len(genes) - len(present),
        len(genes),
        MEASURED_LAYER,
    )
    out = np.full((spots.n_obs, len(genes)), np.nan, dtype=np.float32)
    out[:, [genes.index(g) for g in present]] = values
    return out


def prediction_table(spots: AnnData, predictions: pd.DataFrame, meta: dict) -> AnnData:
    """An AnnData of ``predictions`` (spots x genes) annotating the same spots as ``spots``.

    Parameters
    ----------
    spots
        The spot table the predictions were made for (counts, ``obs``, ``obsm["spatial"]``).
    predictions
        Predicted values, index ``spots.obs_names``, one column per gene.
    meta
        ``{"genes", "target", "use_rep", "method"[, "layer"]}`` as :func:`hopt_st.tl.predict_expression`
        records it.

    Returns
    -------
    AnnData
        ``X`` float32 predictions, ``var_names`` the genes, ``obs`` a copy of ``spots.obs``,
        ``layers["measured"]`` the measured values in the same target space (when ``spots`` measures the
        genes), ``obsm["spatial"]`` and ``uns["spatial"]`` copied from ``spots`` (so squidpy draws it on the H&E),
        ``uns["hopt_st"]["prediction"] = meta``; a spatialdata ``TableModel`` annotating the same element as
        ``spots`` when ``spots`` is one.
    """
    genes = [str(g) for g in predictions.columns]
    X = predictions.loc[spots.obs_names, genes].to_numpy(dtype=np.float32)
    pred = AnnData(X=X, obs=spots.obs.copy(), var=pd.DataFrame(index=pd.Index(genes)))
    measured = _measured(spots, genes, str(meta.get("target", "log1p")), meta.get("layer"))
    if measured is not None:
        pred.layers[MEASURED_LAYER] = np.asarray(measured, dtype=np.float32)
    if "spatial" in spots.obsm:
        pred.obsm["spatial"] = np.array(spots.obsm["spatial"], copy=True)
    if "spatial" in spots.uns:  # scanpy's images and scale factors: a deep copy, nothing shared (rule 5)
        pred.uns["spatial"] = detached(spots.uns["spatial"])
    pred.uns[UNS_KEY] = {"prediction": dict(meta)}
    scan = spots.uns.get(UNS_KEY, {}).get("embeddings", {}).get(meta.get("use_rep"), {}).get("image")
    if scan:  # the full-resolution scan the embeddings were cut from (pl.expression draws the spots on it)
        pred.uns[UNS_KEY]["prediction"]["image"] = str(scan)
    if TableModel.ATTRS_KEY in spots.uns:
        region, region_key, instance_key = get_table_keys(spots)
        if not isinstance(pred.obs[region_key].dtype, pd.CategoricalDtype):
            pred.obs[region_key] = pd.Categorical(pred.obs[region_key])
        pred = TableModel.parse(pred, region=region, region_key=region_key, instance_key=instance_key)
    return pred
