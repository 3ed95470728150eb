"""A whole slide without spatial data as a bag of tiles: :func:`slide_tiles` (tissue detection, then a grid of
tiles of the model's patch footprint), as :func:`hopt_st.pp.embed_cohort` does for a cohort's ``slide`` rows."""

from __future__ import annotations

import logging

from spatialdata import SpatialData

from ._grid import tile_grid
from ._tissue import detect_tissue

logger = logging.getLogger(__name__)

#: name of the grid table (and ``<name>_shapes`` of its tiles) a slide's tiles are laid out in
GRID_TABLE = "grid"


def slide_tiles(sdata: SpatialData, patch_size: int, mpp: float, *, min_tissue_fraction: float = 0.75) -> str:
    """Detect the tissue of a slide (unless ``shapes["tissue"]`` exists) and tile it with squares of one model
    patch (``patch_size * mpp`` µm) that touch; returns the grid table's name (its ``obs_names`` are the tile
    ids: ``grid_shapes_<row>_<col>``)."""
    if "tissue" not in sdata.shapes:
        detect_tissue(sdata)
    size_um = float(patch_size) * float(mpp)
    tile_grid(
        sdata,
        size_um=size_um,
        spacing_um=size_um,
        shape="square",
        min_tissue_fraction=min_tissue_fraction,
        key_added=f"{GRID_TABLE}_shapes",
        table_name=GRID_TABLE,
    )
    logger.debug("slide_tiles: %d tiles of %.1f µm", sdata.tables[GRID_TABLE].n_obs, size_um)
    return GRID_TABLE
