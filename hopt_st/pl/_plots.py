def expression(*a, **k):
    raise NotImplementedError


def gene_scores(*a, **k):
    raise NotImplementedError


def benchmark(*a, **k):
    raise NotImplementedError
