"""HEST-Benchmark: a faithful reproduction (``protocol="hest"``) and a leakage-free one (``"strict"``)."""

from ._download import download
from ._run import markdown_table, run

__all__ = ["download", "markdown_table", "run"]
