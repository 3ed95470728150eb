"""``hopt-st predict``: a whole H&E slide -> predicted expression table (.zarr) and PNG maps, written atomically.

The output ``.zarr`` holds what was computed -- tissue polygons, grid shapes, the grid table with embeddings and
predictions, the predictions table -- and a thumbnail of the slide to draw them on, not a copy of the slide itself. It is written to a
temporary name beside ``--out`` and renamed into place, so an interrupted run never leaves a half-written store
and an existing one is replaced only once the new one is complete.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from spatialdata import SpatialData
from spatialdata.transformations import Scale, get_transformation
from spatialdata.transformations import Sequence as TransformSequence

from ._atomic import atomic_dir, atomic_path, check_output, mark_ours
from ._constants import UNS_KEY
from .io._elements import image_levels, level_shape, resolve_image_key

logger = logging.getLogger(__name__)

#: largest side of the thumbnail stored with the predictions, px
THUMBNAIL_SIDE = 2000
#: genes drawn when none are chosen: the regressor's first ones (its most variable genes)
N_DEFAULT_GENES = 3


def _thumbnail(sdata: SpatialData, image_key: str, table_name: str):
    """The finest pyramid level with sides <= THUMBNAIL_SIDE (strided further if none is), as its own image
    registered like the slide; its µm/px is recorded in the grid table."""
    from spatialdata.models import Image2DModel

    image = sdata.images[image_key]
    levels = image_levels(image)
    h0, w0 = level_shape(levels[0])
    idx = next((i for i, lv in enumerate(levels) if max(level_shape(lv)) <= THUMBNAIL_SIDE), len(levels) - 1)
    level = levels[idx]
    step = max(1, int(np.ceil(max(level_shape(level)) / THUMBNAIL_SIDE)))
    level = level.isel(y=slice(None, None, step), x=slice(None, None, step))
    data = np.asarray(
        level.transpose("c", "y", "x").data.compute() if hasattr(level.data, "compute") else level
    )
    h, w = data.shape[1:]
    scale = Scale([h0 / h, w0 / w], axes=("y", "x"))
    transformations = {
        cs: TransformSequence([scale, t]) for cs, t in get_transformation(image, get_all=True).items()
    }
    thumb = Image2DModel.parse(
        data[:3], dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations=transformations
    )
    store = sdata.tables[table_name].uns[UNS_KEY]
    store["image_mpp"][f"{image_key}_thumbnail"] = (
        float(store["image_mpp"][image_key]) * 0.5 * (h0 / h + w0 / w)
    )
    return thumb


def map_paths(out: Path, genes: Sequence[str]) -> dict[str, Path]:
    """``<out stem>_<gene>.png`` beside ``out``, one per gene."""
    return {g: out.with_name(f"{out.stem}_{re.sub(r'[^A-Za-z0-9._-]', '_', g)}.png") for g in genes}


def run_predict(
    slide: Path,
    regressor: Path,
    *,
    model: str,
    out: Path,
    weights: Path | None = None,
    image_mpp: float | None = None,
    genes: Sequence[str] | None = None,
    preset: str = "tiles",
    min_tissue_fraction: float = 0.75,
    image_key: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Predict expression over ``slide`` and write ``out`` (.zarr) and one PNG map per gene beside it.

    Errors name the command-line flags. Returns ``sdata``, ``files`` (``{"zarr": ..., gene: png}``) and
    ``report`` (text).
    """
    from .io._mpp import UnknownPixelSizeError
    from .tl import predict_slide
    from .tl._slide import record_regressor_file

    reg, genes, pngs = _check_inputs(slide, regressor, weights, genes, out, overwrite)
    try:
        sdata = predict_slide(
            slide,
            reg,
            model=model,
            weights=None if weights is None else str(weights),
            image_mpp=image_mpp,
            image_key=image_key,
            preset=preset,
            min_tissue_fraction=min_tissue_fraction,
            batch_size=batch_size,
            device=device,
            overwrite=True,  # a grid already in a .zarr SLIDE is replaced in memory only; SLIDE is never written
            progress=progress,
        )
    except UnknownPixelSizeError as e:
        raise ValueError(
            f"the pixel size of SLIDE {str(slide)!r} is unknown (the file records none): pass --image-mpp "
            "<µm per full-resolution pixel>, e.g. 0.25 for a 40x scan, 0.5 for 20x."
        ) from e
    table = sdata.tables["grid"]
    record_regressor_file(sdata, "grid", "predicted", regressor.name)
    result, thumb_key = write_slide_result(
        sdata,
        out,
        image_key,
        {"grid": table, "predicted": sdata.tables["predicted"]},
        "predict",
        attrs={UNS_KEY: {k: v for k, v in sdata.attrs.get(UNS_KEY, {}).items() if k != "synthetic"}},
    )
    files = {
        "zarr": out,
        **_write_maps(result, thumb_key, pngs, lambda g: f"{slide.name}: {g} predicted with {model}"),
    }
    grid = table.uns[UNS_KEY]["grid"]
    area = float(sdata.shapes["tissue"]["area_um2"].sum()) / 1e6
    report = "\n".join(
        [
            f"{table.n_obs} tiles ({grid['shape']}, {grid['size_um']:g} µm every {grid['spacing_um']:g} µm) on "
            f"{area:.3g} mm² of tissue; {len(reg.genes_)} genes predicted with {model}",
            f"Wrote {out}",
            *(f"      {p}" for g, p in files.items() if g != "zarr"),
        ]
    )
    return {"sdata": result, "files": files, "report": report}


def _check_inputs(slide: Path, regressor: Path, weights: Path | None, genes, out: Path, overwrite: bool):
    """The loaded regressor, the genes to draw and their PNG paths, after checking every flag (errors name them)
    before anything is computed."""
    from .tl import ExpressionRegressor

    check_input_files(slide, ("--regressor", regressor), weights)
    reg = ExpressionRegressor.load(regressor)
    genes = list(genes) if genes else list(reg.genes_[:N_DEFAULT_GENES])
    missing = [g for g in genes if g not in reg.genes_]
    if missing:
        raise ValueError(
            f"--genes {missing} are not predicted by --regressor {regressor.name!r}; its genes are "
            f"{list(reg.genes_[:10])}{'...' if len(reg.genes_) > 10 else ''}."
        )
    pngs = map_paths(out, genes)
    check_outputs(out, list(pngs.values()), (slide, regressor, weights), overwrite)
    return reg, genes, pngs


def check_input_files(slide: Path, model_file: tuple[str, Path], weights: Path | None) -> None:
    """SLIDE, the model file (``(flag, path)``: ``--regressor`` or ``--mil``) and ``--weights`` exist; each
    refusal names the flag and the path."""
    flag, path = model_file
    if not slide.exists():
        raise FileNotFoundError(f"SLIDE {str(slide)!r} does not exist.")
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {str(path)!r} does not exist.")
    if weights is not None and not weights.exists():
        raise FileNotFoundError(f"--weights {str(weights)!r} does not exist.")


def write_slide_result(
    sdata: SpatialData, out: Path, image_key: str | None, tables: dict, writer: str, attrs=None
) -> tuple[SpatialData, str]:
    """What a scored slide's ``out`` store holds -- a thumbnail of the slide, the tissue and grid shapes and
    ``tables`` (and ``attrs``) -- written atomically and marked as written by ``writer`` (a later --overwrite may
    replace it, rule 1). Returns that SpatialData and the thumbnail's key."""
    key = resolve_image_key(sdata, image_key)
    thumb_key = f"{key}_thumbnail"
    result = SpatialData(
        images={thumb_key: _thumbnail(sdata, key, "grid")},
        shapes={k: sdata.shapes[k] for k in ("tissue", "grid_shapes")},
        tables=tables,
        attrs=attrs,
    )
    with atomic_dir(out) as tmp:
        result.write(tmp)
        mark_ours(tmp, writer)
    return result, thumb_key


def check_outputs(out: Path, pngs: Sequence[Path], inputs, overwrite: bool) -> None:
    """The store ``out`` and its PNGs beside it may be written: absent, or ``overwrite`` and ours; never an input
    nor inside one (rule 1); ``out``'s folder exists. Every refusal names the paths."""
    existing = [str(p) for p in (out, *pngs) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing} already exist: pass --overwrite to replace them, or another --out."
        )
    check_output(out, inputs=inputs, overwrite=overwrite, what="--out")
    for png in pngs:
        check_output(png, inputs=inputs, overwrite=overwrite, what="map")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder of --out {str(out.parent)!r} does not exist.")


def _write_maps(result: SpatialData, thumb_key: str, pngs: dict[str, Path], title) -> dict[str, Path]:
    """One PNG map per gene (titled ``title(gene)``), each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import pl

    for gene, path in pngs.items():
        fig = pl.slide_expression(
            result, [gene], image_key=thumb_key, ncols=1, panel_size=6.0, return_fig=True
        )
        fig.suptitle(title(gene), fontsize=10)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=130)
        plt.close(fig)
    return dict(pngs)
