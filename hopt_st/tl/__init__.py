"""Tools: regressors from embeddings to gene expression, the target space they predict, and their score;
:func:`predict_slide` applies one to a whole H&E slide without spatial data.

The linear probes on arrays are in :mod:`hopt_st.tl.linear`: ``hest_probe`` (HEST-Benchmark's probe),
``fit_ridge_cv`` (ridge with a per-gene penalty) and the ``LinearMap`` they fit.
"""

from . import linear
from ._metrics import mean_pearson, pearson_per_gene
from ._mil import ABMIL, MeanPoolMIL, attention_table, load_mil, mil_attention
from ._mil_protocol import cross_validate_mil, fit_mil
from ._raster import predict_raster
from ._regressor import ExpressionRegressor, fit_expression, predict_expression
from ._slide import predict_slide
from ._targets import target_matrix, top_variable_genes

__all__ = [
    "ABMIL",
    "MeanPoolMIL",
    "attention_table",
    "cross_validate_mil",
    "fit_mil",
    "load_mil",
    "mil_attention",
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
