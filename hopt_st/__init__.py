"""hopt_st: predict spatial gene expression from H&E histology with pathology foundation models.

Data flows one way: :mod:`hopt_st.io` (readers) -> :mod:`hopt_st.pp` (patches, embeddings)
-> :mod:`hopt_st.tl` (regressors) -> :mod:`hopt_st.bench` / :mod:`hopt_st.pl`.
Encoders live in the :mod:`hopt_st.models` registry; demo data in :mod:`hopt_st.datasets`.

Sub-packages are imported on first use (``hopt_st.io`` does not pull in torch), so reading a
slide stays light in memory; ``import hopt_st as hs; hs.pp.embed(...)`` works as usual.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING

try:
    __version__ = _version("hopt-st")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

_SUBPACKAGES = ("bench", "datasets", "io", "models", "pl", "pp", "tl")

if TYPE_CHECKING:  # pragma: no cover
    from . import bench, datasets, io, models, pl, pp, tl


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'hopt_st' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBPACKAGES])


__all__ = ["bench", "datasets", "io", "models", "pl", "pp", "tl", "__version__"]
