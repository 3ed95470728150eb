"""Plots: predicted vs measured expression on the tissue, per-gene scores, benchmark heat maps."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

from .._constants import UNS_KEY
from .._docs import inject_docs
from ..io._anndata import anndata_to_spatialdata
from ..io._elements import resolve_table_name
from ..tl import pearson_per_gene
from ..tl._predictions import MEASURED_LAYER, prediction_table
from ..tl._targets import TARGET_LABELS
from ._tissue import TissueView, tissue_view

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

_DOC_TITLE = "Figure title."


def _save(fig: Figure, save: str | Path | None, dpi: int) -> None:
    if save is not None:
        fig.savefig(save, dpi=dpi)
        logger.info("Saved %s", save)


# --------------------------------------------------------------------------------------------------------------
# expression on the tissue
# --------------------------------------------------------------------------------------------------------------
_PLOT_CS = "hopt_st_panel"  # coordinate system of the panels: pixels of the H&E crop drawn under the spots


def _predictions_from_obsm(table: AnnData, predicted_key: str, where: str) -> AnnData:
    """The predictions table built from ``obsm[predicted_key]`` (predictions stored before tables existed)."""
    if predicted_key not in table.obsm:
        raise KeyError(
            f"no predictions {predicted_key!r} in {where} (no table of that name, obsm keys: "
            f"{list(table.obsm.keys())}): run hopt_st.tl.predict_expression(data, regressor, key_added=...) "
            "first, or pass predicted_key=."
        )
    pred = table.obsm[predicted_key]
    meta = dict(table.uns.get(UNS_KEY, {}).get("predictions", {}).get(predicted_key, {}))
    if not isinstance(pred, pd.DataFrame):
        genes = meta.get("genes")
        if genes is None or len(genes) != np.shape(pred)[1]:
            raise ValueError(
                f"{where}.obsm[{predicted_key!r}] is an array without gene names: store a pandas DataFrame with "
                "genes as columns (hopt_st.tl.predict_expression does)."
            )
        pred = pd.DataFrame(np.asarray(pred), index=table.obs_names, columns=list(genes))
    if meta.get("target") is None:
        logger.warning(
            "No uns[%r]['predictions'][%r]['target'] in %s; assuming the predictions are log1p counts.",
            UNS_KEY,
            predicted_key,
            where,
        )
        meta["target"] = "log1p"
    return prediction_table(table, pred, meta)


def _is_prediction_table(adata: AnnData) -> bool:
    return "prediction" in adata.uns.get(UNS_KEY, {})


def _anndata_view(pred: AnnData, show_image: bool, max_size: int) -> TissueView:
    """Spots of an AnnData, on the hires/lowres H&E of its ``uns["spatial"]`` when there is one."""
    xy = np.asarray(pred.obsm["spatial"], dtype=float)[:, :2] if "spatial" in pred.obsm else None
    if xy is None:
        raise KeyError("the AnnData has no obsm['spatial'] (x, y) spot coordinates to draw the spots at.")
    scan = pred.uns.get(UNS_KEY, {}).get("prediction", {}).get("image")
    if show_image and scan and Path(scan).is_file() and pred.uns.get("spatial"):
        try:  # the full-resolution scan the spots were embedded from (recorded by pp.embed)
            sd = anndata_to_spatialdata(pred, full_table=False, source_image=False, image=scan)
        except (KeyError, ValueError, OSError) as err:
            logger.info("Not drawing the embedded scan %s: %s", scan, err)
        else:
            return tissue_view(sd, show_image=True, max_size=max_size)
    if show_image and pred.uns.get("spatial"):
        try:
            sd = anndata_to_spatialdata(pred, full_table=False, source_image=False, image=None)
        except (KeyError, ValueError) as err:  # no usable image or pixel size: spots alone
            logger.info("Drawing the spots without an image: %s", err)
        else:
            return tissue_view(sd, show_image=True, max_size=max_size)
    return TissueView(None, xy, _radius_from_spacing(xy), None, None)


def _resolve_predictions(
    data: SpatialData | AnnData,
    predicted_key: str,
    table_name: str | None,
    image_key: str | None,
    show_image: bool,
    max_image_size: int,
) -> tuple[AnnData, AnnData | None, TissueView]:
    """The predictions table, the spot table (None when ``data`` is a predictions table) and what the panels draw
    (spots in predictions-table order and, when there is one, the H&E under them)."""
    if isinstance(data, SpatialData):
        tname = resolve_table_name(data, table_name)
        spots = data.tables[tname]
        if predicted_key in data.tables and predicted_key != tname:
            pred, view_table = data.tables[predicted_key], predicted_key
        else:
            pred, view_table = _predictions_from_obsm(spots, predicted_key, f"table {tname!r}"), tname
        view = tissue_view(
            data, table_name=view_table, image_key=image_key, show_image=show_image, max_size=max_image_size
        )
        return pred, spots, view
    if isinstance(data, AnnData):
        if _is_prediction_table(data):
            pred, spots = data, None
        else:
            pred, spots = _predictions_from_obsm(data, predicted_key, "the AnnData"), data
        return pred, spots, _anndata_view(pred, show_image, max_image_size)
    raise TypeError(f"expected a SpatialData or AnnData, got {type(data).__name__}.")


def _gene_values(pred: AnnData, genes: list[str], predicted_key: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Measured and predicted values (n_obs, n_genes) in the predictions' target space, and its label."""
    not_pred = [g for g in genes if g not in pred.var_names]
    if not_pred:
        raise KeyError(
            f"genes {not_pred} were not predicted under {predicted_key!r}; predicted genes are "
            f"{list(pred.var_names[:10])}{'...' if pred.n_vars > 10 else ''}."
        )
    if MEASURED_LAYER not in pred.layers:
        raise KeyError(
            f"the predictions {predicted_key!r} have no layers[{MEASURED_LAYER!r}]: the spots do not measure "
            "these genes (or not as raw counts), so there is nothing to compare with."
        )
    sub = pred[:, genes]
    measured = np.asarray(sub.layers[MEASURED_LAYER], dtype=np.float32)
    predicted = np.asarray(sub.X, dtype=np.float32)
    target = str(pred.uns.get(UNS_KEY, {}).get("prediction", {}).get("target", "log1p"))
    return measured, predicted, TARGET_LABELS.get(target, target)


def _scored_spots(pred: AnnData, spots: AnnData | None, score_on: str | None) -> tuple[np.ndarray, str]:
    """Boolean mask of the spots the Pearson is computed on, and the note for the titles."""
    if score_on is None:
        return np.ones(pred.n_obs, bool), ""
    if score_on in pred.obs.columns:
        col = pred.obs[score_on]
    elif spots is not None and score_on in spots.obs.columns:
        col = spots.obs[score_on].reindex(pred.obs_names)
    else:
        raise KeyError(f"score_on={score_on!r} must name a boolean column of the spot table's obs.")
    if col.dtype != bool:
        raise TypeError(f"score_on={score_on!r} must name a boolean column of obs; it is {col.dtype}.")
    return col.to_numpy(), f" ({score_on} spots)"


def _panel_data(view: TissueView, pred: AnnData, genes: list[str], measured, predicted, spot_scale: float):
    """A small SpatialData for spatialdata-plot: the H&E crop, the spots on it, and a table holding the
    genes' predicted (``X``) and measured (``layers["measured"]``) values, rows in predictions-table order."""
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    n = len(view.xy)
    if n != pred.n_obs:
        raise ValueError(f"{n} spots to draw but {pred.n_obs} rows of predictions.")
    at = {_PLOT_CS: Identity()}
    spots = ShapesModel.parse(
        np.asarray(view.xy, dtype=float),
        geometry=0,
        radius=np.full(n, view.radius * spot_scale),
        index=np.arange(n),
        transformations=at,
    )
    obs = pd.DataFrame({"region": pd.Categorical(["spots"] * n), "spot": np.arange(n)}, index=pred.obs_names)
    table = AnnData(X=predicted, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    if measured is not None:  # None: predictions only (a slide without expression)
        table.layers[MEASURED_LAYER] = measured
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot")
    images = {}
    if view.image is not None:
        images["he"] = Image2DModel.parse(
            view.image, dims=("y", "x", "c"), c_coords=["r", "g", "b"], transformations=at
        )
    return SpatialData(images=images, shapes={"spots": spots}, tables={"values": table})


def _draw_panel(
    ax: Axes, panel: SpatialData, gene: str, layer: str | None, *, cmap, norm, alpha: float
) -> None:
    """One gene's values on the spots, through spatialdata-plot (``layer=None``: the predictions)."""
    import spatialdata_plot  # noqa: F401 - registers the .pl accessor

    drawn = panel.pl.render_images("he") if "he" in panel.images else panel
    drawn = drawn.pl.render_shapes(
        "spots",
        color=gene,
        table_name="values",
        table_layer=layer,
        cmap=cmap,
        norm=norm,
        fill_alpha=alpha,
        outline_alpha=0.0,
        colorbar=False,
    )
    drawn.pl.show(coordinate_systems=_PLOT_CS, ax=ax, show=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_aspect("equal")


def _view_aspect(view: TissueView) -> float:
    """Height / width of the drawn area (the image crop, else the spots' extent), clipped to 1/4..4."""
    if view.image is not None:
        aspect = view.image.shape[0] / view.image.shape[1]
    else:
        span = np.ptp(view.xy, axis=0) + 4 * view.radius
        aspect = float(span[1] / span[0]) if span[0] > 0 else 1.0
    return float(np.clip(aspect, 0.25, 4.0))


def _expression_layout(view: TissueView, n_genes: int, panel_size: float) -> tuple[Figure, np.ndarray]:
    """One row of (measured, predicted) panels per gene, shaped like the tissue."""
    import matplotlib.pyplot as plt

    aspect = _view_aspect(view)
    return plt.subplots(
        n_genes,
        2,
        figsize=(2 * panel_size + 1.1, n_genes * (panel_size * aspect + 0.45) + 0.2),
        squeeze=False,
        layout="constrained",
    )


@inject_docs()
def expression(
    data: SpatialData | AnnData,
    genes: str | Sequence[str],
    *,
    predicted_key: str = "predicted",
    table_name: str | None = None,
    image_key: str | None = None,
    show_image: bool = True,
    cmap: str = "viridis",
    alpha: float = 0.85,
    spot_scale: float = 1.0,
    robust: bool = True,
    score_on: str | None = None,
    max_image_size: int = 2000,
    panel_size: float = 3.6,
    save: str | Path | None = None,
    dpi: int = 150,
    return_fig: bool = False,
) -> Figure | None:
    """Measured vs predicted expression side by side on the H&E: one row per gene, two columns.

    Drawn with spatialdata-plot (``render_images`` + ``render_shapes(..., table_name=, table_layer=)``) from the
    predictions table that :func:`hopt_st.tl.predict_expression` writes: predicted values from its ``X``,
    measured ones from its ``layers["measured"]`` (the same target space, e.g. log1p counts). Both panels of a
    gene share one colour scale and its colour bar, and the gene's Pearson correlation between measured and
    predicted values is written in the titles. The H&E is a crop of a small pyramid level around the spots,
    never the whole slide.

    Parameters
    ----------
    data
        A SpatialData holding the predictions table ``predicted_key`` (or predictions in its spot table's
        ``obsm[predicted_key]``); or an AnnData: the predictions table returned by
        ``predict_expression(..., copy=True)``, or spots with ``obsm[predicted_key]``. An AnnData's spots are
        drawn at ``obsm["spatial"]`` on the hires image of its ``uns["spatial"]`` when it has one.
    genes
        Gene(s) to draw; each must be a predicted gene.
    predicted_key
        Name of the predictions table (or ``obsm`` key of the predictions).
    table_name
        {table_name}
    {plot_image_params}
    alpha
        Opacity of the spots (the tissue shows through when < 1).
    spot_scale
        Draw spots this many times their true diameter (e.g. 2-3 for sparse spots on a large image).
    robust
        Colour limits from the 1st-99th percentiles of the gene's measured and predicted values together
        (``False``: min-max).
    score_on
        A boolean ``obs`` column (e.g. held-out test spots): the Pearson in the titles is computed on those
        spots only (all spots are still drawn). ``None``: all spots.
    max_image_size
        {max_image_size}
    panel_size
        Size of one panel in inches.
    {save_dpi}
    return_fig
        Return the figure; otherwise ``None`` (scanpy's convention: a notebook shows the figure once), and the
        figure is matplotlib's current one (``plt.gcf()``).

    Returns
    -------
    With ``return_fig=True`` the figure: ``fig.axes[2 * i]`` / ``fig.axes[2 * i + 1]`` are gene ``i``'s
    measured / predicted panels (each with the H&E as an image and the spots as one ``PatchCollection`` in
    predictions-table row order), then one colour bar per gene.
    """
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    genes = _gene_list(genes)
    pred, spots, view = _resolve_predictions(
        data, predicted_key, table_name, image_key, show_image, max_image_size
    )
    measured, predicted, label = _gene_values(pred, genes, predicted_key)
    scored, where = _scored_spots(pred, spots, score_on)
    panel = _panel_data(view, pred, genes, measured, predicted, spot_scale)
    fig, axes = _expression_layout(view, len(genes), panel_size)
    for i, gene in enumerate(genes):
        m, p = measured[:, i], predicted[:, i]
        norm = Normalize(*_color_limits(np.concatenate([m, p]), robust))
        r = _pearson(m[scored], p[scored])
        ax_m, ax_p = axes[i]
        _draw_panel(ax_m, panel, gene, MEASURED_LAYER, cmap=cmap, norm=norm, alpha=alpha)
        _draw_panel(ax_p, panel, gene, None, cmap=cmap, norm=norm, alpha=alpha)
        ax_m.set_title(f"{gene}\nmeasured", fontsize=10)
        ax_p.set_title(f"{gene}\npredicted, Pearson r = {r:.2f}{where}", fontsize=10)
        cb = fig.colorbar(
            ScalarMappable(norm=norm, cmap=plt.get_cmap(cmap)), ax=[ax_m, ax_p], shrink=0.8, pad=0.02
        )
        cb.set_label(f"{gene} ({label})")
    _save(fig, save, dpi)
    return fig if return_fig else None


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over the spots where both values are finite (NaN when fewer than 2)."""
    ok = np.isfinite(a) & np.isfinite(b)
    return float(pearson_per_gene(a[ok], b[ok])[0]) if ok.sum() >= 2 else float("nan")


def _color_limits(values: np.ndarray, robust: bool) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1, 99]) if robust else (v.min(), v.max())
    if hi <= lo:
        hi = lo + 1e-6
    return float(lo), float(hi)


def _gene_list(genes: str | Sequence[str]) -> list[str]:
    """One gene name or several, as a non-empty list."""
    if isinstance(genes, str):
        return [genes]
    if not isinstance(genes, Iterable):
        raise TypeError(f"genes must be a gene name or a sequence of names, got {type(genes).__name__}.")
    genes = list(genes)
    if not genes:
        raise ValueError("genes is empty: pass one or more gene names.")
    return genes


def _radius_from_spacing(xy: np.ndarray) -> float:
    if len(xy) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]) * 0.45)


# --------------------------------------------------------------------------------------------------------------
# per-gene scores
# --------------------------------------------------------------------------------------------------------------
def _score_groups(results: pd.Series | Mapping[str, float] | pd.DataFrame) -> dict[str, pd.Series]:
    """Normalise the accepted inputs to {panel title: Series gene -> pearson}."""
    if isinstance(results, pd.Series):
        return {str(results.name) if results.name is not None else "": results.astype(float)}
    if isinstance(results, Mapping):
        return {"": pd.Series({str(k): float(v) for k, v in results.items()}, dtype=float)}
    if isinstance(results, pd.DataFrame):
        per_gene = results.attrs.get("per_gene") if {"gene", "pearson"} - set(results.columns) else results
        if per_gene is None:
            raise ValueError(
                "the DataFrame has neither 'gene'/'pearson' columns nor attrs['per_gene'] (as returned by "
                "hopt_st.bench.run): pass a Series gene -> Pearson, a dict, or a bench results table."
            )
        per_gene = pd.DataFrame(per_gene)
        keys = [
            c for c in ("task", "model", "protocol") if c in per_gene.columns and per_gene[c].nunique() > 1
        ]
        if not keys:
            return {"": per_gene.groupby("gene")["pearson"].mean()}
        out = {}
        for k, grp in per_gene.groupby(keys, sort=True):
            k = k if isinstance(k, tuple) else (k,)
            out[" · ".join(str(v) for v in k)] = grp.groupby("gene")["pearson"].mean()
        return out
    raise TypeError(
        f"expected a Series gene -> Pearson, a dict, or a bench results DataFrame, got {type(results).__name__}."
    )


@inject_docs(title=_DOC_TITLE)
def gene_scores(
    results: pd.Series | Mapping[str, float] | pd.DataFrame,
    *,
    top: int | None = None,
    title: str | None = None,
    color: str = "#3b75af",
    save: str | Path | None = None,
    dpi: int = 150,
) -> Figure:
    """Per-gene Pearson correlation as sorted horizontal bars, best gene at the top.

    Parameters
    ----------
    results
        gene -> Pearson (Series or dict); or a DataFrame with ``gene`` and ``pearson`` columns; or the table
        returned by :func:`hopt_st.bench.run`, whose ``attrs["per_gene"]`` is used (one panel per
        task/model/protocol that varies).
    top
        Draw only the ``top`` best genes of each panel.
    title
        {title}
    color
        Bar colour (negative correlations are drawn in grey).
    {save_dpi}

    Returns
    -------
    Figure
        One panel of bars per group, titled with its mean Pearson over all its genes.
    """
    import matplotlib.pyplot as plt

    groups = _score_groups(results)
    groups = {k: v.dropna().sort_values(ascending=False) for k, v in groups.items()}
    stats = {k: (float(v.mean()), len(v)) for k, v in groups.items()}  # over all genes, before `top`
    if top is not None:
        groups = {k: v.iloc[:top] for k, v in groups.items()}
    if not groups or all(len(v) == 0 for v in groups.values()):
        raise ValueError("no per-gene scores to draw (empty input or all NaN).")
    n = len(groups)
    height = max(2.5, 0.17 * max(len(v) for v in groups.values()) + 1.3)
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n, height), squeeze=False, layout="constrained")
    for ax, (name, s) in zip(axes[0], groups.items()):
        y = np.arange(len(s))
        colors = [color if v >= 0 else "0.6" for v in s.to_numpy()]
        ax.barh(y, s.to_numpy(), color=colors)
        ax.set_yticks(y, labels=list(s.index), fontsize=8 if len(s) > 25 else 9)
        ax.set_ylim(len(s) - 0.5, -0.5)  # best first, at the top
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("Pearson r (measured vs predicted)")
        mean, n_all = stats[name]
        ax.axvline(mean, color="tab:red", ls="--", lw=1)
        shown = f", top {len(s)} shown" if len(s) < n_all else ""
        ax.set_title(
            f"{name + chr(10) if name else ''}mean r = {mean:.3f} (dashed) over {n_all} genes{shown}",
            fontsize=10,
        )
        ax.set_xlim(
            min(0.0, float(s.min()) - 0.05), max(1.0, float(s.max()) + 0.05) if s.max() > 0.9 else 1.0
        )
    if title:
        fig.suptitle(title)
    _save(fig, save, dpi)
    return fig


# --------------------------------------------------------------------------------------------------------------
# benchmark heat map
# --------------------------------------------------------------------------------------------------------------
def _check_results(results: pd.DataFrame, value: str) -> None:
    if not isinstance(results, pd.DataFrame):
        raise TypeError(
            f"expected the DataFrame returned by hopt_st.bench.run, got {type(results).__name__}."
        )
    need = {"task", "model", value}
    if need - set(results.columns):
        raise ValueError(
            f"the results table lacks columns {sorted(need - set(results.columns))} (it has {list(results.columns)})."
        )
    if results.empty:
        raise ValueError("the results table is empty.")


def _heat_limits(values: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """Colour limits shared by all panels: from ``min(0, lowest)`` to the highest score unless given."""
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    # from 0 (or below, for negative scores) so that small differences do not look like large ones
    vmin = min(0.0, lo) if vmin is None else float(vmin)
    vmax = max(hi, vmin + 0.1) if vmax is None else float(vmax)
    return vmin, vmax


def _model_by_task(
    sub: pd.DataFrame, value: str, std_col: str | None, models: list, tasks: list, average: bool
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Models x tasks means of ``value`` (and of ``std_col``), with an ``Average`` column when asked."""
    mat = sub.pivot_table(index="model", columns="task", values=value, aggfunc="mean").reindex(
        index=models, columns=tasks
    )
    std = (
        sub.pivot_table(index="model", columns="task", values=std_col, aggfunc="mean").reindex(
            index=models, columns=tasks
        )
        if std_col
        else None
    )
    if average:
        mat["Average"] = mat[tasks].mean(axis=1)
        if std is not None:
            std["Average"] = np.nan
    return mat, std


def _write_cells(ax: Axes, im, m: np.ndarray, std: pd.DataFrame | None, cmap: str, fmt: str) -> None:
    """Each finite value (and ``± std``) in its cell, black on light colours, white on dark ones."""
    import matplotlib.pyplot as plt

    norm = im.norm
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            v = m[i, j]
            if not np.isfinite(v):
                continue
            text = fmt.format(v)
            if std is not None and np.isfinite(std.iat[i, j]):
                text += f"\n± {std.iat[i, j]:.3f}"
            rgba = plt.get_cmap(cmap)(norm(v))
            lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="k" if lum > 0.5 else "w")


@inject_docs(title=_DOC_TITLE)
def benchmark(
    results: pd.DataFrame,
    *,
    value: str = "pearson_mean",
    show_std: bool = True,
    average: bool = True,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    fmt: str = "{:.3f}",
    title: str | None = None,
    save: str | Path | None = None,
    dpi: int = 150,
) -> Figure:
    """Task x model heat map of a benchmark's scores, values written in each cell.

    Rows are models, columns tasks (as in HEST-Benchmark's README), one panel per protocol when
    several are present.

    Parameters
    ----------
    results
        As returned by :func:`hopt_st.bench.run`: columns ``task``, ``model``, ``value`` (default
        ``pearson_mean``), optionally ``protocol`` and ``pearson_std``.
    value
        Column holding the score.
    show_std
        Write ``± std`` under the value when a ``pearson_std`` column is present.
    average
        Add an ``Average`` column (mean over tasks) when there are several tasks.
    cmap
        {cmap}
    vmin
        Lower colour limit, shared by all panels; default ``min(0, lowest score)``.
    vmax
        Upper colour limit, shared by all panels; default the highest score.
    fmt
        Format of the written values (:meth:`str.format`).
    title
        {title}
    {save_dpi}

    Returns
    -------
    Figure
        ``fig.axes`` holds one heat map per protocol, then the colour bar(s).
    """
    import matplotlib.pyplot as plt

    _check_results(results, value)
    df = results.copy()
    if "protocol" not in df.columns:
        df["protocol"] = ""
    protocols = list(dict.fromkeys(df["protocol"]))
    std_col = "pearson_std" if show_std and "pearson_std" in df.columns and value == "pearson_mean" else None
    vmin, vmax = _heat_limits(df[value].to_numpy(dtype=float), vmin, vmax)
    tasks = list(dict.fromkeys(df["task"]))
    models = list(dict.fromkeys(df["model"]))
    cols = tasks + (["Average"] if average and len(tasks) > 1 else [])
    fig, axes = plt.subplots(
        1,
        len(protocols),
        figsize=(max(3.5, 1.05 * len(cols) + 2.2) * len(protocols), 0.6 * len(models) + 1.9),
        squeeze=False,
        layout="constrained",
    )
    im = None
    for ax, proto in zip(axes[0], protocols):
        sub = df[df["protocol"] == proto]
        mat, std = _model_by_task(sub, value, std_col, models, tasks, "Average" in cols)
        m = mat.to_numpy(dtype=float)
        im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(np.arange(len(cols)), labels=cols, rotation=35, ha="right")
        ax.set_yticks(np.arange(len(models)), labels=models)
        if "Average" in cols:
            ax.axvline(len(tasks) - 0.5, color="w", lw=2)
        _write_cells(ax, im, m, std, cmap, fmt)
        ax.set_title(f"protocol: {proto}" if proto else "", fontsize=10)
        ax.set_xlabel("task")
        ax.set_ylabel("model")
    cb = fig.colorbar(im, ax=list(axes[0]), shrink=0.9)
    cb.set_label(value.replace("_", " "))
    if title:
        fig.suptitle(title)
    _save(fig, save, dpi)
    return fig
