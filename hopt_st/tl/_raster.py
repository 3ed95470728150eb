"""Predicted genes as a raster: a regressor fit on bins or cells applied to a whole slide's token map.

For an H&E slide without spatial transcriptomics, :func:`predict_raster` lays squares of ``bin_um`` over the
token map (:func:`hopt_st.pp.embed_tokens`), reads each square's features exactly as
:func:`hopt_st.pp.token_features` reads a Visium HD bin, and predicts: one image element, one channel per
gene, in ``"micrometers"``.
"""

from __future__ import annotations

import logging

import numpy as np
from spatialdata import SpatialData
from spatialdata.models import Image2DModel
from spatialdata.transformations import Scale, Sequence, Translation

from .._constants import MICROMETERS_CS
from ..io._elements import check_new_element
from ..io._store import check_name
from ._provenance import PROVENANCE_FIELDS
from ._provenance import check_provenance as _check_provenance
from ._regressor import ExpressionRegressor

logger = logging.getLogger(__name__)

#: raster rows predicted at a time (bounds the feature matrix)
_ROWS_PER_STEP = 64


def predict_raster(
    sdata: SpatialData,
    regressor: ExpressionRegressor,
    tokens_key: str,
    *,
    bin_um: float = 8.0,
    key_added: str = "predicted_raster",
    overwrite: bool = False,
    check_provenance: bool = True,
) -> None:
    """Predict expression on a lattice of ``bin_um`` squares over a whole token map.

    Parameters
    ----------
    sdata
        Holds the token map ``tokens_key``.
    regressor
        Fit on features of the same kind (:func:`hopt_st.pp.token_features` of a map of the same model,
        weights and projection, e.g. on Visium HD bins).
    tokens_key
        The token map.
    bin_um
        Side of the predicted squares, µm (8: Visium HD's recommended bin).
    key_added
        Name of the image element written.
    overwrite
        Replace an existing element.
    check_provenance
        Refuse a map whose model, weights, µm/px or patch size differ from the regressor's.

    Returns
    -------
    ``None``; sets ``sdata.images[key_added]``: float32 ``(n_genes, H, W)``, channels named after the genes,
    one pixel per square, in ``"micrometers"`` (squares outside the map are NaN). Draw a gene with
    ``sdata.pl.render_images(key_added, channel=GENE)``.
    """
    from ..pp._tokens import _map_array, read_map_boxes, token_map_record

    if not bin_um > 0:
        raise ValueError(f"bin_um={bin_um!r} must be a positive number of µm.")
    key = check_name(key_added, "key_added")
    check_new_element(sdata, key, "images", overwrite)
    rec = token_map_record(sdata, tokens_key)
    if check_provenance:
        found = {k: rec[k] for k in PROVENANCE_FIELDS if k in rec}
        _check_provenance(getattr(regressor, "provenance_", None), found, what=f"token map {tokens_key!r}")
    arr, token_um, ox, oy = _map_array(sdata, tokens_key)
    h, w = arr.shape[:2]
    nx, ny = int(np.floor(w * token_um / bin_um)), int(np.floor(h * token_um / bin_um))
    genes = list(regressor.genes_)
    out = np.full((len(genes), ny, nx), np.nan, dtype=np.float32)
    xs = ox + np.arange(nx) * bin_um
    for r0 in range(0, ny, _ROWS_PER_STEP):
        ys = oy + np.arange(r0, min(ny, r0 + _ROWS_PER_STEP)) * bin_um
        gx, gy = np.meshgrid(xs, ys)
        boxes = np.column_stack([gx.ravel(), gy.ravel(), gx.ravel() + bin_um, gy.ravel() + bin_um])
        feats = read_map_boxes(arr, token_um, ox, oy, boxes)
        ok = np.isfinite(feats).all(1)
        pred = np.full((len(feats), len(genes)), np.nan, dtype=np.float32)
        if ok.any():
            pred[ok] = np.asarray(regressor.predict(feats[ok]), dtype=np.float32).reshape(int(ok.sum()), -1)
        out[:, r0 : r0 + len(ys)] = pred.T.reshape(len(genes), len(ys), nx)
    to_um = Sequence([Scale([bin_um, bin_um], axes=("x", "y")), Translation([ox, oy], axes=("x", "y"))])
    sdata.images[key] = Image2DModel.parse(
        out,
        dims=["c", "y", "x"],
        c_coords=genes,
        chunks=(len(genes), 512, 512),
        transformations={MICROMETERS_CS: to_um},
    )
    logger.info("predict_raster %r: %d genes on %d x %d squares of %g µm", key, len(genes), ny, nx, bin_um)
