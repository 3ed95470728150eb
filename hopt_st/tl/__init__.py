"""Tools: regressors from embeddings to gene expression."""

from ._regressor import ExpressionRegressor, fit_expression, predict_expression

__all__ = ["ExpressionRegressor", "fit_expression", "predict_expression"]
