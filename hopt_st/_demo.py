"""The offline demo behind ``hopt-st demo``: synthetic Visium -> embed -> ridge on a spatial split -> scores.

Everything runs on CPU without model weights (``handcrafted`` encoder). The spatial split is honest: the
regressor is fitted on the spots of the left half of the slide and scored on the right half only, so
neighbouring spots cannot leak between training and test.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

ZARR_NAME = "demo.zarr"


def weights_status(name: str) -> str:
    """``"not needed"``, ``"local"`` (file in the Hugging Face cache) or ``"missing"``; never downloads."""
    from . import models

    spec = models.get_spec(name)
    if not getattr(spec, "hf_repo", None):
        return "not needed" if getattr(spec, "arch", "") == "handcrafted" else "missing"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return "missing"
    for fname in getattr(spec, "hf_filenames", ()) or ():
        hit = try_to_load_from_cache(spec.hf_repo, fname)
        if isinstance(hit, str):
            return "local"
    return "missing"


def local_models() -> list[str]:
    """Registry models usable offline: weight-free ones and those with weights in the local HF cache."""
    from . import models

    names = list(models.list_models().index)
    return [n for n in names if weights_status(n) in ("local", "not needed")]


def plain_uns(value):
    """A copy of ``value`` with str/int/float subclasses (e.g. ``torch.__version__``) as plain builtins.

    AnnData's zarr/h5ad writers only know the builtin types; provenance records sometimes hold subclasses.
    """
    if isinstance(value, dict):
        return {str(k): plain_uns(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_uns(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    for t in (str, int, float):
        if isinstance(value, t) and type(value) is not t:
            return t(value)
    return value


def sanitize_tables(sdata) -> None:
    """Make every table's ``uns["hopt_st"]`` writable (see :func:`plain_uns`), in place."""
    for table in sdata.tables.values():
        if "hopt_st" in table.uns:
            table.uns["hopt_st"] = plain_uns(dict(table.uns["hopt_st"]))


def spatial_split(xy: np.ndarray) -> np.ndarray:
    """Boolean test mask: spots right of the median x are held out (left half trains)."""
    return xy[:, 0] >= np.median(xy[:, 0])


def run_demo(
    out: str | Path,
    *,
    models: Sequence[str] = ("handcrafted",),
    n_spots: int = 400,
    seed: int = 0,
    n_top_genes: int = 50,
    overwrite: bool = False,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> dict:
    """Run the demo and write its outputs into ``out``.

    Parameters
    ----------
    out : str or Path
        Folder for ``demo.zarr``, ``per_gene_pearson.csv``, ``expression.png``, ``gene_scores.png``.
    models : sequence of str
        Encoders to compare; the first one's predictions are stored under ``obsm["predicted"]``, the
        others under ``obsm["predicted_<model>"]``.
    n_spots : int
        Spots of the synthetic sample.
    seed : int
        Seed of the synthetic sample and the regressors.
    n_top_genes : int
        Genes to predict (most variable on the training spots).
    overwrite : bool
        Replace an existing ``demo.zarr``.
    progress : bool
        Print the steps (embedding shows its own progress bar).
    say : callable, optional
        Where step messages go (default ``click.echo`` when ``progress``).

    Returns
    -------
    dict
        ``sdata``, ``scores`` (DataFrame gene x model of test-spot Pearson), ``files``, ``report`` (text).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import hopt_st as hs
    from hopt_st.tl._targets import target_matrix

    if say is None:
        import click

        say = click.echo if progress else (lambda msg: None)
    if not models:
        raise ValueError("models is empty: pass at least one encoder name, e.g. 'handcrafted'.")
    out = Path(out)
    zarr_path = out / ZARR_NAME
    if zarr_path.exists() and not overwrite:
        raise FileExistsError(
            f"{str(zarr_path)!r} already exists: pass --overwrite (overwrite=True) to replace it."
        )
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_steps = 3 + len(models)

    say(f"[1/{n_steps}] synthetic Visium sample ({n_spots} spots, seed {seed})")
    sdata = hs.datasets.synthetic_visium(n_spots=n_spots, seed=seed)
    table = sdata["table"]
    xy = np.asarray(table.obsm["spatial"], dtype=float)
    test = spatial_split(xy)
    table.obs["test"] = test
    table.obs["split"] = pd.Categorical(np.where(test, "test", "train"), categories=["train", "test"])
    say(
        f"      spatial split: {int((~test).sum())} training spots (left half), {int(test.sum())} test spots (right half)"
    )

    scores = {}
    first_reg = None
    for k, model in enumerate(models):
        say(f"[{2 + k}/{n_steps}] {model}: embed, fit ridge on the training half, predict")
        hs.pp.embed(sdata, model=model, progress=progress)
        rep = f"X_{model}"
        reg = hs.tl.fit_expression(
            table[~test].copy(), use_rep=rep, n_top_genes=n_top_genes, method="ridge", seed=seed
        )
        key = "predicted" if k == 0 else f"predicted_{model}"
        hs.tl.predict_expression(sdata, reg, key_added=key, overwrite=True)
        genes = list(reg.genes_)
        measured = target_matrix(table[test], genes, target=reg.target)
        pred = table.obsm[key].loc[table.obs_names[test], genes].to_numpy()
        scores[model] = pd.Series(hs.tl.pearson_per_gene(measured, pred), index=genes, dtype=float)
        if first_reg is None:
            first_reg = reg
    scores_df = pd.DataFrame(scores)
    scores_df.index.name = "gene"
    scores_df = scores_df.sort_values(models[0], ascending=False)

    say(f"[{n_steps - 1}/{n_steps}] figures")
    files = {}
    csv = out / "per_gene_pearson.csv"
    scores_df.to_csv(csv)
    files["per_gene_pearson"] = csv
    first = scores_df[models[0]].dropna()
    picks = list(dict.fromkeys([first.index[0], first.index[len(first) // 2], first.index[-1]]))
    fig = hs.pl.expression(sdata, picks, predicted_key="predicted", score_on="test")
    fig.suptitle(
        f"{models[0]} + ridge: best, median and worst of {len(first)} genes\n"
        "fitted on the left half of the slide, Pearson on the right (held-out) half",
        fontsize=10,
    )
    _mark_split(fig, test)
    files["expression"] = out / "expression.png"
    fig.savefig(files["expression"], dpi=110)
    plt.close(fig)
    long = scores_df.reset_index().melt(id_vars="gene", var_name="model", value_name="pearson")
    fig = hs.pl.gene_scores(long, title="Per-gene Pearson on held-out spots (right half)")
    files["gene_scores"] = out / "gene_scores.png"
    fig.savefig(files["gene_scores"], dpi=110)
    plt.close(fig)

    say(f"[{n_steps}/{n_steps}] writing {zarr_path}")
    if first_reg is not None and hasattr(first_reg, "save"):
        try:
            first_reg.save(out / f"ridge_{models[0]}")
            files["regressor"] = out / f"ridge_{models[0]}"
        except Exception as e:  # noqa: BLE001 - the regressor file is a convenience, not the demo's result
            logger.warning("Could not save the regressor: %s", e)
    sanitize_tables(sdata)
    sdata.write(zarr_path, overwrite=overwrite)
    files["zarr"] = zarr_path
    elapsed = time.perf_counter() - t0
    report = _report(scores_df, models, files, elapsed)
    return {"sdata": sdata, "scores": scores_df, "files": files, "report": report, "seconds": elapsed}


def _mark_split(fig, test: np.ndarray) -> None:
    """Dashed line between the training (left) and test (right) spots on every spot panel."""
    from matplotlib.collections import EllipseCollection

    for ax in fig.axes:
        colls = [c for c in ax.collections if isinstance(c, EllipseCollection)]
        if not colls:
            continue
        offs = np.asarray(colls[0].get_offsets())
        if len(offs) != len(test) or test.all() or not test.any():
            continue
        xb = (offs[~test, 0].max() + offs[test, 0].min()) / 2
        ax.axvline(xb, color="white", ls="--", lw=1.5)
        ax.text(
            xb,
            0.02,
            "train ← | → test ",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="white",
            bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.5, "lw": 0},
        )


def _report(scores: pd.DataFrame, models: Sequence[str], files: dict, seconds: float) -> str:
    lines = [
        "",
        "Per-gene Pearson r on the held-out (right-half) spots, measured vs predicted log1p counts:",
        "",
    ]
    width = max(len(g) for g in scores.index) if len(scores) else 4
    head = "gene".ljust(width) + "".join(f"  {m:>12}" for m in models)
    lines += [head, "-" * len(head)]
    for gene, row in scores.iterrows():
        lines.append(gene.ljust(width) + "".join(f"  {row[m]:>12.3f}" for m in models))
    lines.append("-" * len(head))
    lines.append("mean".ljust(width) + "".join(f"  {scores[m].mean():>12.3f}" for m in models))
    lines.append("median".ljust(width) + "".join(f"  {scores[m].median():>12.3f}" for m in models))
    lines += ["", "Wrote:"] + [f"  {p}" for p in files.values()] + [f"Done in {seconds:.0f} s."]
    return "\n".join(lines)
