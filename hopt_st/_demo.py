"""The offline demo behind ``hopt-st demo``: synthetic Visium -> embed -> ridge on a spatial split -> scores.

Everything runs on CPU without model weights (``handcrafted`` encoder). The spatial split is honest: the
regressor is fitted on the spots of the left half of the slide and scored on the right half only, so
neighbouring spots cannot leak between training and test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ._atomic import atomic_path, atomic_write_bytes, check_output
from .io._store import sanitize_name, write_sdata

logger = logging.getLogger(__name__)

ZARR_NAME = "demo.zarr"
#: the manifest written last into the output folder: each file the demo wrote, with a digest of its content
MARKER_NAME = ".hopt_st_demo"


def _digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names, sizes and bytes, in sorted order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f"{f.relative_to(path) if path.is_dir() else ''}|{f.stat().st_size}|".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _manifest(out: Path) -> dict[str, str | None]:
    """``{name: digest}`` of what an earlier demo run wrote into ``out`` (``None``: no digest recorded)."""
    path = out / MARKER_NAME
    if not path.is_file():
        return {}
    text = path.read_text(errors="replace")
    try:
        files = json.loads(text).get("files", {})
        return {str(k): (str(v) if v else None) for k, v in files.items()}
    except (ValueError, AttributeError):  # the plain list of names of earlier versions
        return {ln.strip(): None for ln in text.splitlines()[1:] if ln.strip()}


def _not_ours(out: Path, names: Sequence[str]) -> list[str]:
    """The names among ``names`` that exist in ``out`` and are not, unchanged, what an earlier demo run wrote."""
    written = _manifest(out)
    foreign = []
    for name in names:
        path = out / name
        if not path.exists():
            continue
        if name not in written or (written[name] is not None and written[name] != _digest(path)):
            foreign.append(name)
    return foreign


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def spatial_split(xy: np.ndarray) -> np.ndarray:
    """Boolean test mask: spots right of the median x are held out (left half trains)."""
    return xy[:, 0] >= np.median(xy[:, 0])


def _demo_sample(n_spots: int, seed: int, say):
    """The synthetic sample with its spatial split recorded in ``obs["test"]`` / ``obs["split"]``."""
    import hopt_st as hs

    sdata = hs.datasets.synthetic_visium(n_spots=n_spots, seed=seed)
    table = sdata["table"]
    test = spatial_split(np.asarray(table.obsm["spatial"], dtype=float))
    table.obs["test"] = test
    table.obs["split"] = pd.Categorical(np.where(test, "test", "train"), categories=["train", "test"])
    say(
        f"      spatial split: {int((~test).sum())} training spots (left half), {int(test.sum())} test spots (right half)"
    )
    return sdata, test


def _fit_and_score(sdata, test, model: str, key: str, n_top_genes: int, seed: int, progress: bool):
    """Embed with ``model``, fit a ridge on the training spots, predict all spots; Pearson per gene on test."""
    import hopt_st as hs

    from .pp._embed import default_key

    table = sdata["table"]
    hs.pp.embed(sdata, model=model, progress=progress)
    reg = hs.tl.fit_expression(
        table[~test].copy(),
        use_rep=default_key(hs.models.get_spec(model).name),
        n_top_genes=n_top_genes,
        method="ridge",
        seed=seed,
    )
    hs.tl.predict_expression(sdata, reg, key_added=key, overwrite=True)
    genes = list(reg.genes_)
    measured = hs.tl.target_matrix(table[test], genes, target=reg.target)
    pred = table.obsm[key].loc[table.obs_names[test], genes].to_numpy()
    return reg, pd.Series(hs.tl.pearson_per_gene(measured, pred), index=genes, dtype=float)


def _figures(sdata, test, scores: pd.DataFrame, first_model: str, out: Path) -> dict:
    """expression.png (best, median and worst gene) and gene_scores.png."""

    import hopt_st as hs

    first = scores[first_model].dropna()
    picks = list(dict.fromkeys([first.index[0], first.index[len(first) // 2], first.index[-1]]))
    fig = hs.pl.expression(sdata, picks, predicted_key="predicted", score_on="test", return_fig=True)
    fig.suptitle(
        f"{first_model} + ridge: best, median and worst of {len(first)} genes\n"
        "fitted on the left half of the slide, Pearson on the right (held-out) half",
        fontsize=10,
    )
    _mark_split(fig, test)
    files = {"expression": out / "expression.png", "gene_scores": out / "gene_scores.png"}
    _save_figure(fig, files["expression"])
    long = scores.reset_index().melt(id_vars="gene", var_name="model", value_name="pearson")
    fig = hs.pl.gene_scores(long, title="Per-gene Pearson on held-out spots (right half)")
    _save_figure(fig, files["gene_scores"])
    return files


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
    out
        Folder for ``demo.zarr``, ``per_gene_pearson.csv``, ``expression.png``, ``gene_scores.png``.
    models
        Encoders to compare; the first one's predictions are stored under ``obsm["predicted"]``, the
        others under ``obsm["predicted_<model>"]``.
    n_spots
        Spots of the synthetic sample.
    seed
        Seed of the synthetic sample and the regressors.
    n_top_genes
        Genes to predict (most variable on the training spots).
    overwrite
        Replace output files of these names that an earlier demo run did not write. The demo lists what it
        wrote, with a digest of each, in ``out/.hopt_st_demo``; a rerun regenerates and replaces those files
        when they are unchanged, so running the demo twice just works. Any other file in ``out`` is left alone, and a
        ``demo.zarr`` that hopt_st did not write is never replaced.
    progress
        Print the steps (embedding shows its own progress bar).
    say
        Where step messages go (default ``click.echo`` when ``progress``).

    Returns
    -------
    ``sdata``, ``scores`` (DataFrame gene x model of test-spot Pearson), ``files``, ``report`` (text),
    ``seconds``.
    """
    import matplotlib

    matplotlib.use("Agg")

    if say is None:
        import click

        say = click.echo if progress else (lambda msg: None)
    if not models:
        raise ValueError("models is empty: pass at least one encoder name, e.g. 'handcrafted'.")
    out = Path(out)
    zarr_path = out / ZARR_NAME
    names = [
        "per_gene_pearson.csv",
        "expression.png",
        "gene_scores.png",
        f"ridge_{sanitize_name(models[0])}.safetensors",
    ]
    foreign = _not_ours(out, [*names, ZARR_NAME])
    if foreign and not overwrite:
        raise FileExistsError(
            f"{', '.join(repr(str(out / n)) for n in foreign)} already exist and were not written by the demo "
            "(or changed since): pass --overwrite (overwrite=True) to replace them, or choose another --out."
        )
    if ZARR_NAME in foreign:  # overwrite replaces a store of ours, never one the user owns (rule 1)
        check_output(zarr_path, overwrite=overwrite, what="demo.zarr in --out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_steps = 3 + len(models)
    say(f"[1/{n_steps}] synthetic Visium sample ({n_spots} spots, seed {seed})")
    sdata, test = _demo_sample(n_spots, seed, say)
    scores, regs = {}, []
    for k, model in enumerate(models):
        say(f"[{2 + k}/{n_steps}] {model}: embed, fit ridge on the training half, predict")
        key = "predicted" if k == 0 else f"predicted_{sanitize_name(model)}"
        reg, scores[model] = _fit_and_score(sdata, test, model, key, n_top_genes, seed, progress)
        regs.append(reg)
    scores_df = pd.DataFrame(scores).rename_axis("gene").sort_values(models[0], ascending=False)

    say(f"[{n_steps - 1}/{n_steps}] figures")
    files = {"per_gene_pearson": out / "per_gene_pearson.csv"}
    atomic_write_bytes(files["per_gene_pearson"], scores_df.to_csv().encode())
    files.update(_figures(sdata, test, scores_df, models[0], out))
    say(f"[{n_steps}/{n_steps}] writing {zarr_path}")
    files["regressor"] = out / names[3]
    regs[0].save(files["regressor"], overwrite=True)  # checked above: absent, the demo's own, or overwrite
    write_sdata(sdata, zarr_path, overwrite=True)  # swapped in atomically: a failure keeps the previous store
    sdata.path = zarr_path
    files["zarr"] = zarr_path
    written = {**_manifest(out), **{Path(f).name: _digest(Path(f)) for f in files.values()}}
    manifest = {"written by": "hopt-st demo; a rerun replaces these files while unchanged", "files": written}
    atomic_write_bytes(out / MARKER_NAME, json.dumps(manifest, indent=1).encode())
    elapsed = time.perf_counter() - t0
    report = _report(scores_df, models, files, elapsed)
    return {"sdata": sdata, "scores": scores_df, "files": files, "report": report, "seconds": elapsed}


def _mark_split(fig, test: np.ndarray) -> None:
    """Dashed line between the training (left) and test (right) spots on every spot panel."""
    from matplotlib.collections import PatchCollection

    for ax in fig.axes:
        colls = [c for c in ax.collections if isinstance(c, PatchCollection)]
        if not colls:
            continue
        # spot centres in data coordinates (one circle per spot, in table row order)
        offs = np.array(
            [[(e.x0 + e.x1) / 2, (e.y0 + e.y1) / 2] for e in (p.get_extents() for p in colls[0].get_paths())]
        )
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
