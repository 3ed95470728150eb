"""Readers: Space Ranger, HEST-1k, HEST-Benchmark, HEST patch and embedding files, cohorts, Visium AnnData
(scanpy's layout), plain H&E slides.

Every reader returns a :class:`spatialdata.SpatialData` with lazy images and records the physical pixel
size following one convention, see :func:`get_image_mpp`.
"""

from __future__ import annotations

from .._errors import CorruptFileError
from .._patchset import read_patches
from ._anndata import from_anndata
from ._bags import Bags, read_labels
from ._cohort import load_cohort, read_cohort
from ._embeddings import SampleEmbeddings, read_embeddings, write_embeddings
from ._hest import read_hest
from ._hest_bench import read_hest_bench
from ._hest_xenium import read_hest_xenium
from ._mpp import get_image_mpp, set_image_mpp
from ._slide import read_slide
from ._visium import read_visium
from ._visium_hd import read_visium_hd
from ._xenium import read_xenium

__all__ = [
    "Bags",
    "CorruptFileError",
    "SampleEmbeddings",
    "from_anndata",
    "get_image_mpp",
    "load_cohort",
    "read_cohort",
    "read_embeddings",
    "read_hest",
    "read_hest_bench",
    "read_hest_xenium",
    "read_labels",
    "read_patches",
    "read_slide",
    "read_visium",
    "read_visium_hd",
    "read_xenium",
    "set_image_mpp",
    "write_embeddings",
]
