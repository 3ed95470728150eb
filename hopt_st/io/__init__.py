"""Readers and writers: Space Ranger, HEST-1k, HEST-Benchmark, HEST patch files.

Every reader returns a :class:`spatialdata.SpatialData` with lazy images and records the
physical pixel size following one convention, see :func:`get_image_mpp`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._hest import read_hest
from ._hest_bench import read_hest_bench
from ._mpp import get_image_mpp, set_image_mpp
from ._visium import read_visium

if TYPE_CHECKING:  # pragma: no cover
    from ._patches_h5 import read_patches


def __getattr__(name: str):
    # read_patches returns a hopt_st.pp.Patches; importing it lazily keeps io free of a pp import cycle
    if name == "read_patches":
        from ._patches_h5 import read_patches

        globals()["read_patches"] = read_patches
        return read_patches
    raise AttributeError(f"module 'hopt_st.io' has no attribute {name!r}")


__all__ = [
    "get_image_mpp",
    "read_hest",
    "read_hest_bench",
    "read_patches",
    "read_visium",
    "set_image_mpp",
]
