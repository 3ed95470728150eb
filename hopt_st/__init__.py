"""hopt_st: predict spatial gene expression from H&E histology with pathology foundation models.

Data flows one way: :mod:`hopt_st.io` (readers) -> :mod:`hopt_st.pp` (patches, embeddings)
-> :mod:`hopt_st.tl` (regressors) -> :mod:`hopt_st.bench` / :mod:`hopt_st.pl`.
Encoders live in the :mod:`hopt_st.models` registry; demo data in :mod:`hopt_st.datasets`.

Sub-packages load on first use (``lazy_loader``): reading a slide does not import torch, and
``import hopt_st as hs; hs.pp.embed(...)`` works as usual.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING

import lazy_loader as lazy

try:
    __version__ = _version("hopt-st")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["bench", "datasets", "io", "models", "pl", "pp", "tl", "__version__"]
__getattr__, __dir__, _ = lazy.attach(__name__, submodules=__all__[:-1])

if TYPE_CHECKING:  # pragma: no cover
    from . import bench, datasets, io, models, pl, pp, tl
