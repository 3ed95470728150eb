"""Plots: predicted vs measured expression on the tissue, predicted maps over whole slides, per-gene scores,
benchmark heat maps."""

from ._plots import benchmark, expression, gene_scores
from ._slide import slide_expression

__all__ = ["benchmark", "expression", "gene_scores", "slide_expression"]
