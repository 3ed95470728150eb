"""``hopt-st mil`` (cross-validate slide-level MIL on a cohort, fit the final models, write attention maps) and
``hopt-st predict --mil`` (score one whole slide with a saved MIL model). Every file is written atomically."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ._atomic import atomic_path, atomic_write_bytes

logger = logging.getLogger(__name__)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_write_bytes(path, buf.getvalue().encode())


def run_mil(
    labels: Path,
    *,
    target: Sequence[str],
    model: str,
    out: Path,
    cohort: Path | None = None,
    embeddings: Path | None = None,
    weights: Path | None = None,
    mils: Sequence[str] = ("abmil", "meanpool"),
    lrs: Sequence[float] | None = None,
    steps: Sequence[int] | None = None,
    n_splits: int = 5,
    inner_splits: int = 5,
    task: str = "auto",
    seed: int = 0,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Embed ``cohort`` (skipping slides already embedded), cross-validate each MIL model on ``target``, fit
    them on every labelled slide, and write into ``out``: ``results.csv`` (one row per model and fold),
    ``summary.csv``, ``predictions.csv`` (out-of-fold), ``per_gene.csv`` (continuous targets),
    ``<mil>.safetensors`` and ``attention/<sample_id>.csv`` (ABMIL's attention per tile). Returns ``results``
    and ``report`` (text)."""
    from .io import Bags, read_labels
    from .tl import attention_table, cross_validate_mil, fit_mil
    from .tl._mil_protocol import DEFAULT_LRS, DEFAULT_STEPS, summarize

    out = Path(out)
    if (out / "results.csv").exists() and not overwrite:
        raise FileExistsError(
            f"{str(out / 'results.csv')!r} already exists: pass --overwrite or another --out."
        )
    table = read_labels(labels)
    target = list(target)
    emb_dir = Path(embeddings) if embeddings is not None else out / "embeddings"
    if cohort is not None:
        from .pp import embed_cohort

        status = embed_cohort(
            cohort,
            model,
            emb_dir,
            weights=None if weights is None else str(weights),
            device=device,
            progress=progress,
        )
        failed = status[status["status"] == "failed"]
        if len(failed):
            logger.warning("%d slides failed to embed (see %s)", len(failed), status.attrs["status_path"])
    bags = Bags.from_cohort(emb_dir, model, table)
    out.mkdir(parents=True, exist_ok=True)
    res = cross_validate_mil(
        bags,
        table,
        target[0] if len(target) == 1 else target,
        mil=list(mils),
        lrs=tuple(lrs or DEFAULT_LRS),
        steps=tuple(steps or DEFAULT_STEPS),
        n_splits=n_splits,
        inner_splits=inner_splits,
        task=task,
        seed=seed,
        progress=progress,
    )
    summary = summarize(res)
    _write_csv(res, out / "results.csv")
    _write_csv(summary, out / "summary.csv")
    _write_csv(res.attrs["predictions"], out / "predictions.csv")
    if len(res.attrs["per_gene"]):
        _write_csv(res.attrs["per_gene"], out / "per_gene.csv")
    y = table[target].to_numpy()
    y = y[:, 0] if len(target) == 1 else y.astype(np.float64)
    keep = table[target].notna().all(axis=1).to_numpy()
    files = [out / "results.csv", out / "summary.csv", out / "predictions.csv"]
    for m in mils:
        final = fit_mil(
            bags.subset(np.flatnonzero(keep)),
            y[keep],
            mil=m,
            lrs=tuple(lrs or DEFAULT_LRS),
            steps=tuple(steps or DEFAULT_STEPS),
            n_splits=inner_splits,
            task="regression" if len(target) > 1 else task,
            seed=seed,
        )
        path = out / f"{m}.safetensors"
        final.save(path, overwrite=overwrite)
        files.append(path)
        if m == "abmil":
            (out / "attention").mkdir(exist_ok=True)
            for i in range(len(bags)):
                _write_csv(attention_table(final, bags[i]), out / "attention" / f"{bags.sample_ids[i]}.csv")
            files.append(out / "attention")
    lines = [summary.to_string(index=False), "", f"Wrote {out}:", *(f"      {p.name}" for p in files)]
    return {"results": res, "report": "\n".join(lines)}


def run_predict_mil(
    slide: Path,
    mil: Path,
    *,
    model: str,
    out: Path,
    weights: Path | None = None,
    image_mpp: float | None = None,
    image_key: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Score one whole slide with a saved MIL model: tissue -> tiles -> embeddings -> prediction, and (ABMIL)
    attention per tile. Writes ``out`` (.zarr: tissue, tiles, the grid table with embeddings and
    ``obs["attention"]``, a thumbnail; the prediction in the grid table's ``uns["hopt_st"]["mil"]``) and
    ``<out stem>_attention.png``. Returns ``prediction`` (dict), ``sdata`` and ``report``."""
    from ._constants import UNS_KEY
    from ._predict import check_input_files, check_outputs, write_slide_result
    from .io._bags import ArrayBags
    from .pp import embed
    from .pp._embed import default_key
    from .pp._slide_tiles import slide_tiles
    from .tl import ABMIL, load_mil
    from .tl._mil import _slide_scores, _store_attention
    from .tl._provenance import embedding_provenance
    from .tl._slide import _open

    check_input_files(slide, ("--mil", mil), weights)
    png = out.with_name(f"{out.stem}_attention.png")
    check_outputs(
        out, [png], (slide, mil, weights), overwrite
    )  # never an input, even with --overwrite (rule 1)
    est = load_mil(mil)
    fitted_on = est.provenance_.get("model")
    if fitted_on is not None and fitted_on != model:
        raise ValueError(
            f"--mil {mil.name!r} was fitted on {fitted_on!r} embeddings and cannot score {model!r} embeddings: "
            f"pass --model {fitted_on}."
        )
    sdata = _open(slide, image_mpp)  # a .zarr store, or a slide file
    spec_mpp, patch = est.provenance_.get("mpp", 0.5), est.provenance_.get("patch_size", 224)
    slide_tiles(sdata, int(patch), float(spec_mpp))
    key = default_key(model)
    embed(
        sdata,
        model,
        table_name="grid",
        image_key=image_key,
        key_added=key,
        weights=None if weights is None else str(weights),
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    table = sdata.tables["grid"]
    bag = ArrayBags(
        [np.asarray(table.obsm[key], dtype=np.float32)], provenance=embedding_provenance(table, key)
    )
    scores, attention = _slide_scores(est, bag)  # one pass: the prediction and (ABMIL) the attention
    if est.task_ == "regression":
        pred = scores.tolist()
        prediction = {"task": est.task_, "prediction": pred}
        text = f"prediction: {pred}"
    else:
        prediction = {
            "task": est.task_,
            "prediction": np.asarray(est.classes_)[int(np.argmax(scores))].item(),
            "probabilities": {str(c): float(p) for c, p in zip(est.classes_, scores)},
        }
        text = f"predicted {prediction['prediction']!r} " + ", ".join(
            f"P({c})={p:.3f}" for c, p in prediction["probabilities"].items()
        )
    if attention is not None:
        _store_attention(table, attention, est, key, "attention")
    table.uns[UNS_KEY]["mil"] = {**prediction, "model_file": mil.name, "model": fitted_on or model}
    result, _ = write_slide_result(sdata, out, image_key, {"grid": table}, "predict-mil")
    files = [out]
    if isinstance(est, ABMIL):
        _attention_png(table, png, f"{slide.name}: attention of {mil.name} ({text})")
        files.append(png)
    report = "\n".join([f"{table.n_obs} tiles; {text}", "Wrote " + ", ".join(str(f) for f in files)])
    return {"prediction": prediction, "sdata": result, "report": report, "json": json.dumps(prediction)}


def _attention_png(table, path: Path, title: str) -> None:
    """Tiles coloured by attention (level-0 pixels, y down)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = np.asarray(table.obsm["spatial"])
    fig, ax = plt.subplots(figsize=(6, 6))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=table.obs["attention"].to_numpy(), s=12, marker="s", cmap="viridis")
    ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    fig.colorbar(sc, ax=ax, label="attention")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
