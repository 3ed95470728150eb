"""Predicted expression maps over a whole slide that has no measured values: :func:`slide_expression`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from anndata import AnnData
from spatialdata import SpatialData

from .._docs import inject_docs
from ..io._elements import get_spot_table
from ._plots import (
    _DOC_CMAP,
    _color_limits,
    _draw_spots,
    _gene_list,
    _prediction_frame,
    _resolve_data,
    _save,
)
from ._tissue import TissueView

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _is_square(sdata: SpatialData | AnnData, table_name: str) -> bool:
    """Square tiles (polygons) rather than circles (points with a radius)."""
    if not isinstance(sdata, SpatialData):
        return False
    _, shapes_key = get_spot_table(sdata, table_name)
    return "radius" not in sdata.shapes[shapes_key].columns


def _draw_squares(ax: Axes, view: TissueView, values: np.ndarray, *, cmap, vmin, vmax, alpha):
    """Squares of the tiles' area centred on ``view.xy``, coloured by ``values``, over the H&E crop."""
    from matplotlib.collections import PolyCollection

    if view.image is not None:
        ax.imshow(view.image, origin="upper", interpolation="antialiased")
    half = view.radius * np.sqrt(np.pi) / 2  # TissueView's radius is that of a circle of the tile's area
    corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    coll = PolyCollection(view.xy[:, None, :] + corners[None], cmap=cmap, alpha=alpha, linewidths=0)
    coll.set_array(np.asarray(values, dtype=float))
    coll.set_clim(vmin, vmax)
    ax.add_collection(coll)
    if view.image is not None:
        h, w = view.image.shape[:2]
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    else:
        lo, hi = view.xy.min(axis=0) - 2 * half, view.xy.max(axis=0) + 2 * half
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(hi[1], lo[1])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return coll


@inject_docs(cmap=_DOC_CMAP)
def slide_expression(
    sdata: SpatialData | AnnData,
    genes: str | Sequence[str],
    *,
    table_name: str = "grid",
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
) -> Figure:
    """Predicted expression maps over a slide: one panel per gene, tiles coloured over the H&E thumbnail.

    For slides without measured expression (e.g. after :func:`hopt_st.tl.predict_slide`); square tiles are
    drawn as squares, circular pseudo-spots as circles, over a small pyramid level of the image.

    Parameters
    ----------
    sdata
        SpatialData with a grid table holding ``obsm[predicted_key]`` (an AnnData: drawn at
        ``obsm["spatial"]`` without an image).
    genes
        Gene(s) to draw, columns of the predictions.
    table_name
        The grid table.
    predicted_key
        Key of the predictions in the table's ``obsm``.
    image_key
        {image_key} A small pyramid level is drawn, never the full slide.
    show_image
        Draw the H&E under the tiles.
    cmap
        {cmap}
    alpha
        Opacity of the tiles.
    robust
        Colour limits of each gene from its 1st-99th percentiles (``False``: min-max).
    max_image_size
        Largest side, in pixels, of the image level drawn.
    ncols
        Panels per row.
    panel_size
        Width of one panel in inches.
    {save_dpi}

    Returns
    -------
    Figure
        ``fig.axes[i]`` is gene ``i``'s panel (then the colour bars).
    """
    import matplotlib.pyplot as plt

    genes = _gene_list(genes)
    table, tname, view = _resolve_data(sdata, table_name, image_key, show_image, max_image_size)
    pred, target, _ = _prediction_frame(table, predicted_key, tname)
    missing = [g for g in genes if g not in pred.columns]
    if missing:
        raise KeyError(
            f"genes {missing} were not predicted under {predicted_key!r}; predicted genes are "
            f"{list(pred.columns[:10])}{'...' if pred.shape[1] > 10 else ''}."
        )
    values = pred.loc[table.obs_names, genes].to_numpy(dtype=np.float32)
    square = _is_square(sdata, tname)
    label = {"log1p": "log1p counts"}.get(target, target)
    ncols = max(1, min(int(ncols), len(genes)))
    nrows = int(np.ceil(len(genes) / ncols))
    if view.image is not None:
        aspect = view.image.shape[0] / view.image.shape[1]
    else:
        span = np.ptp(view.xy, axis=0) + 4 * view.radius
        aspect = float(span[1] / span[0]) if span[0] > 0 else 1.0
    aspect = float(np.clip(aspect, 0.25, 4.0))
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
        vmin, vmax = _color_limits(values[:, i], robust)
        kw = {"cmap": cmap, "vmin": vmin, "vmax": vmax, "alpha": alpha}
        coll = (
            _draw_squares(ax, view, values[:, i], **kw)
            if square
            else _draw_spots(ax, view, values[:, i], **kw)
        )
        ax.set_title(f"{gene} (predicted)", fontsize=10)
        fig.colorbar(coll, ax=ax, shrink=0.8, pad=0.02).set_label(label)
    _save(fig, save, dpi)
    return fig
