"""Virtual spatial transcriptomics: predicted expression over a whole H&E slide, in one call.

:func:`predict_slide` chains what the other steps do on spot data: open the slide
(:func:`hopt_st.io.read_slide`), find the tissue (:func:`hopt_st.pp.detect_tissue`), lay pseudo-spots over
it (:func:`hopt_st.pp.tile_grid`), embed them (:func:`hopt_st.pp.embed`) and predict
(:func:`hopt_st.tl.predict_expression`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from spatialdata import SpatialData

from .._constants import UNS_KEY
from .._docs import inject_docs
from ._regressor import ExpressionRegressor, predict_expression

if TYPE_CHECKING:  # pragma: no cover
    from ..models import Encoder, ModelSpec

logger = logging.getLogger(__name__)


def _load_regressor(regressor) -> tuple[ExpressionRegressor, str]:
    """The regressor, and what to call it in messages."""
    if isinstance(regressor, ExpressionRegressor):
        return regressor, "the regressor"
    if isinstance(regressor, str | os.PathLike):
        path = Path(regressor)
        if not path.is_file():
            raise FileNotFoundError(
                f"regressor {str(path)!r} does not exist (a file written by ExpressionRegressor.save)."
            )
        return ExpressionRegressor.load(path), f"regressor {path.name!r}"
    raise TypeError(
        f"regressor must be an ExpressionRegressor or the path of one saved with .save(); got {type(regressor).__name__}."
    )


def regressor_model(regressor: ExpressionRegressor) -> str | None:
    """The encoder a regressor was fitted on: the model of its recorded provenance (``provenance_``, see
    :mod:`hopt_st.tl._provenance`), else the one its ``use_rep`` names when that is a default embedding key
    ``X_<model>`` (``X_timm_<arch>`` for ``timm:<arch>``, see :func:`hopt_st.pp._embed.default_key`)."""
    from ..io._store import sanitize_name
    from ..models._registry import registered_names

    recorded = (getattr(regressor, "provenance_", None) or {}).get("model")
    if recorded:
        return str(recorded)
    use_rep = regressor.use_rep or ""
    for name in registered_names():
        if use_rep in (f"X_{name}", f"X_{sanitize_name(name)}"):
            return name
    if use_rep.startswith(("X_timm:", "X_timm_")):  # timm architecture names hold no other changed character
        return "timm:" + use_rep[len("X_timm_") :]
    return None


def check_regressor_model(
    regressor: ExpressionRegressor, model: str, dim: int, what: str = "the regressor"
) -> None:
    """Refuse a regressor fitted on another encoder's embeddings, before any tile is embedded (by its recorded
    model, else its ``use_rep`` name, and its input size). Weights, µm/px and patch size are checked against the
    embeddings' provenance by :func:`hopt_st.tl.predict_expression` once they exist.

    Parameters
    ----------
    regressor
        A fitted regressor.
    model
        Name of the encoder the slide is (or will be) embedded with.
    dim
        That encoder's embedding size.
    what
        How to call the regressor in messages.
    """
    regressor._check_fitted()
    fitted_on = regressor_model(regressor)
    if fitted_on is not None and fitted_on != model:
        raise ValueError(
            f"{what} was fitted on {fitted_on!r} embeddings (use_rep {regressor.use_rep!r}) and cannot predict from "
            f"{model!r} embeddings: predict with the model it was fitted on ({fitted_on!r}), or fit a regressor on "
            f"{model!r} embeddings of your spatial samples."
        )
    expected = regressor.n_features_in_ // (2 if regressor.spatial_context else 1)
    if expected != dim:
        raise ValueError(
            f"{what} takes {expected}-dimensional embeddings (use_rep {regressor.use_rep!r}) but {model!r} gives "
            f"{dim}: it was fitted on another encoder's embeddings; use that encoder, or a regressor fitted on "
            f"{model!r} embeddings."
        )


def record_regressor_file(sdata: SpatialData, table_name: str, key_added: str, name: str) -> None:
    """Note the regressor's file name with the predictions' metadata (spot table and predictions table)."""
    sdata.tables[table_name].uns[UNS_KEY]["predictions"][key_added]["regressor_file"] = name
    if key_added in sdata.tables:
        sdata.tables[key_added].uns[UNS_KEY]["prediction"]["regressor_file"] = name


def _open(slide, image_mpp: float | None) -> SpatialData:
    if isinstance(slide, SpatialData):
        return slide
    if not isinstance(slide, str | os.PathLike):
        raise TypeError(f"slide must be a SpatialData or the path of a slide; got {type(slide).__name__}.")
    path = Path(slide)
    if path.is_dir():  # a SpatialData .zarr
        import spatialdata as sd

        return sd.read_zarr(path)
    from ..io import read_slide

    return read_slide(path, image_mpp=image_mpp)


@inject_docs()
def predict_slide(
    slide: str | os.PathLike | SpatialData,
    regressor: ExpressionRegressor | str | os.PathLike,
    *,
    model: str | ModelSpec | Encoder,
    weights: str | os.PathLike | None = None,
    image_mpp: float | None = None,
    image_key: str | None = None,
    preset: Literal["visium", "tiles"] = "tiles",
    spacing_um: float | None = None,
    size_um: float | None = None,
    shape: Literal["square", "hex"] | None = None,
    min_tissue_fraction: float = 0.75,
    tissue_key: str = "tissue",
    table_name: str = "grid",
    key_added: str = "predicted",
    batch_size: int | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SpatialData:
    """Predict expression over the tissue of a whole H&E slide: detect -> grid -> embed -> predict.

    The regressor is checked against ``model`` before anything is computed: one fitted on another encoder's
    embeddings is refused.

    Parameters
    ----------
    slide
        A pyramidal / SVS-like TIFF (opened with :func:`hopt_st.io.read_slide`), a SpatialData ``.zarr``
        folder, or a SpatialData with an H&E image.
    regressor
        Fitted :class:`~hopt_st.tl.ExpressionRegressor`, or the file it was saved to.
    model
        The encoder the regressor was fitted on (registry name, spec or built encoder, as for
        :func:`hopt_st.pp.embed`).
    weights
        Local weight file of ``model``.
    image_mpp
        {image_mpp}
    image_key
        {image_key}
    preset
        Grid geometry, see :func:`hopt_st.pp.tile_grid`.
    spacing_um
        Override the preset's spacing.
    size_um
        Override the preset's tile size.
    shape
        Override the preset's lattice.
    min_tissue_fraction
        Keep tiles with at least this fraction on tissue.
    tissue_key
        Tissue shapes: detected with :func:`hopt_st.pp.detect_tissue` unless the SpatialData already has
        them (e.g. edited polygons), which are then used as they are.
    table_name
        Name of the grid table; its shapes are ``f"{{table_name}}_shapes"``.
    key_added
        ``obsm`` key of the predictions in the grid table.
    batch_size
        Embedding batch size.
    device
        Embedding device (default: the best available).
    overwrite
        Replace an existing grid / predictions of the same names.
    progress
        {progress}

    Returns
    -------
    SpatialData
        The slide (the same object when one was passed) with ``shapes[tissue_key]``,
        ``shapes[f"{{table_name}}_shapes"]`` and ``tables[table_name]``: the grid table of
        :func:`hopt_st.pp.tile_grid`, with the embeddings in ``obsm["X_<model>"]`` (provenance in
        ``uns["hopt_st"]["embeddings"]``) and the predictions in ``obsm[key_added]`` (a DataFrame, genes as
        columns, in the regressor's target space; metadata in ``uns["hopt_st"]["predictions"][key_added]``);
        and ``tables[key_added]``, the predictions table of :func:`hopt_st.tl.predict_expression` (``X`` =
        predictions, annotating the grid's shapes).
    """
    from ..models import Encoder, get_spec
    from ..pp import detect_tissue, embed, tile_grid
    from ..pp._embed import default_key

    reg, what = _load_regressor(regressor)
    spec = model.spec if isinstance(model, Encoder) else get_spec(model)
    check_regressor_model(reg, spec.name, spec.dim, what)
    sdata = _open(slide, image_mpp)
    if tissue_key not in sdata.shapes:
        detect_tissue(sdata, image_key=image_key, key_added=tissue_key, image_mpp=image_mpp)
    else:
        logger.info("predict_slide: using the tissue shapes %r already in the SpatialData", tissue_key)
    tile_grid(
        sdata,
        image_key=image_key,
        preset=preset,
        spacing_um=spacing_um,
        size_um=size_um,
        shape=shape,
        min_tissue_fraction=min_tissue_fraction,
        tissue_key=tissue_key,
        key_added=f"{table_name}_shapes",
        table_name=table_name,
        image_mpp=image_mpp,
        overwrite=overwrite,
    )
    emb_key = default_key(spec.name)  # X_<model>, as a key a .zarr store can hold
    embed(
        sdata,
        model,
        table_name=table_name,
        image_key=image_key,
        key_added=emb_key,
        weights=weights,
        batch_size=batch_size,
        device=device,
        overwrite=True,  # the grid was just made: its embeddings are new
        progress=progress,
    )
    predict_expression(
        sdata, reg, use_rep=emb_key, key_added=key_added, table_name=table_name, overwrite=overwrite
    )
    table = sdata.tables[table_name]
    if not isinstance(regressor, ExpressionRegressor):
        record_regressor_file(sdata, table_name, key_added, Path(regressor).name)
    logger.info(
        "predict_slide: %d genes at %d tiles (%s) -> tables[%r].obsm[%r]",
        len(reg.genes_),
        table.n_obs,
        spec.name,
        table_name,
        key_added,
    )
    return sdata
