"""Readers: Space Ranger, HEST-1k, HEST-Benchmark, HEST patch and embedding files, cohorts, Visium AnnData
(scanpy's layout).

Every reader returns a :class:`spatialdata.SpatialData` with lazy images and records the physical pixel
size following one convention, see :func:`get_image_mpp`.
"""

from __future__ import annotations

from .._patchset import read_patches
from ._anndata import from_anndata
from ._cohort import load_cohort, read_cohort
from ._embeddings import SampleEmbeddings, read_embeddings, write_embeddings
from ._hest import read_hest
from ._hest_bench import read_hest_bench
from ._mpp import get_image_mpp, set_image_mpp
from ._visium import read_visium

__all__ = [
    "SampleEmbeddings",
    "from_anndata",
    "get_image_mpp",
    "load_cohort",
    "read_cohort",
    "read_embeddings",
    "read_hest",
    "read_hest_bench",
    "read_patches",
    "read_visium",
    "set_image_mpp",
    "write_embeddings",
]
