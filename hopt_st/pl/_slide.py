"""Predicted expression maps over a whole slide that has no measured values: :func:`slide_expression`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import shapely
from anndata import AnnData
from geopandas import GeoDataFrame, GeoSeries
from spatialdata import SpatialData

from .._docs import inject_docs
from ..io._elements import get_spot_table
from ..tl._targets import TARGET_LABELS
from ._plots import (
    _PLOT_CS,
    _color_limits,
    _draw_panel,
    _gene_list,
    _panel_data,
    _resolve_predictions,
    _save,
    _view_aspect,
)
from ._tissue import TissueView

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def _is_square(data: SpatialData | AnnData, table_name: str | None) -> bool:
    """Square tiles (polygons) rather than circles (points with a radius)."""
    if not isinstance(data, SpatialData):
        return False
    _, shapes_key = get_spot_table(data, table_name)
    return "radius" not in data.shapes[shapes_key].columns


def _as_squares(panel: SpatialData, view: TissueView) -> None:
    """Replace the panel's circles by squares of the same area (the tiles as they are)."""
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    half = view.radius * np.sqrt(np.pi) / 2  # TissueView's radius is that of a circle of the tile's area
    xy = np.asarray(view.xy, dtype=float)
    boxes = shapely.box(xy[:, 0] - half, xy[:, 1] - half, xy[:, 0] + half, xy[:, 1] + half)
    index = panel.shapes["spots"].index
    panel.shapes["spots"] = ShapesModel.parse(
        GeoDataFrame(geometry=GeoSeries(boxes, index=index)), transformations={_PLOT_CS: Identity()}
    )


@inject_docs()
def slide_expression(
    data: SpatialData | AnnData,
    genes: str | Sequence[str],
    *,
    table_name: str | None = "grid",
    predicted_key: str = "predicted",
    image_key: str | None = None,
    show_image: bool = True,
    cmap: str = "viridis",
    alpha: float = 0.8,
    robust: bool = True,
    max_image_size: int = 2000,
    ncols: int = 3,
    panel_size: float = 4.0,
    save: str | Path | None = None,
    dpi: int = 150,
    return_fig: bool = False,
) -> Figure | None:
    """Predicted expression maps over a slide: one panel per gene, tiles coloured over the H&E thumbnail.

    For slides without measured expression (e.g. after :func:`hopt_st.tl.predict_slide`); drawn through
    spatialdata-plot like :func:`hopt_st.pl.expression`, square tiles as squares and circular pseudo-spots as
    circles, over a small pyramid level of the image.

    Parameters
    ----------
    data
        SpatialData with a grid table and its predictions (the predictions table ``predicted_key``, or
        ``obsm[predicted_key]`` of the grid table); or an AnnData (drawn at ``obsm["spatial"]``).
    genes
        Gene(s) to draw, among the predicted genes.
    table_name
        The grid table.
    predicted_key
        Name of the predictions table (or ``obsm`` key of the grid table).
    {plot_image_params}
    alpha
        Opacity of the tiles.
    robust
        Colour limits of each gene from its 1st-99th percentiles (``False``: min-max).
    max_image_size
        {max_image_size}
    ncols
        Panels per row.
    panel_size
        Width of one panel in inches.
    {save_dpi}
    return_fig
        Return the figure; otherwise ``None`` (the figure is matplotlib's current one).

    Returns
    -------
    With ``return_fig=True`` the figure: ``fig.axes[i]`` is gene ``i``'s panel (the H&E as an image and the
    tiles as one ``PatchCollection`` in predictions-table row order), then one colour bar per gene.
    """
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    genes = _gene_list(genes)
    pred, _, view = _resolve_predictions(
        data, predicted_key, table_name, image_key, show_image, max_image_size
    )
    missing = [g for g in genes if g not in pred.var_names]
    if missing:
        raise KeyError(
            f"genes {missing} were not predicted under {predicted_key!r}; predicted genes are "
            f"{list(pred.var_names[:10])}{'...' if pred.n_vars > 10 else ''}."
        )
    values = np.asarray(pred[:, genes].X, dtype=np.float32)
    panel = _panel_data(view, pred, genes, None, values, 1.0)
    if _is_square(data, table_name):
        _as_squares(panel, view)
    target = str(pred.uns.get("hopt_st", {}).get("prediction", {}).get("target", "log1p"))
    label = TARGET_LABELS.get(target, target)
    ncols = max(1, min(int(ncols), len(genes)))
    nrows = int(np.ceil(len(genes) / ncols))
    aspect = _view_aspect(view)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(ncols * (panel_size + 0.8), nrows * (panel_size * aspect + 0.5)),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.ravel()[len(genes) :]:
        ax.remove()
    for i, gene in enumerate(genes):
        ax = axes.ravel()[i]
        norm = Normalize(*_color_limits(values[:, i], robust))
        _draw_panel(ax, panel, gene, None, cmap=cmap, norm=norm, alpha=alpha)
        ax.set_title(f"{gene} (predicted)", fontsize=10)
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=plt.get_cmap(cmap)), ax=ax, shrink=0.8, pad=0.02)
        cb.set_label(label)
    _save(fig, save, dpi)
    return fig if return_fig else None
