"""What ``hopt-st embed --bins 8um / --cells`` and ``hopt-st predict --bins 8um`` run: token maps, features of
Visium HD bins or Xenium cells, and a raster of predicted genes over an H&E-only slide."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from spatialdata import SpatialData

from ._constants import UNS_KEY

logger = logging.getLogger(__name__)


def parse_bin_um(value: str | None) -> int | None:
    """``"8um"`` / ``"8"`` / ``"008um"`` -> 8; ``None`` stays."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*0*(\d+)\s*(um|µm)?\s*", str(value))
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"--bins {value!r}: give a bin size in µm such as 8um or 16um.")
    return int(m.group(1))


def is_visium_hd(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*feature_slice.h5")) and (path / "binned_outputs").is_dir()


def is_xenium(path: Path) -> bool:
    return path.is_dir() and (path / "experiment.xenium").is_file()


def _token_key(model) -> str:
    from .io._store import sanitize_name
    from .models import get_spec

    return "tokens_" + sanitize_name(get_spec(model).name if isinstance(model, str) else model.spec.name)


def cells_table(sdata: SpatialData) -> str:
    """The table of segmented cells: Xenium's ``"table"``, Space Ranger 4's ``"cell_segmentations"``."""
    for name in ("cell_segmentations", "table"):
        if name in sdata.tables:
            return name
    raise ValueError(
        f"no table of cells here (tables: {list(sdata.tables)}); --cells needs Xenium or SR4 output."
    )


def embed_subspot(
    sdata: SpatialData,
    *,
    bin_um: int | None,
    cells: bool,
    model,
    weights,
    image_key,
    key_added,
    batch_size,
    device,
    overwrite,
    progress,
) -> tuple[str, str]:
    """Token map of the H&E (once), then features of the bins of ``bin_um`` or of the cells; returns
    ``(table name, obsm key)``."""
    import hopt_st as hs

    if bin_um is not None:
        table_name = f"square_{bin_um:03d}um"
        if table_name not in sdata.tables:
            if "square_002um" not in sdata.tables:
                raise ValueError(
                    f"no {table_name!r} table and no 2 µm bins to pool (tables: {list(sdata.tables)})."
                )
            hs.pp.aggregate_squares(sdata, bin_um, table_name="square_002um", key_added=table_name)
    else:
        table_name = cells_table(sdata)
    if image_key is None:
        image_key = next((k for k in sdata.images if k.endswith("_full_image") or k == "he_image"), None)
    tok = _token_key(model)
    if tok not in sdata.images or overwrite:
        hs.pp.embed_tokens(
            sdata,
            model,
            weights=weights,
            image_key=image_key,
            key_added=tok,
            batch_size=batch_size,
            device=device,
            overwrite=overwrite,
            progress=progress,
        )
    key = key_added or f"X_{tok}"
    hs.pp.token_features(sdata, tok, table_name=table_name, key_added=key, overwrite=overwrite)
    return table_name, key


def predict_bins(
    slide,
    regressor_path: Path,
    *,
    bin_um: int,
    model,
    weights,
    tokens_from: Path,
    image_mpp,
    image_key,
    batch_size,
    device,
    out: Path,
    overwrite: bool,
    progress: bool,
) -> str:
    """Token map of an H&E-only SLIDE through the training map's projection, and a raster of predicted genes
    at ``bin_um``; written to ``out``. Returns a one-line report."""
    import spatialdata as sd

    import hopt_st as hs

    from ._atomic import check_output
    from .io._store import write_sdata
    from .tl._slide import _open

    # --overwrite replaces an output of ours, never an input or a folder the user owns (rule 1)
    check_output(out, inputs=(slide, regressor_path, weights, tokens_from), overwrite=overwrite, what="--out")
    train = sd.read_zarr(tokens_from)
    tok = _token_key(model)
    maps = train.attrs.get(UNS_KEY, {}).get("token_maps", {})
    if tok not in maps:
        raise ValueError(
            f"--tokens-from {str(tokens_from)!r} holds no token map {tok!r} (maps: {sorted(maps)}): pass the .zarr "
            "written by `hopt-st embed --bins` on the training sample, with the same --model."
        )
    reg = hs.tl.ExpressionRegressor.load(regressor_path)
    sdata = _open(slide, image_mpp)
    hs.pp.embed_tokens(
        sdata,
        model,
        weights=weights,
        image_key=image_key,
        image_mpp=image_mpp,
        projection=maps[tok]["projection"],
        key_added=tok,
        batch_size=batch_size,
        device=device,
        overwrite=True,
        progress=progress,
    )
    key = f"predicted_{bin_um:03d}um"
    hs.tl.predict_raster(sdata, reg, tok, bin_um=bin_um, key_added=key, overwrite=True)
    write_sdata(sdata, out, overwrite=overwrite)
    ras = sdata.images[key]
    return f"images[{key!r}]: {ras.sizes['c']} genes on {ras.sizes['y']} x {ras.sizes['x']} squares of {bin_um} µm -> {out}"
