"""Pool transcripts or small bins into squares of any size in µm, by physical position.

Positions are read in the ``"micrometers"`` coordinate system that the readers add (Xenium's µm, Visium HD's
``microns_per_pixel``), never through a pixel size estimated from spot spacing. Transcripts (points) are
counted with :func:`spatialdata.aggregate`; bins (a table annotating shapes, e.g. Visium HD's 2 µm squares)
are summed by the square that holds their centre.
"""

from __future__ import annotations

import logging

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from anndata import AnnData
from scipy import sparse
from spatialdata import SpatialData, get_extent
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import Identity

from .._constants import MICROMETERS_CS, UNS_KEY
from ..io._coords import centers_um
from ..io._elements import check_new_element
from ..io._store import check_name

logger = logging.getLogger(__name__)


def _squares(
    x0: float, y0: float, nx: int, ny: int, size: float
) -> tuple[gpd.GeoDataFrame, np.ndarray, np.ndarray]:
    row, col = np.divmod(np.arange(nx * ny), nx)
    geoms = shapely.box(x0 + col * size, y0 + row * size, x0 + (col + 1) * size, y0 + (row + 1) * size)
    shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=geoms), transformations={MICROMETERS_CS: Identity()})
    return shapes, row, col


def aggregate_squares(
    sdata: SpatialData,
    size_um: float,
    *,
    points_key: str | None = None,
    feature_key: str = "feature_name",
    table_name: str | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
) -> None:
    """Pool transcripts (``points_key``) or bins (``table_name``) into squares of ``size_um`` µm.

    Parameters
    ----------
    sdata
        With its elements in ``"micrometers"`` (any hopt_st reader).
    size_um
        Side of the squares, µm; the lattice starts at a multiple of ``size_um``.
    points_key
        Transcripts to count per gene (``feature_key`` names the gene), e.g. Xenium's ``"transcripts"``.
    feature_key
        Gene column of the points.
    table_name
        Or: a table of counts annotating shapes (e.g. Visium HD ``"square_002um"``) whose rows are summed by the
        square holding their centre.
    key_added
        Name of the new table (its shapes are ``key_added + "_squares"``); default ``"square_<size>um"`` (e.g. ``"square_050um"``).
    overwrite
        Replace existing elements of that name.

    Returns
    -------
    ``None``; sets ``sdata.shapes[key_added + "_squares"]`` (squares, in ``"micrometers"``) and ``sdata.tables[key_added]``
    (counts, ``obs["array_row"/"array_col"]``, ``obsm["spatial"]`` = centres in µm, ``uns["hopt_st"]`` with
    the source table's pixel sizes and ``fullres_mpp = 1``: the squares' unit is the µm).
    """
    if not size_um > 0:
        raise ValueError(f"size_um={size_um!r} must be a positive number of µm.")
    if (points_key is None) == (table_name is None):
        raise ValueError("pass exactly one of points_key= (transcripts) or table_name= (bins).")
    key = check_name(key_added or f"square_{int(round(size_um)):03d}um", "key_added")
    shapes_key = f"{key}_squares"  # a table and a shapes element cannot share a name
    check_new_element(sdata, key, "tables", overwrite)
    check_new_element(sdata, shapes_key, "shapes", overwrite)
    source_uns = {}
    for t in sdata.tables.values():
        if UNS_KEY in t.uns:
            source_uns = t.uns[UNS_KEY]
            break
    if points_key is not None:
        import spatialdata

        if points_key not in sdata.points:
            raise KeyError(f"points {points_key!r} not found; the points are {list(sdata.points)}.")
        ext = get_extent(sdata.points[points_key], coordinate_system=MICROMETERS_CS)
        x0, y0 = np.floor(ext["x"][0] / size_um) * size_um, np.floor(ext["y"][0] / size_um) * size_um
        nx = int(np.ceil((ext["x"][1] - x0) / size_um))
        ny = int(np.ceil((ext["y"][1] - y0) / size_um))
        shapes, row, col = _squares(x0, y0, nx, ny, size_um)
        out = spatialdata.aggregate(
            values_sdata=sdata,
            values=points_key,
            by=shapes,
            value_key=feature_key,
            agg_func="count",
            target_coordinate_system=MICROMETERS_CS,
        )
        agg = out.tables["table"]
        X = sparse.csr_matrix(agg.X)
        var = agg.var.copy()
    else:
        table, xy = centers_um(sdata, table_name)
        x0, y0 = np.floor(xy.min(0) / size_um) * size_um
        ci = np.floor((xy[:, 0] - x0) / size_um).astype(int)
        ri = np.floor((xy[:, 1] - y0) / size_um).astype(int)
        nx, ny = int(ci.max()) + 1, int(ri.max()) + 1
        shapes, row, col = _squares(x0, y0, nx, ny, size_um)
        pool = sparse.csr_matrix(
            (np.ones(len(ci)), (ri * nx + ci, np.arange(len(ci)))), shape=(nx * ny, len(ci))
        )
        X = sparse.csr_matrix(pool @ sparse.csr_matrix(table.X))
        var = table.var.copy()
    keep = np.asarray(X.sum(1)).ravel() > 0  # squares without counts are dropped (outside the tissue)
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=shapes.geometry.to_numpy()[keep], index=pd.RangeIndex(int(keep.sum()))),
        transformations={MICROMETERS_CS: Identity()},
    )
    row, col = row[keep], col[keep]
    centres = np.column_stack([x0 + (col + 0.5) * size_um, y0 + (row + 0.5) * size_um])
    obs = pd.DataFrame(
        {
            "array_row": row,
            "array_col": col,
            "region": pd.Categorical([shapes_key] * len(row)),
            "square_id": np.arange(len(row)),
        },
        index=pd.Index([f"s_{size_um:g}um_{r:05d}_{c:05d}" for r, c in zip(row, col)]),
    )
    out_table = AnnData(X=X[keep].astype(np.float32), obs=obs, var=var)
    out_table.obsm["spatial"] = centres
    out_table.uns[UNS_KEY] = {
        "image_mpp": dict(source_uns.get("image_mpp", {})),
        "fullres_mpp": 1.0,
        "sample_id": source_uns.get("sample_id", ""),
        "metadata": {"aggregated_from": points_key or table_name, "square_um": float(size_um)},
    }
    sdata.shapes[shapes_key] = shapes
    sdata.tables[key] = TableModel.parse(
        out_table, region=shapes_key, region_key="region", instance_key="square_id"
    )
    logger.info(
        "aggregate_squares %r: %d squares of %g µm from %s", key, len(row), size_um, points_key or table_name
    )
