"""Spot-centred H&E patches at a true physical pixel size: :func:`patches`."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from anndata import AnnData
from spatialdata import SpatialData

from .._constants import OBS_FRACTION_KEY, PATCH_SIZE, TARGET_MPP, UNS_KEY
from .._docs import (
    inject_docs,
)
from .._patchset import Patches
from ..io._anndata import anndata_to_spatialdata
from ..io._elements import (
    get_spot_table,
    image_levels,
    level_shape,
    resolve_image_key,
    resolve_table_name,
    spot_centers,
    spots_to_image_matrix,
)
from ..io._mpp import check_mpp, get_image_mpp
from ._geometry import (
    apply_affine,
    choose_level,
    fraction_inside,
    patch_boxes,
    spatial_order,
    units_per_image_px,
)
from ._image_reader import DEFAULT_CACHE_BYTES, MIN_CACHE_BYTES, LevelReader, _source_file
from ._resample import resize

logger = logging.getLogger(__name__)

_OUTSIDE = ("raise", "drop", "keep")
#: patch windows hashed into a slide's fingerprint (evenly spaced over the spots)
_DIGEST_WINDOWS = 32
#: a source window larger than this many times the patch side is refused (it means a wrong pixel size)
MAX_WINDOW_RATIO = 16


def _file_stamp(array) -> str:
    """``path|size|mtime`` of the file behind a level's array (a TIFF, or a .zarr array's metadata), if known."""
    source = _source_file(array)
    if source is None:
        return ""
    path = Path(source)
    if path.is_dir():  # a .zarr store: the array's own metadata file
        root = path / str(getattr(array, "path", ""))
        path = next((root / m for m in ("zarr.json", ".zarray") if (root / m).is_file()), root)
    if not path.is_file():
        return ""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


class _SlidePatches(Patches):
    """Patches cut from one level of an image element (built by :func:`patches`)."""

    def __init__(self, reader: LevelReader, boxes, size, fill, level_mpp: float, **kwargs):
        super().__init__(**kwargs)
        self._reader = reader
        self._boxes = np.asarray(boxes, dtype=np.int64)
        self._size = tuple(size)
        self._fill = np.asarray(fill, dtype=np.uint8)
        self.level_mpp = float(level_mpp)

    def _source_id(self) -> str:
        """Element name, level size, windows, and the content: a digest of the raw pixels of a few evenly spaced
        windows plus the backing file's size and mtime, so another image of the same size is told apart."""
        h = hashlib.sha256(f"{self._reader.name}|{self._reader.height}x{self._reader.width}".encode())
        h.update(np.ascontiguousarray(self._boxes).tobytes())
        h.update(repr((self._size, self._fill.tolist())).encode())
        if len(self._boxes):
            n = min(len(self._boxes), _DIGEST_WINDOWS)
            sample = np.unique(np.linspace(0, len(self._boxes) - 1, n).astype(np.int64))
            for w in self._reader.read_windows(self._boxes[sample], self._size, self._fill):
                h.update(np.ascontiguousarray(w).data)
        h.update(_file_stamp(getattr(self._reader, "_direct", None)).encode())
        return "slide:" + h.hexdigest()

    def read_order(self, indices=None) -> np.ndarray:
        # Morton order of the windows on the level: neighbouring spots share decoded tiles
        idx = self._indices(slice(None) if indices is None else indices)
        return idx[spatial_order(self._boxes[idx], max(self._size))]

    def _reading_in_processes(self, n_processes: int) -> None:
        # each process has its own tile cache: together they keep to the one-process budget
        self._reader.set_cache_bytes(max(DEFAULT_CACHE_BYTES // max(n_processes, 1), MIN_CACHE_BYTES))

    def _read(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), self.patch_size, self.patch_size, 3), dtype=np.uint8)
        # at most 256 windows at a time: bounds the raw windows held besides the output
        for start in range(0, len(idx), 256):
            part = idx[start : start + 256]
            if self._size == (
                self.patch_size,
                self.patch_size,
            ):  # 1:1: windows pasted straight into the output
                self._reader.read_windows(
                    self._boxes[part], self._size, self._fill, out=out[start : start + len(part)]
                )
                continue
            wins = self._reader.read_windows(self._boxes[part], self._size, self._fill)
            for j, w in enumerate(wins):
                out[start + j] = resize(w, self.patch_size)
        return out


def _anndata_patches(adata: AnnData, *, image, library_id, image_mpp, **kwargs) -> Patches:
    """Patches of an AnnData's spots, through a SpatialData holding only their ids, centres and the image."""
    sdata = anndata_to_spatialdata(adata, image, library_id=library_id, image_mpp=image_mpp, full_table=False)
    out = patches(sdata, **kwargs)
    adata.obs[OBS_FRACTION_KEY] = sdata.tables["table"].obs[OBS_FRACTION_KEY].to_numpy()
    return out


def _check_fill(fill) -> np.ndarray:
    f = np.asarray(fill)
    if f.shape not in ((), (3,)) or f.dtype.kind not in "iu" or (f < 0).any() or (f > 255).any():
        raise ValueError(f"fill must be an int in 0..255 or 3 such ints (RGB), got {fill!r}.")
    return np.broadcast_to(f, (3,)).astype(np.uint8)


@dataclass
class _Layout:
    """Where every spot's patch lies on the chosen level."""

    table_name: str
    image_key: str
    xy: np.ndarray  # spot centres, shapes' coordinates (full-res px), table order
    boxes: np.ndarray  # (n, 2) top-left (y0, x0) on the level
    size: tuple[int, int]  # window (height, width) on the level
    level: int
    level_mpp: float
    level_shape: tuple[int, int]
    patch_size_src: float  # patch side in the spots' units


def _layout(sdata, table_name, image_key, patch_size, target_mpp, image_mpp) -> _Layout:
    """Map spots into the image, choose the pyramid level and cut one window per spot."""
    _, shapes_key = get_spot_table(sdata, table_name)
    mpp0 = get_image_mpp(sdata, image_key=image_key, table_name=table_name, image_mpp=image_mpp)
    xy = spot_centers(sdata, table_name)
    m = spots_to_image_matrix(sdata, shapes_key, image_key)
    levels = image_levels(sdata.images[image_key])
    shapes = [level_shape(lv) for lv in levels]
    choice = choose_level(shapes, mpp0, target_mpp)
    if choice.upsampling:
        table = sdata.tables[table_name]
        fullres = table.uns.get(UNS_KEY, {}).get("fullres_mpp")
        downscaled = fullres is not None and mpp0 > 1.05 * float(fullres)  # e.g. a Visium hires PNG
        logger.warning(
            "Image %r has %.3g µm/px at full resolution, coarser than the target %.3g µm/px: patches are "
            "upsampled %.2fx and carry less detail than the model expects.%s",
            image_key,
            mpp0,
            target_mpp,
            mpp0 / target_mpp,
            f" It is a downscaled copy of the {float(fullres):.3g} µm/px scan: pass the full-resolution scan "
            "(read_visium(..., fullres_image_file=), pp.embed(adata, image=) for an AnnData, or `hopt-st embed "
            "--fullres-image`)."
            if downscaled
            else "",
        )
    side0 = patch_size * target_mpp / mpp0  # patch side in level-0 pixels
    side = side0 / min(choice.downsample)
    if side > MAX_WINDOW_RATIO * patch_size:
        raise ValueError(
            f"image {image_key!r}: at image_mpp={mpp0:g} µm per full-resolution pixel a {patch_size} px patch at "
            f"{target_mpp:g} µm/px covers {patch_size * target_mpp:g} µm = {side:.0f} px of its finest usable level "
            f"(level {choice.level}, {choice.mpp:g} µm/px), more than {MAX_WINDOW_RATIO}x the patch side: that "
            "pixel size is implausible (or the image lacks coarser pyramid levels). Pass the right "
            "image_mpp=<µm per full-resolution pixel> (e.g. 0.25 for 40x, 0.5 for 20x), or add pyramid levels."
        )
    boxes, size = patch_boxes(apply_affine(m, xy), choice.downsample, side0)
    return _Layout(
        table_name,
        image_key,
        xy,
        boxes,
        size,
        choice.level,
        choice.mpp,
        shapes[choice.level],
        side0 * units_per_image_px(m),
    )


def _spots_to_keep(table, lay: _Layout, outside: str, fill) -> np.ndarray:
    """Record the fraction of each patch inside the image; handle spots entirely outside it."""
    frac = fraction_inside(lay.boxes, lay.size, lay.level_shape)
    table.obs[OBS_FRACTION_KEY] = frac
    keep = np.ones(len(frac), dtype=bool)
    out_idx = np.flatnonzero(frac <= 0)
    if out_idx.size:
        names = table.obs_names[out_idx[:10]].tolist()
        if outside == "raise":
            raise ValueError(
                f"{out_idx.size} of {len(frac)} spots of table {lay.table_name!r} lie entirely outside image "
                f"{lay.image_key!r} once mapped through the transformations (first: {names}"
                f"{'...' if out_idx.size > 10 else ''}). Check the image/shapes transformations and the pixel "
                "size, or pass outside='drop' or outside='keep'."
            )
        logger.warning(
            "%d spots lie entirely outside image %r (first: %s); outside=%r.",
            out_idx.size,
            lay.image_key,
            names,
            outside,
        )
        if outside == "drop":
            keep[out_idx] = False
    partial = int(((frac > 0) & (frac < 1)).sum())
    if partial:
        logger.info(
            "%d patches are partly outside image %r and padded with %s.", partial, lay.image_key, fill
        )
    return keep


@inject_docs()
def patches(
    sdata: SpatialData | AnnData,
    *,
    table_name: str | None = None,
    image_key: str | None = None,
    image: str | os.PathLike | np.ndarray | None = None,
    library_id: str | None = None,
    patch_size: int = PATCH_SIZE,
    target_mpp: float = TARGET_MPP,
    image_mpp: float | None = None,
    fill: int | tuple[int, int, int] = 255,
    outside: Literal["raise", "drop", "keep"] = "raise",
) -> Patches:
    """Spot-centred patches of ``patch_size`` pixels at ``target_mpp`` µm per pixel.

    Spot centres come from the shapes element the table annotates, in table row order, and are mapped into
    the image's level-0 pixel grid through the elements' spatialdata transformations. The coarsest pyramid
    level whose pixels are still at least as fine as ``target_mpp`` is read, the window of
    ``patch_size * target_mpp / level_mpp`` level pixels nearest to each centre is cut and resampled to
    ``patch_size`` by Pillow itself, ``Image.resize(..., BILINEAR)`` (its antialiased bilinear, triangle,
    filter; enlarging, when the image is coarser than the target, is logged as one warning). Parts outside
    the image are filled with ``fill``.

    Parameters
    ----------
    sdata
        {sdata} Or Visium data as an AnnData in scanpy's layout (``sc.read_visium``, ``sq.read.visium``, an
        ``.h5ad`` with ``obsm["spatial"]`` and ``uns["spatial"][library_id]``), read with
        :func:`hopt_st.io.from_anndata`.
    table_name
        {table_name}
    image_key
        {image_key}
    {anndata_image_params}
    patch_size
        {patch_size}
    target_mpp
        {target_mpp}
    image_mpp
        {image_mpp_anndata}
    fill
        uint8 value (or RGB triple) for pixels outside the image; 255 = white glass.
    outside
        Spots whose patch lies entirely outside the image: ``"raise"`` (error listing them), ``"drop"``
        (left out of the returned patches) or ``"keep"`` (patches of pure ``fill``).

    Returns
    -------
    Lazy sequence of uint8 ``(patch_size, patch_size, 3)`` patches in table row order, and sets (rewritten on
    each call):

    ``table.obs["patch_fraction_inside"]`` (``adata.obs`` for an AnnData)
        Fraction of each spot's patch area inside the image.

    Raises
    ------
    ValueError
        Bad arguments, unsupported images (dims, channels), an image without H&E pixels (all one colour), no
        spots, spots entirely outside with ``outside="raise"``, a window over 16x the patch side (an implausible
        pixel size).
    TypeError
        Unsupported image dtype.
    """
    if isinstance(sdata, AnnData):
        if table_name is not None:
            raise ValueError("table_name= applies to a SpatialData; an AnnData is its own table.")
        return _anndata_patches(
            sdata,
            image=image,
            library_id=library_id,
            image_mpp=image_mpp,
            image_key=image_key,
            patch_size=patch_size,
            target_mpp=target_mpp,
            fill=fill,
            outside=outside,
        )
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"pp.patches takes a SpatialData or an AnnData, got {type(sdata).__name__}.")
    if image is not None or library_id is not None:
        raise ValueError(
            "image= and library_id= apply to an AnnData; in a SpatialData choose the image element with image_key=."
        )
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}.")
    target_mpp = check_mpp(target_mpp, "target_mpp")
    fill_rgb = _check_fill(fill)
    if outside not in _OUTSIDE:
        raise ValueError(f"outside must be one of {_OUTSIDE}, got {outside!r}.")
    table_name = resolve_table_name(sdata, table_name)
    table, _ = get_spot_table(sdata, table_name)
    if table.n_obs == 0:
        raise ValueError(f"table {table_name!r} has no spots (0 rows): there is nothing to cut patches for.")
    image_key = resolve_image_key(sdata, image_key, require_pixels=True)
    # dims, dtype and channels are checked first (before spots are placed on a mislabelled image)
    LevelReader(image_levels(sdata.images[image_key])[0], name=image_key)
    lay = _layout(sdata, table_name, image_key, patch_size, target_mpp, image_mpp)
    keep = _spots_to_keep(table, lay, outside, fill)
    reader = LevelReader(image_levels(sdata.images[image_key])[lay.level], name=image_key)
    logger.info(
        "Cutting %d patches of %d px at %.3g µm/px from level %d of %r (%.3g µm/px, windows of %dx%d px).",
        int(keep.sum()),
        patch_size,
        target_mpp,
        lay.level,
        image_key,
        lay.level_mpp,
        lay.size[1],
        lay.size[0],
    )
    return _SlidePatches(
        reader,
        lay.boxes[keep],
        lay.size,
        fill_rgb,
        lay.level_mpp,
        barcodes=table.obs_names.to_numpy()[keep],
        centers=lay.xy[keep],
        patch_size=patch_size,
        mpp=target_mpp,
        patch_size_src=lay.patch_size_src,
    )
