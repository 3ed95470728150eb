"""hopt_st: predict spatial gene expression from H&E histology with pathology foundation models.

Data flows one way: :mod:`hopt_st.io` (readers) -> :mod:`hopt_st.pp` (patches, embeddings)
-> :mod:`hopt_st.tl` (regressors) -> :mod:`hopt_st.bench` / :mod:`hopt_st.pl`.
Encoders live in the :mod:`hopt_st.models` registry; demo data in :mod:`hopt_st.datasets`.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("hopt-st")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

from . import bench, datasets, io, models, pl, pp, tl

__all__ = ["bench", "datasets", "io", "models", "pl", "pp", "tl", "__version__"]
