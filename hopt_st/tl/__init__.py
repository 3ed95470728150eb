"""Tools: regressors from embeddings to gene expression, the target space they predict, and their score.

The linear probes' building blocks (HEST's ridge probe from pooled per-sample moments, ridge with a per-gene
penalty) are public in :mod:`hopt_st.tl.linear`.
"""

from . import linear
from ._metrics import mean_pearson, pearson_per_gene
from ._regressor import ExpressionRegressor, fit_expression, predict_expression
from ._targets import target_matrix, top_variable_genes

__all__ = [
    "ExpressionRegressor",
    "fit_expression",
    "linear",
    "mean_pearson",
    "pearson_per_gene",
    "predict_expression",
    "target_matrix",
    "top_variable_genes",
]
