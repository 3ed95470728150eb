"""The ``hopt-st`` command line: ``demo``, ``embed``, ``embed-cohort``, ``predict``, ``mil``, ``bench``, ``models``.

Errors end the program with a non-zero exit code and a one-line reason on stderr; ``--verbose`` adds the
traceback. ``--quiet`` hides progress bars and informational messages.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
import warnings
from pathlib import Path

import click

logger = logging.getLogger(__name__)

_STATE = {"verbose": False, "quiet": False}


def _setup_logging(verbose: bool, quiet: bool) -> None:
    """hopt_st's own messages at INFO (DEBUG with --verbose, errors only with --quiet); others at WARNING."""
    _STATE.update(verbose=verbose, quiet=quiet)
    root = logging.getLogger()
    if not any(getattr(h, "_hopt_st", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s")
        )
        handler._hopt_st = True
        root.addHandler(handler)
    root.setLevel(logging.ERROR if quiet else logging.WARNING)
    logging.getLogger("hopt_st").setLevel(
        logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO
    )


def _hide_third_party_warnings() -> None:
    """Third-party chatter that says nothing about the user's data (called inside ``main``'s
    ``warnings.catch_warnings()``, so the filters end with the command and never leak into the process)."""
    warnings.filterwarnings("ignore", message=".*zarr v3 autosharding.*")
    warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
    warnings.filterwarnings("ignore", message=".*Writing zarr v2 data.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _models_option(default: str, help: str):
    """``--model NAME`` that may be repeated (into the ``models`` tuple)."""
    return click.option("--model", "models", multiple=True, default=(default,), show_default=True, help=help)


_MODEL_HELP = "Registry name (see `hopt-st models`), e.g. h-optimus-1, handcrafted."
_WEIGHTS_HELP = "Local weights file (.safetensors or .pt/.bin state dict)."
_DEVICE_HELP = "cpu, cuda, cuda:1, mps; default: the best available."


def _model_option(help: str = _MODEL_HELP):
    """``--model NAME``, required."""
    return click.option("--model", required=True, help=help)


def _weights_option(help: str = _WEIGHTS_HELP):
    """``--weights FILE``: a local weights file."""
    return click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None, help=help)


def _image_mpp_option(help: str):
    """``--image-mpp X``: µm per full-resolution pixel, > 0."""
    return click.option("--image-mpp", type=click.FloatRange(min=0, min_open=True), default=None, help=help)


def _run_options(device_help: str = _DEVICE_HELP):
    """``--batch-size`` and ``--device`` of the commands that run an encoder."""

    def decorate(f):
        f = click.option("--device", default=None, help=device_help)(f)
        return click.option("--batch-size", type=click.IntRange(1), default=None, help="Patches per batch.")(
            f
        )

    return decorate


def _echo(msg: str = "") -> None:
    if not _STATE["quiet"]:
        click.echo(msg)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hopt-st", prog_name="hopt-st")
@click.option("-q", "--quiet", is_flag=True, help="Only print results and errors (no progress bars).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, and the full traceback on errors.")
def cli(quiet: bool, verbose: bool) -> None:
    """Predict spatial gene expression from H&E with pathology foundation models."""
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose exclude each other.")
    _setup_logging(verbose, quiet)


# --------------------------------------------------------------------------------------------------------------
@cli.command()
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo_out"),
    show_default=True,
    help="Folder for the figures, tables and demo.zarr.",
)
@_models_option("handcrafted", "Encoder(s) to compare; repeat the option. Models need local weights.")
@click.option(
    "--all-local", is_flag=True, help="Also run every registry model whose weights are found locally."
)
@click.option(
    "--n-spots",
    type=click.IntRange(50, 20000),
    default=400,
    show_default=True,
    help="Spots of the synthetic sample.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace outputs in --out that the demo did not write (a rerun replaces its own, unchanged outputs); "
    "a demo.zarr that hopt_st did not write is never replaced.",
)
def demo(
    out: Path, models: tuple[str, ...], all_local: bool, n_spots: int, seed: int, overwrite: bool
) -> None:
    """Offline demo: synthetic Visium -> embed -> ridge on a spatial split -> per-gene Pearson + figures.

    Writes per_gene_pearson.csv, expression.png, gene_scores.png and demo.zarr (image, spots, counts,
    embeddings, predictions) into --out. No weights or internet needed. Running it again regenerates and
    replaces those files.

    \b
    Examples:
      hopt-st demo --out demo_out
      hopt-st demo --out demo_out --all-local        # also every model with local weights
    """
    from ._demo import run_demo
    from .models import local_models

    models = list(dict.fromkeys(models))
    if all_local:
        models += [m for m in local_models() if m not in models]
    res = run_demo(
        out, models=models, n_spots=n_spots, seed=seed, overwrite=overwrite, progress=not _STATE["quiet"]
    )
    click.echo(res["report"])


# --------------------------------------------------------------------------------------------------------------
def _read_input(
    path: Path,
    sample: str | None,
    image_mpp: float | None = None,
    image_key: str | None = None,
    image: Path | None = None,
):
    """SpatialData from a .zarr, a Space Ranger outs/ folder, or a HEST-1k root + sample id; AnnData from an .h5ad."""
    import hopt_st as hs

    if not path.exists():
        raise FileNotFoundError(f"INPUT {str(path)!r} does not exist.")
    if image is not None and not image.is_file():
        raise FileNotFoundError(f"--fullres-image {str(image)!r} does not exist.")
    is_visium = path.is_dir() and (path / "spatial").is_dir() and not _is_zarr(path)
    if image is not None and not (is_visium or path.suffix == ".h5ad") or (image is not None and sample):
        raise click.UsageError(
            "--fullres-image/--image applies to a Space Ranger outs/ folder or an .h5ad INPUT; a .zarr or HEST-1k "
            "sample already holds its image (choose it with --image-key)."
        )
    from ._cli_subspot import is_visium_hd, is_xenium

    if is_visium_hd(path):
        return hs.io.read_visium_hd(path, image_mpp=image_mpp, fullres_image_file=image), "visium_hd"
    if is_xenium(path):
        return hs.io.read_xenium(path), "xenium"
    if path.suffix == ".h5ad" and path.is_file():
        from .io._counts import read_h5ad

        return read_h5ad(path), "h5ad"  # self-contained HDF5 only (rule 4)
    if sample is not None:
        return hs.io.read_hest(path, sample, image_mpp=image_mpp), "hest"
    if _is_zarr(path):
        import spatialdata as sd

        sdata = sd.read_zarr(path)
        if image_mpp is not None:
            from .io._elements import resolve_image_key

            hs.io.set_image_mpp(sdata, {resolve_image_key(sdata, image_key): image_mpp})
        return sdata, "zarr"
    if is_visium:
        return hs.io.read_visium(path, image_mpp=image_mpp, fullres_image_file=image), "visium"
    raise click.UsageError(
        f"INPUT {str(path)!r} is neither a SpatialData .zarr, a Space Ranger outs/ folder (with spatial/), an "
        ".h5ad (scanpy's Visium layout), nor, with --sample ID, a HEST-1k root. Give one of these."
    )


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and (
        path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists()
    )


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@_model_option()
@_weights_option()
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output .zarr; default: INPUT itself when it is a .zarr.",
)
@click.option("--sample", default=None, help="Sample id when INPUT is a HEST-1k root.")
@click.option(
    "--fullres-image",
    "--image",
    "fullres_image",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The full-resolution H&E scan (the image given to Space Ranger) for a Space Ranger outs/ folder or an "
    ".h5ad INPUT; without it patches are upsampled from the hires PNG.",
)
@click.option("--key-added", default=None, help="obsm key; default X_<model>.")
@click.option("--table-name", default=None, help="Spot table; default: the only one.")
@click.option("--image-key", default=None, help="H&E image element; default: the largest.")
@_image_mpp_option(
    "µm per full-resolution pixel of the slide, overriding the value the reader records or infers "
    "(for a .zarr: of the image element's level 0)."
)
@_run_options()
@click.option("--overwrite", is_flag=True, help="Replace an existing embedding key and output.")
@click.option(
    "--bins",
    default=None,
    help="Visium HD: embed the H&E once as a token map and give every bin of this size (e.g. 8um) features.",
)
@click.option(
    "--cells", is_flag=True, help="Xenium / Space Ranger 4: token-map features of every segmented cell."
)
def embed(
    input_path,
    model,
    weights,
    out,
    sample,
    fullres_image,
    key_added,
    table_name,
    image_key,
    image_mpp,
    batch_size,
    device,
    overwrite,
    bins,
    cells,
):
    """Embed every spot of INPUT with MODEL and write the embeddings to a SpatialData .zarr (or an .h5ad).

    INPUT is a SpatialData .zarr (updated in place unless --out), a Space Ranger outs/ folder (with
    --fullres-image for the original scan), an .h5ad in scanpy's Visium layout (obsm['spatial'],
    uns['spatial']; with --image for the full-resolution scan), or a HEST-1k root with --sample ID. An
    existing embedding key or --out is never replaced without --overwrite.

    \b
    Examples:
      hopt-st embed sample.zarr --model handcrafted
      hopt-st embed outs/ --fullres-image scan.tif --model h-optimus-1 --out sample.zarr
      hopt-st embed sample.h5ad --image scan.jpg --model h-optimus-1 --out embedded.h5ad
      hopt-st embed hest_data/ --sample TENX95 --model h-optimus-1 --out TENX95.zarr
      hopt-st embed hd_outs/ --bins 8um --model h-optimus-1 --out hd.zarr
      hopt-st embed xenium_out/ --cells --model h-optimus-1 --out xenium.zarr
    """
    _check_paths(("INPUT", input_path), ("--weights", weights), ("--fullres-image", fullres_image))
    if input_path.suffix == ".h5ad":
        _check_h5ad_out(input_path, out, overwrite)
    if out is not None and out.resolve() != input_path.resolve():
        _check_out(out, (input_path, fullres_image, weights), overwrite)

    import hopt_st as hs

    from .io._elements import resolve_table_name
    from .io._store import check_name, write_sdata, write_table_in_place
    from .pp._embed import default_key

    if key_added is not None:  # a key the output cannot hold is refused before anything is read
        check_name(key_added, "--key-added")
    sdata, kind = _read_input(
        input_path, sample, image_mpp=image_mpp, image_key=image_key, image=fullres_image
    )
    key = default_key(hs.models.get_spec(model).name) if key_added is None else key_added
    run = {
        "model": model,
        "weights": str(weights) if weights is not None else None,
        "key_added": key,
        "image_key": image_key,
        "batch_size": batch_size,
        "device": device,
        "overwrite": overwrite,
        "progress": not _STATE["quiet"],
    }
    if kind == "h5ad":
        return _embed_h5ad(sdata, input_path, out, fullres_image, image_mpp, run)
    in_place = out is None or (out.resolve() == input_path.resolve())
    if in_place and kind != "zarr":
        raise click.UsageError(f"INPUT is a {kind} folder: pass --out OUT.zarr to say where to write.")
    if bins is not None or cells:
        from ._cli_subspot import embed_subspot, parse_bin_um

        if bins is not None and cells:
            raise click.UsageError("pass --bins SIZE or --cells, not both.")
        bin_um = parse_bin_um(bins)
        if in_place:  # refused before the token map is computed
            raise click.UsageError("--bins/--cells write a token map: pass --out OUT.zarr.")
        run = {k: v for k, v in run.items() if k != "key_added"}
        tname, key = embed_subspot(sdata, bin_um=bin_um, cells=cells, key_added=key_added, **run)
    else:
        hs.pp.embed(sdata, table_name=table_name, **run)
        tname = resolve_table_name(sdata, table_name)
    emb = sdata.tables[tname].obsm[key]
    if in_place:  # atomic: on any failure the store is left exactly as it was
        write_table_in_place(sdata, tname)
        dest = input_path
    else:
        write_sdata(sdata, out, overwrite=overwrite)
        dest = out
    click.echo(f"{tname}.obsm[{key!r}]: {emb.shape[0]} spots x {emb.shape[1]} dims ({model}) -> {dest}")


def _items(value: str) -> list[str]:
    """The comma-separated items of an option's value, stripped, empty ones left out."""
    return [v.strip() for v in value.split(",") if v.strip()]


def _check_paths(*named: tuple[str, Path | None]) -> None:
    """Each given path exists, else a FileNotFoundError naming the argument (before any heavy import)."""
    for what, path in named:
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{what} {str(path)!r} does not exist: check the path.")


def _check_out(out: Path, inputs, overwrite: bool) -> None:
    """``--out`` may be written (:func:`hopt_st._atomic.check_output`: absent, or ``--overwrite`` and ours; never
    an input nor inside one, rule 1), checked before anything is read (``_atomic`` imports nothing heavy)."""
    from ._atomic import check_output

    check_output(out, inputs=inputs, overwrite=overwrite, what="--out")


def _check_h5ad_out(input_path: Path, out: Path | None, overwrite: bool) -> None:
    """``--out`` of an .h5ad INPUT: given, .h5ad or .zarr, not INPUT (whether it may be written: :func:`_check_out`)."""
    if out is None or out.suffix not in (".h5ad", ".zarr"):
        raise click.UsageError("INPUT is an .h5ad: pass --out OUT.h5ad (or OUT.zarr) to say where to write.")
    if out.resolve() == input_path.resolve():
        raise click.UsageError("--out must differ from INPUT (the .h5ad is never rewritten in place).")


def _embed_h5ad(adata, input_path: Path, out: Path | None, image: Path | None, image_mpp, run: dict) -> None:
    """``embed`` for an .h5ad: to OUT.h5ad (the AnnData with the embeddings) or OUT.zarr (a SpatialData with the
    image, the spots and that AnnData as its table). ``run``: the arguments of ``pp.embed`` shared with INPUTs
    of other kinds."""
    import hopt_st as hs

    from .io._store import write_sdata

    # --out was checked (_check_h5ad_out, _check_out) before INPUT was read
    data = adata
    if out.suffix == ".zarr":
        data = hs.io.from_anndata(adata, image=image, image_mpp=image_mpp)
        image, image_mpp = None, None  # recorded in the SpatialData
    key = run["key_added"]  # validated (or the default) before anything was read
    hs.pp.embed(data, image=image, image_mpp=image_mpp, **run)
    table = data if out.suffix == ".h5ad" else data.tables["table"]
    if out.suffix == ".zarr":
        write_sdata(data, out, overwrite=run["overwrite"])
    else:
        _write_h5ad_atomically(adata, out)
    emb = table.obsm[key]
    click.echo(f"obsm[{key!r}]: {emb.shape[0]} spots x {emb.shape[1]} dims ({run['model']}) -> {out}")


def _write_h5ad_atomically(adata, out: Path) -> None:
    """Write next to ``out`` under a temporary name, then replace: a failed write leaves ``out`` as it was."""
    from ._atomic import atomic_path

    with atomic_path(out, what="--out file") as tmp:
        adata.write_h5ad(tmp)


# --------------------------------------------------------------------------------------------------------------
def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not i/N (e.g. 0/4: the first of 4 shards).", param_hint="--shard"
        ) from None
    if n < 1 or not 0 <= i < n:
        raise click.BadParameter(
            f"{value!r}: need 0 <= i < N (shards count from 0, e.g. $SLURM_ARRAY_TASK_ID/4).",
            param_hint="--shard",
        )
    return i, n


def _dask_client(stack, workers: int | None, scheduler: str | None):
    """A client of a new local cluster (``--workers``), of a running scheduler (``--scheduler``), or None."""
    if workers is None and scheduler is None:
        return None
    from distributed import Client, LocalCluster

    # a failing sample is reported in status.csv and the summary; Dask would also log each attempt's traceback,
    # its INFO lines and a jupyter-server-proxy hint: quiet unless --verbose
    silence = logging.DEBUG if _STATE["verbose"] else logging.CRITICAL
    for name in ("distributed", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(logging.DEBUG if _STATE["verbose"] else logging.ERROR)
    if workers is not None:
        cluster = stack.enter_context(
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address="127.0.0.1:0",  # a free local port: 8787 may be taken (a UserWarning)
                silence_logs=silence,
            )
        )
        return stack.enter_context(Client(cluster))
    try:
        return stack.enter_context(Client(scheduler, timeout="30s"))
    except OSError as e:
        raise click.BadParameter(
            f"cannot reach the scheduler {scheduler!r} ({e}).", param_hint="--scheduler"
        ) from None


@cli.command("embed-cohort")
@click.argument("cohort", type=click.Path(exists=True, path_type=Path))
@_model_option()
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output folder: OUT/<model>/<sample_id>.h5 (HEST's embedding layout) and OUT/<model>/status.csv.",
)
@_weights_option()
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=None,
    help="Start a local Dask cluster of N worker processes (one thread each) and spread the samples over it.",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="Address of a running Dask scheduler (tcp://host:8786) whose workers embed the samples.",
)
@click.option(
    "--shard",
    default=None,
    metavar="i/N",
    help="Only shard i of N (from 0; positions i, i+N, ... of the sorted sample ids): one SLURM array task "
    "each, no scheduler needed.",
)
@_run_options("cpu, cuda, cuda:1, mps; default: each worker's best device.")
@click.option(
    "--retries",
    type=click.IntRange(0),
    default=2,
    show_default=True,
    help="Extra attempts for a failing sample.",
)
@click.option("--overwrite", is_flag=True, help="Recompute samples whose output file exists.")
def embed_cohort(
    cohort, model, out, weights, workers, scheduler, shard, device, batch_size, retries, overwrite
):
    """Embed every sample of COHORT with MODEL, once, into one HEST-layout .h5 file per sample.

    COHORT is a CSV (columns sample_id, source; optional kind, image, image_mpp, patient, counts), a HEST-1k
    root or a HEST-Benchmark task folder. Samples whose output exists with the same fingerprint are skipped;
    failures are recorded in OUT/<model>/status.csv and the others go on (exit code 1 if any failed).

    \b
    Examples:
      hopt-st embed-cohort hest_data/ --model h-optimus-1 --out emb              # in this process
      hopt-st embed-cohort cohort.csv --model h-optimus-1 --out emb --workers 4   # local Dask cluster
      hopt-st embed-cohort cohort.csv --model uni --out emb --scheduler tcp://node1:8786
      hopt-st embed-cohort cohort.csv --model uni --out emb --shard $SLURM_ARRAY_TASK_ID/8
    """
    import contextlib

    if workers is not None and scheduler is not None:
        raise click.UsageError(
            "--workers and --scheduler exclude each other: start a local cluster or join one."
        )
    _check_paths(("--weights", weights))
    shard_ = _parse_shard(shard)
    if cohort.is_file() and not cohort.read_bytes().strip():
        raise click.BadParameter(
            f"{str(cohort)!r} is empty: write a header and one row per sample, e.g. "
            "'sample_id,source,image' then 'S1,sample1.h5ad,scan1.jpg'.",
            param_hint="COHORT",
        )

    import hopt_st as hs
    from hopt_st.io._cohort import model_dirname

    with contextlib.ExitStack() as stack:
        df = hs.pp.embed_cohort(
            cohort,
            model,
            out,
            client=lambda: _dask_client(stack, workers, scheduler),  # started only if a sample needs work
            weights=str(weights) if weights is not None else None,
            device=device,
            batch_size=batch_size,
            retries=retries,
            shard=shard_,
            overwrite=overwrite,
            progress=not _STATE["quiet"],
        )
    n = df["status"].value_counts()
    click.echo(
        f"{model}: {n.get('done', 0)} done, {n.get('skipped', 0)} skipped, {n.get('failed', 0)} failed "
        f"-> {out / model_dirname(model)} (status: {df.attrs['status_path']})"
    )
    failed = df[df["status"] == "failed"]
    for sample, error in zip(failed["sample"], failed["error"]):
        click.echo(f"  failed {sample}: {error}", err=True)
    return 1 if len(failed) else 0


# --------------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option(
    "--regressor",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A regressor saved with ExpressionRegressor.save (fitted on --model embeddings).",
)
@click.option(
    "--mil",
    "mil",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Instead of --regressor: a slide-level model saved by `hopt-st mil` (ABMIL / mean pooling).",
)
@_model_option("The encoder the regressor was fitted on, e.g. h-optimus-1.")
@_weights_option("Local weights of --model.")
@_image_mpp_option("µm per full-resolution pixel of SLIDE, when the file records none (or to override it).")
@click.option("--genes", default=None, help="Comma-separated genes to map; default: the regressor's first 3.")
@click.option(
    "--preset",
    type=click.Choice(["tiles", "visium"]),
    default="tiles",
    show_default=True,
    help="tiles: 112 µm squares tiling the tissue; visium: 55 µm spots on a 100 µm hexagonal grid.",
)
@click.option(
    "--min-tissue-fraction",
    type=click.FloatRange(0, 1),
    default=0.75,
    show_default=True,
    help="Keep tiles with at least this fraction on tissue.",
)
@click.option("--image-key", default=None, help="H&E image element of a .zarr SLIDE; default: the largest.")
@_run_options()
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Output .zarr (tissue, grid, embeddings, predictions, thumbnail); PNG maps go beside it.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out and its PNG maps.")
@click.option(
    "--bins",
    default=None,
    help="Predict a raster of squares of this size (e.g. 8um) from a token map, with a regressor fit on bins or "
    "cells; needs --tokens-from.",
)
@click.option(
    "--tokens-from",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="With --bins: the training .zarr written by `hopt-st embed --bins/--cells` (its token-map projection).",
)
def predict(
    slide,
    regressor,
    mil,
    model,
    weights,
    image_mpp,
    genes,
    preset,
    min_tissue_fraction,
    image_key,
    batch_size,
    device,
    out,
    overwrite,
    bins,
    tokens_from,
):
    """Predict expression maps over a whole H&E SLIDE that has no spatial data.

    SLIDE is a pyramidal / SVS-like TIFF or a SpatialData .zarr. Tissue is detected, a grid of pseudo-spots
    laid over it, embedded with --model and fed to --regressor. Writes --out (a .zarr with the tissue
    polygons, the grid, its embeddings and predictions, and a slide thumbnail) and <out stem>_<gene>.png maps.

    \b
    Examples:
      hopt-st predict slide.svs --regressor ridge.safetensors --model h-optimus-1 --out slide_pred.zarr
      hopt-st predict slide.tif --regressor demo_out/ridge_handcrafted.safetensors --model handcrafted --image-mpp 0.25 \\
          --genes GENE0003,GENE0010 --out slide_pred.zarr
      hopt-st predict slide.tif --bins 8um --tokens-from hd.zarr --regressor ridge_bins --model h-optimus-1 \\
          --out slide_8um.zarr
    """
    if (regressor is None) == (mil is None):
        raise click.UsageError(
            "pass one of --regressor (expression maps) or --mil (a slide-level prediction)."
        )
    _check_paths(("SLIDE", slide), ("--regressor", regressor), ("--mil", mil), ("--weights", weights))
    _check_out(out, (slide, regressor, mil, weights, tokens_from), overwrite)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder of --out {str(out.parent)!r} does not exist: create it first.")
    # what every way of scoring SLIDE takes
    run = {
        "model": model,
        "out": out,
        "weights": weights,
        "image_mpp": image_mpp,
        "image_key": image_key,
        "batch_size": batch_size,
        "device": device,
        "overwrite": overwrite,
        "progress": not _STATE["quiet"],
    }
    if mil is not None:
        from ._mil_run import run_predict_mil

        click.echo(run_predict_mil(slide, mil, **run)["report"])
        return
    if bins is not None:
        from ._cli_subspot import parse_bin_um, predict_bins

        if tokens_from is None:
            raise click.UsageError("--bins needs --tokens-from TRAIN.zarr (the training sample's token map).")
        click.echo(predict_bins(slide, regressor, bin_um=parse_bin_um(bins), tokens_from=tokens_from, **run))
        return
    from ._predict import run_predict

    genes = _items(genes) if genes else None
    res = run_predict(
        slide, regressor, genes=genes, preset=preset, min_tissue_fraction=min_tissue_fraction, **run
    )
    click.echo(res["report"])


# --------------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("cohort", required=False, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--labels",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV: sample_id, patient and label columns.",
)
@click.option("--target", required=True, help="Label column; comma-separated columns for bulk expression.")
@_model_option("The encoder the slides are (or will be) embedded with, e.g. h-optimus-1.")
@_weights_option()
@click.option(
    "--embeddings",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the slides' embedding files (<folder>/<model>/<sample_id>.h5); default --out/embeddings.",
)
@click.option("--mil", "mils", default="abmil,meanpool", show_default=True, help="abmil, meanpool or both.")
@click.option("--lrs", default=None, help="ABMIL learning rates to choose from, e.g. 1e-4,3e-4,1e-3.")
@click.option("--steps", default=None, help="ABMIL step counts to choose from, e.g. 250,500,1000,2000.")
@click.option(
    "--folds", default=5, show_default=True, type=click.IntRange(2), help="Outer folds (by patient)."
)
@click.option("--inner-folds", default=5, show_default=True, type=click.IntRange(2), help="Inner CV folds.")
@click.option(
    "--task",
    type=click.Choice(["auto", "binary", "multiclass", "regression"]),
    default="auto",
    show_default=True,
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default=None, help=_DEVICE_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace the results and models in --out.")
def mil(
    cohort,
    labels,
    target,
    model,
    weights,
    embeddings,
    mils,
    lrs,
    steps,
    folds,
    inner_folds,
    task,
    seed,
    device,
    out,
    overwrite,
):
    """Slide-level prediction with attention MIL (ABMIL, and a mean-pooling baseline) on a cohort of slides.

    COHORT (optional) is a cohort table of whole slides (sample_id, source: .svs/.tif/...): slides not yet
    embedded are embedded first (tissue, tiles, --model). The learning rate and steps are chosen by
    cross-validation inside the training folds; folds are split by patient. Writes --out/results.csv (score per
    model and fold: AUC, one-vs-rest macro AUC, or Pearson per gene), summary.csv, predictions.csv, the final
    models (<mil>.safetensors) and attention/<sample_id>.csv.

    \b
    Examples:
      hopt-st mil cohort.csv --labels labels.csv --target MSI --model h-optimus-1 --out mil_msi
      hopt-st mil --embeddings emb/ --labels bulk.csv --target GENE1,GENE2 --model uni --out mil_bulk
    """
    from ._mil_run import run_mil

    def floats(v):
        return None if v is None else [float(x) for x in _items(v)]

    res = run_mil(
        labels,
        target=_items(target),
        model=model,
        out=out,
        cohort=cohort,
        embeddings=embeddings,
        weights=weights,
        mils=_items(mils),
        lrs=floats(lrs),
        steps=None if steps is None else [int(x) for x in floats(steps)],
        n_splits=folds,
        inner_splits=inner_folds,
        task=task,
        seed=seed,
        device=device,
        overwrite=overwrite,
        progress=not _STATE["quiet"],
    )
    click.echo(res["report"])


# --------------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tasks", default=None, help="Comma-separated task names (e.g. IDC,PRAD); default: all found.")
@_models_option("h-optimus-1", "Encoder; repeat to compare.")
@click.option(
    "--protocol",
    type=click.Choice(["hest", "strict", "both"]),
    default="hest",
    show_default=True,
    help="hest: HEST's published protocol; strict: genes and ridge penalty chosen on training folds only.",
)
@_weights_option("Local weights of --model.")
@click.option(
    "--embeddings-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=(
        "HEST's embed_dataroot: DIR/<task>/<model>/<sample>.h5 are read as they are (HEST's own files, or those "
        "`hopt-st embed-cohort ROOT/<task> --out DIR/<task>` writes); missing ones are computed there. "
        "Default: OUT/<model>/embeddings."
    ),
)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench_out"),
    show_default=True,
    help="Folder for results.csv/json, per_gene.csv, figures.",
)
@click.option("--device", default=None, help=_DEVICE_HELP)
@click.option("--seed", type=int, default=1, show_default=True, help="PCA random_state (HEST's default: 1).")
@click.option(
    "--solver",
    type=click.Choice(["exact", "fast"]),
    default="exact",
    show_default=True,
    help="hest protocol: exact (HEST's arithmetic), fast (opt-in, from moments, ~1e-4 off HEST's numbers).",
)
@click.option("--overwrite", is_flag=True, help="Replace results of these models/tasks already in --out.")
def bench(root, tasks, models, protocol, weights, embeddings_dir, out, device, seed, solver, overwrite):
    """Run the HEST-Benchmark on ROOT (a hest-bench download) and print the Markdown table.

    Writes results.csv, results.json (with provenance), per_gene.csv and benchmark.png into --out, and
    HEST's own result files per model into --out/<model>/ (embeddings cached in --out/<model>/embeddings
    unless --embeddings-dir).

    \b
    Examples:
      hopt-st bench hest-bench --model h-optimus-1 --protocol both
      hopt-st bench hest-bench --tasks IDC,PRAD --model handcrafted --model h-optimus-1
    """
    _check_paths(("ROOT", root))
    task_list = None
    if tasks is not None:
        task_list = _items(tasks)
        if not task_list:
            raise click.BadParameter(
                f"{tasks!r} names no task; give comma-separated task names, e.g. --tasks IDC,PRAD, or leave "
                "--tasks out to run every task found.",
                param_hint="--tasks",
            )
    if weights is not None and len(models) > 1:
        raise click.UsageError("--weights applies to one --model; run one model at a time with --weights.")
    _check_paths(("--weights", weights))

    import pandas as pd

    import hopt_st as hs

    from ._atomic import check_not_input, path_inside
    from .io._cohort import model_dirname

    check_not_input(out, inputs=(root, weights), overwrite=overwrite, what="--out")  # rule 1
    frames = []
    for model in models:
        frames.append(
            hs.bench.run(
                root,
                tasks=task_list,
                model=model,
                protocol=protocol,
                embeddings_dir=embeddings_dir,
                weights=str(weights) if weights is not None else None,
                device=device,
                seed=seed,
                solver=solver,
                overwrite=overwrite,
                # HEST-shaped per-fold JSONs (and, by default, the embeddings cache), inside --out (rule 4)
                out_dir=path_inside(out, model_dirname(model), what="--out/<model>"),
            )
        )
    from ._atomic import atomic_write_bytes
    from .bench._run import _merge_table, merge_results

    new = pd.concat(frames, ignore_index=True)
    new_genes = pd.concat([f.attrs.get("per_gene", pd.DataFrame()) for f in frames], ignore_index=True)
    # rows of other models (or tasks, protocols) from an earlier run into --out are kept, as bench.run keeps them
    df = merge_results(out / "results.csv", new)
    per_gene = _merge_table(out / "per_gene.csv", new_genes, ["task", "model", "protocol", "gene"])
    old_json = out / "results.json"
    provenance = json.loads(old_json.read_text()).get("provenance", []) if old_json.is_file() else []
    provenance = [p for p in provenance if not (isinstance(p, dict) and p.get("model") in models)]
    provenance += [f.attrs.get("provenance", {}) for f in frames]
    df.attrs["per_gene"] = per_gene
    df.attrs["provenance"] = provenance
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.csv", df.to_csv(index=False).encode())
    atomic_write_bytes(out / "per_gene.csv", per_gene.to_csv(index=False).encode())
    payload = {"results": df.to_dict(orient="records"), "provenance": provenance}
    atomic_write_bytes(old_json, json.dumps(payload, indent=2, default=str).encode())
    _save_bench_figures(df, out)
    click.echo(hs.bench.markdown_table(df))
    _echo(
        f"\nWrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'per_gene.csv'}, {out / 'benchmark.png'}"
    )


def _save_bench_figures(df, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import pl
    from ._atomic import atomic_path

    fig = pl.benchmark(df, title="HEST-Benchmark: mean Pearson over the 50 genes")
    try:
        with atomic_path(out / "benchmark.png") as tmp:
            fig.savefig(tmp, dpi=130, format="png")
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--long", "long_", is_flag=True, help="Also print where each value of the spec comes from.")
def models(long_: bool) -> None:
    """List the encoder registry: output dims, weight sources and whether weights are found locally."""
    import pandas as pd

    import hopt_st as hs

    df = hs.models.list_models().reset_index()
    df["weights"] = [hs.models.weights_status(n) for n in df["name"]]
    df["source"] = [f"hf.co/{r}" if isinstance(r, str) and r else "built in" for r in df["hf_repo"]]
    df["n_params"] = [_human(v) for v in df["n_params"]]
    cols = ["name", "dim", "input_size", "mpp", "n_params", "weights", "source"]
    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 60):
        click.echo(df[cols].to_string(index=False))
    if long_:
        for name, src in zip(df["name"], df["sources"]):
            click.echo(f"\n{name}:\n  " + "\n  ".join(str(src).split("; ")))
    else:
        _echo(
            "\nweights: 'local' = found in the Hugging Face cache (HF_HOME); pass --weights PATH to use a file."
        )


def _human(v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not v or v != v:
        return "-"
    return f"{v / 1e9:.2f} B" if v >= 1e9 else f"{v / 1e6:.0f} M" if v >= 1e6 else f"{v:.0f}"


# --------------------------------------------------------------------------------------------------------------
#: Python arguments named in the package's messages -> the CLI flags that set them
_FLAGS = {
    "overwrite": "--overwrite",
    "image_mpp": "--image-mpp",
    "weights": "--weights",
    "key_added": "--key-added",
    "image_key": "--image-key",
    "table_name": "--table-name",
    "batch_size": "--batch-size",
    "device": "--device",
    "sample_id": "--sample",
}
# not inside a Python call shown in the message (``create(name, weights=...)``)
_ARG = re.compile(r"(?<![\w.'\"\[(-])(?<!, )(" + "|".join(_FLAGS) + r")\s*=\s*(True\b)?")


def _as_flags(msg: str) -> str:
    """``pass overwrite=True`` -> ``pass --overwrite``; ``image_mpp=0.5`` -> ``--image-mpp 0.5``."""
    return _ARG.sub(lambda m: _FLAGS[m.group(1)] + ("" if m.group(2) else " "), msg)


def _one_line(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    msg = _as_flags(" ".join(str(msg).split()))
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hopt-st`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in args[: _first_command(args)])
    with warnings.catch_warnings():  # the filters below last for this command only
        if not verbose:
            _hide_third_party_warnings()
        return _run(args, verbose)


def _run(args: list[str], verbose: bool) -> int:
    try:
        rv = cli.main(args=args, prog_name="hopt-st", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("hopt-st: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("hopt-st: interrupted", err=True)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's one place to turn errors into a one-line reason
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (--verbose for the traceback)"
        click.echo(f"hopt-st: error: {_one_line(e)}{hint}", err=True)
        return 1


def _first_command(args: list[str]) -> int:
    for i, a in enumerate(args):
        if not a.startswith("-"):
            return i
    return len(args)


if __name__ == "__main__":
    sys.exit(main())
