class ExpressionRegressor:
    pass


def fit_expression(*a, **k):
    raise NotImplementedError


def predict_expression(*a, **k):
    raise NotImplementedError
