"""Tools: regressors from embeddings to gene expression."""

from ._metrics import pearson_per_gene
from ._regressor import ExpressionRegressor, fit_expression, predict_expression

__all__ = ["ExpressionRegressor", "fit_expression", "pearson_per_gene", "predict_expression"]
