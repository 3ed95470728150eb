"""Plots: predicted vs measured expression on the tissue, per-gene scores, benchmark heat maps."""

from ._plots import benchmark, expression, gene_scores

__all__ = ["benchmark", "expression", "gene_scores"]
