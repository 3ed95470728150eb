"""Tools: regressors from embeddings to gene expression, the target space they predict, and their score;
:func:`predict_slide` applies one to a whole H&E slide without spatial data.

The linear probes' building blocks (HEST's ridge probe from pooled per-sample moments, ridge with a per-gene
penalty) are public in :mod:`hopt_st.tl.linear`.
"""

from . import linear
from ._metrics import mean_pearson, pearson_per_gene
from ._raster import predict_raster
from ._regressor import ExpressionRegressor, fit_expression, predict_expression
from ._slide import predict_slide
from ._targets import target_matrix, top_variable_genes

__all__ = [
    "ExpressionRegressor",
    "fit_expression",
    "linear",
    "mean_pearson",
    "pearson_per_gene",
    "predict_expression",
    "predict_raster",
    "predict_slide",
    "target_matrix",
    "top_variable_genes",
]
