class ModelSpec:
    pass


def create(*a, **k):
    raise NotImplementedError


def get_spec(*a, **k):
    raise NotImplementedError


def list_models(*a, **k):
    raise NotImplementedError


def register(*a, **k):
    raise NotImplementedError
