"""``copy=True`` returns an object that shares nothing mutable with its input (issue 20, rule 5).

One home for the copies hopt_st hands back: an AnnData is copied with its ``uns`` deep-copied (scanpy's
``uns["spatial"]`` holds the hires image and the scale factors, which a shallow copy would share); a
SpatialData gets copies of its tables, shapes, attributes and of every in-memory image or label. Images and
labels backed by a dask array (read lazily from a store) are shared: a dask array cannot be changed in place, so
sharing it shares nothing mutable, and copying a whole-slide image would cost its size in memory.
"""

from __future__ import annotations

import copy

from anndata import AnnData
from spatialdata import SpatialData


def detached(value):
    """A deep copy of a plain value (``uns`` entries, ``attrs``): dicts, lists, arrays."""
    return copy.deepcopy(value)


def _raster(element):
    """An image or label element: shared when every array in it is a dask array, else a deep copy."""
    import dask.array as da

    if hasattr(element, "subtree"):  # a multiscale image (DataTree): every level's arrays
        arrays = [node.ds[v] for node in element.subtree for v in node.ds.data_vars]
    else:
        arrays = [element]
    if arrays and all(isinstance(a.data, da.Array) for a in arrays):
        return element
    return element.copy(deep=True)


def deep_copy(data: AnnData | SpatialData) -> AnnData | SpatialData:
    """A copy of ``data`` that shares nothing mutable with it (see the module docstring)."""
    if isinstance(data, AnnData):
        out = data.copy()
        out.uns = detached(dict(data.uns))  # anndata copies uns deeply already; made explicit (rule 5)
        return out
    if isinstance(data, SpatialData):
        return SpatialData(
            images={k: _raster(v) for k, v in data.images.items()},
            labels={k: _raster(v) for k, v in data.labels.items()},
            points=dict(data.points),  # dask dataframes: lazy, immutable
            shapes={k: v.copy(deep=True) for k, v in data.shapes.items()},
            tables={k: deep_copy(v) for k, v in data.tables.items()},
            attrs=detached(dict(data.attrs)),
        )
    raise TypeError(f"copy=True applies to a SpatialData or an AnnData, not to {type(data).__name__}.")
