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
from ..io._elements import resolve_table_name
from ..tl import pearson_per_gene, target_matrix
from ._tissue import TissueView, tissue_view

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.collections import EllipseCollection
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

_DOC_TITLE = "Figure title."
_DOC_CMAP = "Matplotlib colour map."
#: The ``save`` and ``dpi`` entries of every plot's Parameters section (scanpy's ``doc_show_save_ax`` pattern).


def _save(fig: Figure, save: str | Path | None, dpi: int) -> None:
    if save is not None:
        fig.savefig(save, dpi=dpi)
        logger.info("Saved %s", save)


# --------------------------------------------------------------------------------------------------------------
# expression on the tissue
# --------------------------------------------------------------------------------------------------------------
def _prediction_frame(
    table: AnnData, predicted_key: str, table_name: str
) -> tuple[pd.DataFrame, str, str | None]:
    if predicted_key not in table.obsm:
        raise KeyError(
            f"no predictions {predicted_key!r} in table {table_name!r}.obsm (keys: {list(table.obsm.keys())}): "
            "run hopt_st.tl.predict_expression(sdata, regressor, key_added=...) first, or pass predicted_key=."
        )
    pred = table.obsm[predicted_key]
    meta = table.uns.get(UNS_KEY, {}).get("predictions", {}).get(predicted_key, {})
    if not isinstance(pred, pd.DataFrame):
        genes = meta.get("genes")
        if genes is None or len(genes) != np.shape(pred)[1]:
            raise ValueError(
                f"table {table_name!r}.obsm[{predicted_key!r}] is an array without gene names: store a pandas "
                "DataFrame with genes as columns (hopt_st.tl.predict_expression does)."
            )
        pred = pd.DataFrame(np.asarray(pred), index=table.obs_names, columns=list(genes))
    target = meta.get("target")
    if target is None:
        logger.warning(
            "No uns[%r]['predictions'][%r]['target'] in table %r; assuming the predictions are log1p counts.",
            UNS_KEY,
            predicted_key,
            table_name,
        )
        target = "log1p"
    layer = meta.get("layer")  # the counts the regressor was fit on (X when absent)
    return pred, str(target), None if layer is None else str(layer)


def _measured(table: AnnData, genes: list[str], target: str, layer: str | None = None) -> np.ndarray:
    """Measured expression of ``genes`` in the predictions' target space, (n_obs, n_genes) float32."""
    missing = [g for g in genes if g not in table.var_names]
    if missing:
        raise KeyError(
            f"genes {missing} are not in the table's var_names; no measured values to compare with."
        )
    return np.asarray(target_matrix(table, genes, target=target, layer=layer), dtype=np.float32)


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


def _draw_spots(
    ax: Axes,
    view: TissueView,
    values: np.ndarray,
    *,
    cmap: str,
    vmin: float,
    vmax: float,
    alpha: float,
    scale: float = 1.0,
) -> EllipseCollection:
    from matplotlib.collections import EllipseCollection

    if view.image is not None:
        ax.imshow(view.image, origin="upper", interpolation="antialiased")
    d = 2 * view.radius * scale
    coll = EllipseCollection(
        widths=d,
        heights=d,
        angles=0,
        units="xy",
        offsets=view.xy,
        offset_transform=ax.transData,
        cmap=cmap,
        alpha=alpha,
        linewidths=0.4,
        edgecolors="white",
    )
    coll.set_array(np.asarray(values, dtype=float))
    coll.set_clim(vmin, vmax)
    ax.add_collection(coll)
    if view.image is not None:
        h, w = view.image.shape[:2]
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    else:
        lo = view.xy.min(axis=0) - view.radius * 2
        hi = view.xy.max(axis=0) + view.radius * 2
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(hi[1], lo[1])  # image convention: y down
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return coll


def _resolve_data(
    sdata: SpatialData | AnnData,
    table_name: str | None,
    image_key: str | None,
    show_image: bool,
    max_image_size: int,
) -> tuple[AnnData, str, TissueView]:
    """The table, its name in messages, and what the panels draw (spots and, with a SpatialData, the H&E)."""
    if isinstance(sdata, AnnData):
        table = sdata
        if "spatial" not in table.obsm:
            raise KeyError("the AnnData has no obsm['spatial'] (x, y) spot coordinates to draw the spots at.")
        xy = np.asarray(table.obsm["spatial"], dtype=float)[:, :2]
        return table, "adata", TissueView(None, xy, _radius_from_spacing(xy), None, None)
    if isinstance(sdata, SpatialData):
        tname = resolve_table_name(sdata, table_name)
        view = tissue_view(
            sdata, table_name=tname, image_key=image_key, show_image=show_image, max_size=max_image_size
        )
        return sdata.tables[tname], tname, view
    raise TypeError(f"expected a SpatialData or AnnData, got {type(sdata).__name__}.")


def _gene_frames(
    table: AnnData, tname: str, genes: list[str], predicted_key: str
) -> tuple[np.ndarray, np.ndarray, str]:
    """Measured and predicted values (n_obs, n_genes) in the predictions' target space, and its label."""
    pred, target, layer = _prediction_frame(table, predicted_key, tname)
    not_pred = [g for g in genes if g not in pred.columns]
    if not_pred:
        raise KeyError(
            f"genes {not_pred} were not predicted under {predicted_key!r}; predicted genes are "
            f"{list(pred.columns[:10])}{'...' if pred.shape[1] > 10 else ''}."
        )
    measured = _measured(table, genes, target, layer)
    predicted = pred.loc[table.obs_names, genes].to_numpy(dtype=np.float32)
    return measured, predicted, {"log1p": "log1p counts"}.get(target, target)


def _scored_spots(table: AnnData, tname: str, score_on: str | None) -> tuple[np.ndarray, str]:
    """Boolean mask of the spots the Pearson is computed on, and the note for the titles."""
    if score_on is None:
        return np.ones(table.n_obs, bool), ""
    if score_on not in table.obs.columns:
        raise KeyError(f"score_on={score_on!r} must name a boolean column of table {tname!r}.obs.")
    if table.obs[score_on].dtype != bool:
        raise TypeError(
            f"score_on={score_on!r} must name a boolean column of table {tname!r}.obs; it is "
            f"{table.obs[score_on].dtype}."
        )
    return table.obs[score_on].to_numpy(), f" ({score_on} spots)"


def _expression_layout(view: TissueView, n_genes: int, panel_size: float) -> tuple[Figure, np.ndarray]:
    """One row of (measured, predicted) panels per gene, shaped like the tissue."""
    import matplotlib.pyplot as plt

    if view.image is not None:
        aspect = view.image.shape[0] / view.image.shape[1]
    else:
        span = np.ptp(view.xy, axis=0) + 4 * view.radius
        aspect = float(span[1] / span[0]) if span[0] > 0 else 1.0
    aspect = float(np.clip(aspect, 0.25, 4.0))
    return plt.subplots(
        n_genes,
        2,
        figsize=(2 * panel_size + 1.1, n_genes * (panel_size * aspect + 0.45) + 0.2),
        squeeze=False,
        layout="constrained",
    )


@inject_docs(cmap=_DOC_CMAP)
def expression(
    sdata: SpatialData | AnnData,
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
) -> Figure:
    """Measured vs predicted expression side by side on the H&E: one row per gene, two columns.

    Measured expression is shown in the same space as the predictions (e.g. log1p counts, as recorded by
    :func:`hopt_st.tl.predict_expression` in ``uns["hopt_st"]["predictions"][predicted_key]["target"]``);
    both panels of a gene share one colour scale and its colour bar, and the gene's Pearson correlation
    between measured and predicted values over all spots is written in the titles.

    Parameters
    ----------
    sdata
        Data holding ``table.obsm[predicted_key]`` (a DataFrame of predictions, genes as columns) and raw
        counts in ``table.X`` (or in the layer the regressor was fit on, as recorded by predict_expression).
        With an AnnData, spots are drawn at ``obsm["spatial"]`` without an image.
    genes
        Gene(s) to draw; each must be a column of the predictions and a variable of the table.
    predicted_key
        Key of the predictions in ``table.obsm``.
    table_name
        {table_name}
    image_key
        {image_key} A small pyramid level is drawn, never the full slide.
    show_image
        Draw the H&E under the spots.
    cmap
        {cmap}
    alpha
        Opacity of the spots (the tissue shows through when < 1).
    spot_scale
        Draw spots this many times their true diameter (e.g. 2-3 for sparse spots on a large image).
    robust
        Colour limits from the 1st-99th percentiles of the gene's measured and predicted values together
        (``False``: min-max).
    score_on
        A boolean ``table.obs`` column (e.g. held-out test spots): the Pearson in the titles is computed on
        those spots only (all spots are still drawn). ``None``: all spots.
    max_image_size
        Largest side, in pixels, of the image level drawn.
    panel_size
        Size of one panel in inches.
    {save_dpi}

    Returns
    -------
    Figure
        ``fig.axes[2 * i]`` / ``fig.axes[2 * i + 1]`` are gene ``i``'s measured / predicted panels, then
        one colour bar per gene.
    """
    genes = _gene_list(genes)
    table, tname, view = _resolve_data(sdata, table_name, image_key, show_image, max_image_size)
    measured, predicted, label = _gene_frames(table, tname, genes, predicted_key)
    scored, where = _scored_spots(table, tname, score_on)
    fig, axes = _expression_layout(view, len(genes), panel_size)
    for i, gene in enumerate(genes):
        m, p = measured[:, i], predicted[:, i]
        vmin, vmax = _color_limits(np.concatenate([m, p]), robust)
        r = _pearson(m[scored], p[scored])
        ax_m, ax_p = axes[i]
        kw = {"cmap": cmap, "vmin": vmin, "vmax": vmax, "alpha": alpha, "scale": spot_scale}
        _draw_spots(ax_m, view, m, **kw)
        coll = _draw_spots(ax_p, view, p, **kw)
        ax_m.set_title(f"{gene}\nmeasured", fontsize=10)
        ax_p.set_title(f"{gene}\npredicted, Pearson r = {r:.2f}{where}", fontsize=10)
        cb = fig.colorbar(coll, ax=[ax_m, ax_p], shrink=0.8, pad=0.02)
        cb.set_label(f"{gene} ({label})")
    _save(fig, save, dpi)
    return fig


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


@inject_docs(cmap=_DOC_CMAP, title=_DOC_TITLE)
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
