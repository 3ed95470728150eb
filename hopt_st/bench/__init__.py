"""HEST-Benchmark: a faithful reproduction (``protocol="hest"``) and a leakage-free one (``"strict"``)."""

from ._download import download
from ._run import run

__all__ = ["download", "run"]
