"""Token maps: one forward pass per 224 px tile, the ViT's patch tokens kept as a raster in micrometres.

:func:`embed_tokens` cuts the image into tiles of the model's input size at its µm/px (112 µm for
H-optimus-1), on a lattice of half a tile, and runs them through the same inference loop as
:func:`hopt_st.pp.embed` (precision, batching, reader threads/processes). Every tile gives a ``g x g`` grid of
patch tokens (16 x 16 of 7 µm for patch-14 at 224 px) and a class token. Channels are reduced by a PCA fit on a
sample of tiles (on the device, inside the forward, so only the reduced tokens travel back), and each tile's
tokens are blended into the map with a tent window: with half-tile overlap the four windows over a point sum to
a constant, so tile borders do not show. The class token is blended the same way into ``n_context`` context
channels. The map is a float16 image element in ``"micrometers"`` (one pixel per token, chunked).

:func:`token_features` reads, for every bin or cell of a table, the area-weighted mean of the map over its
footprint (squares exactly; other polygons and circles by points on a fine lattice), i.e. the token channels
and the context channels beside them: one ``obsm`` embedding per bin or cell, which the
:class:`~hopt_st.tl.ExpressionRegressor` family fits as it fits spots.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from spatialdata import SpatialData
from spatialdata.models import Image2DModel
from spatialdata.transformations import Scale, Sequence, Translation

from .._atomic import atomic_write_bytes
from .._constants import MICROMETERS_CS, UNS_KEY
from ..io._coords import micrometers_affine
from ..io._elements import check_new_element, get_spot_table, image_levels, level_shape, resolve_image_key
from ..io._mpp import get_image_mpp
from ..io._store import check_name, sanitize_name
from ..models import Encoder, get_encoder
from ._checkpoint import CheckpointStore
from ._device import select_device, select_dtype
from ._embed import _default_batch_size, _resolve_model, _weights_id
from ._engine import run_encoder
from ._geometry import choose_level, patch_boxes
from ._image_reader import LevelReader
from ._patches import _SlidePatches

logger = logging.getLogger(__name__)

#: tiles whose tokens fit the PCA (spread evenly over the slide)
_PCA_TILES = 48
#: bytes of reduced tokens held per call of the inference loop (bounds memory, whatever the slide)
_CHUNK_BYTES = 256 << 20
#: map pixels per chunk side in the stored element
_MAP_CHUNK = 256


class _TokenHead(torch.nn.Module):
    """uint8 tiles -> flattened ``[grid tokens @ W_t (g*g*k), cls @ W_c (kc)]`` (PCA on the device)."""

    def __init__(self, encoder: Encoder, proj: dict | None):
        super().__init__()
        self.encoder = encoder
        self.spec = encoder.spec
        self.weights_source = encoder.weights_source
        dev = next(iter(encoder.buffers()), torch.empty(0)).device
        self.proj = proj
        if proj is not None:
            for name in ("mean_t", "comp_t", "mean_c", "comp_c"):
                self.register_buffer(name, torch.as_tensor(np.asarray(proj[name], np.float32), device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, grid = self.encoder.tokens(x)
        cls, grid = cls.float(), grid.float()
        if self.proj is None:  # the PCA sample: raw tokens
            return torch.cat([grid.flatten(1), cls], 1)
        t = (grid - self.mean_t) @ self.comp_t.T
        c = (cls - self.mean_c) @ self.comp_c.T
        return torch.cat([t.flatten(1), c], 1)


def _pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the first ``k`` principal axes (rows) of ``x`` (n, C); sign fixed (largest loading positive)."""
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    vt = vt[:k]
    vt *= np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]
    return mean.astype(np.float32), vt.astype(np.float32)


def _tent(g: int) -> np.ndarray:
    """Blending weight of each token of a tile: a tent peaking at the tile centre (sums to a constant with
    half-tile overlap)."""
    a = np.arange(g) + 0.5
    w = np.minimum(a, g - a) / (g / 2)
    return np.outer(w, w).astype(np.float32)


def _image_to_um(image, mpp0: float) -> tuple[float, float]:
    """Micrometre position of level-0 pixel (0, 0)'s corner; the image must sit in ``"micrometers"`` by an
    axis-aligned scale of ``mpp0`` (plus a translation)."""
    m = micrometers_affine(image, "the image")
    if abs(m[0, 1]) > 1e-9 or abs(m[1, 0]) > 1e-9 or not np.allclose([m[0, 0], m[1, 1]], mpp0, rtol=1e-3):
        raise ValueError(
            f"the image's placement in 'micrometers' is not a plain scale of {mpp0:g} µm/px ({m[:2].tolist()}): "
            "token maps need an axis-aligned image."
        )
    return float(m[0, 2]), float(m[1, 2])


def _projection(encoder_head, source, idx, k, kc, **run) -> dict:
    """Fit the PCA of the tokens and of the class tokens on tiles ``idx``."""
    sample = _Subset(source, idx)
    raw = run_encoder(encoder_head, sample, dim=run.pop("dim"), desc="token PCA sample", **run)
    g = encoder_head.grid
    cls_dim = raw.shape[1] // (g * g + 1)
    grid = raw[:, : g * g * cls_dim].reshape(-1, cls_dim)
    cls = raw[:, g * g * cls_dim :]
    k, kc = min(k, cls_dim, len(grid)), min(kc, cls_dim, len(cls))
    mean_t, comp_t = _pca(grid, k)
    mean_c, comp_c = _pca(cls, kc) if kc > 0 else (cls.mean(0), np.zeros((0, cls_dim), np.float32))
    return {"mean_t": mean_t, "comp_t": comp_t, "mean_c": mean_c, "comp_c": comp_c}


class _Subset(_SlidePatches):
    """Some tiles of a tile set (the PCA sample)."""

    def __init__(self, source: _SlidePatches, idx: np.ndarray):
        self.__dict__.update(source.__dict__)
        self._boxes = source._boxes[idx]
        self.barcodes = source.barcodes[idx]
        self.centers = source.centers[idx]


def _tiles(spec, extent_um):
    """Tile lattice (half-tile stride, aligned with the token grid) over ``extent_um`` = (x0, y0, x1, y1)."""
    tile_um = spec.input_size * spec.mpp
    stride = tile_um / 2
    x0, y0, x1, y1 = extent_um
    nx = int(np.ceil((x1 - x0) / stride)) + 1
    ny = int(np.ceil((y1 - y0) / stride)) + 1
    ox, oy = x0 - stride, y0 - stride  # first tile's top-left corner, µm
    jy, jx = np.divmod(np.arange(nx * ny), nx)
    centres_um = np.column_stack([ox + jx * stride + tile_um / 2, oy + jy * stride + tile_um / 2])
    return centres_um, (jx, jy), (ox, oy), (nx, ny), tile_um


def embed_tokens(
    sdata: SpatialData,
    model="h-optimus-1",
    *,
    image_key: str | None = None,
    table_name: str | None = None,
    image_mpp: float | None = None,
    extent_um: tuple[float, float, float, float] | None = None,
    n_components: int = 256,
    n_context: int = 32,
    projection: dict | None = None,
    key_added: str | None = None,
    weights: str | os.PathLike | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    num_workers: int | None = None,
    workers: str = "auto",
    overwrite: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> None:
    """Embed an H&E image once, tile by tile, and keep the ViT's patch tokens as a map in micrometres.

    Parameters
    ----------
    sdata
        A SpatialData whose image sits in ``"micrometers"`` (every hopt_st reader places it there).
    model
        Registry name, ``"timm:<arch>"``, spec or encoder built with :func:`hopt_st.models.create`; a ViT
        (patch tokens), or ``"handcrafted"`` (per-14 px colour / stain / texture statistics, weight-free).
    image_key
        The H&E; default the largest image.
    table_name
        A table recording the image's µm/px (default: the only one, or the slide's own record).
    image_mpp
        µm per level-0 pixel, overriding the recorded one.
    extent_um
        ``(x0, y0, x1, y1)`` in micrometres to cover; default the whole image.
    n_components
        Token channels kept (PCA of the tokens of a sample of tiles; at most the model's width).
    n_context
        Context channels (PCA of the class tokens, blended like the tokens).
    projection
        Reuse another map's PCA (``sdata.attrs["hopt_st"]["token_maps"][key]["projection"]`` of the training
        sample), so that features of a new slide live in the same space. Default: fit here.
    key_added
        Name of the image element; default ``"tokens_<model>"``.
    weights, batch_size, device, dtype, num_workers, workers
        As for :func:`hopt_st.pp.embed` (the same inference loop).
    overwrite
        Replace an existing element of that name.
    checkpoint_dir
        Persist finished batches of reduced tokens there (one checkpoint store of :func:`hopt_st.pp.embed` per
        chunk of tiles, plus the PCA in ``projection.npz``); a rerun after a crash recomputes only what is
        missing. A directory of another run (model, weights, tiles, image, precision, projection) is refused.
    progress
        Show progress bars.

    Returns
    -------
    ``None``; sets

    ``sdata.images[key_added]``
        float16 ``(n_components + n_context, H, W)``, one pixel per token (``input_size * mpp / g`` µm, 7 µm
        for H-optimus-1), channels ``tok0..`` then ``ctx0..``, in ``"micrometers"`` only.
    ``sdata.attrs["hopt_st"]["token_maps"][key_added]``
        model, weights, µm/px, tile and token size, number of tiles, the PCA (``projection``), image.
    """
    dev = select_device(device)
    cdtype = select_dtype(dtype, dev)
    spec, encoder = _resolve_model(model, weights)
    key = check_name(key_added or "tokens_" + sanitize_name(spec.name), "key_added")
    check_new_element(sdata, key, "images", overwrite)
    if n_components < 1 or n_context < 0:
        raise ValueError(f"n_components={n_components} must be >= 1 and n_context={n_context} >= 0.")
    image_key = resolve_image_key(sdata, image_key, require_pixels=True)
    if table_name is None and sdata.tables and image_mpp is None:
        table_name = next(
            (
                t
                for t in sdata.tables
                if image_key in sdata.tables[t].uns.get(UNS_KEY, {}).get("image_mpp", {})
            ),
            None,
        )
    mpp0 = get_image_mpp(sdata, image_key=image_key, table_name=table_name, image_mpp=image_mpp)
    image = sdata.images[image_key]
    ox_img, oy_img = _image_to_um(image, mpp0)
    levels = image_levels(image)
    h0, w0 = level_shape(levels[0])
    if extent_um is None:
        extent_um = (ox_img, oy_img, ox_img + w0 * mpp0, oy_img + h0 * mpp0)
    if encoder is None:
        encoder = get_encoder(spec, weights=weights, device=dev)
    g = spec.input_size // encoder.token_patch
    centres_um, (jx, jy), (ox, oy), (nx, ny), tile_um = _tiles(spec, extent_um)
    token_um = tile_um / g
    choice = choose_level([level_shape(lv) for lv in levels], mpp0, spec.mpp)
    centres_px = (centres_um - [ox_img, oy_img]) / mpp0
    boxes, size = patch_boxes(centres_px, choice.downsample, tile_um / mpp0)
    reader = LevelReader(levels[choice.level], name=image_key)
    source = _SlidePatches(
        reader,
        boxes,
        size,
        np.array([255, 255, 255], np.uint8),
        choice.mpp,
        barcodes=np.array([f"tile_{a}_{b}" for a, b in zip(jy, jx)]),
        centers=centres_px,
        patch_size=spec.input_size,
        mpp=spec.mpp,
        patch_size_src=tile_um / mpp0,
    )
    bs = int(batch_size or _default_batch_size(spec, dev))
    run = dict(
        batch_size=bs, device=dev, dtype=cdtype, num_workers=num_workers, workers=workers, progress=progress
    )
    base = _fingerprint(spec, encoder, source, cdtype, n_components, n_context)
    saved = None if checkpoint_dir is None else Path(checkpoint_dir) / "projection.npz"
    if projection is None and saved is not None and saved.is_file():
        projection = _load_projection(saved, base)
    if projection is None:
        head = _TokenHead(encoder, None)
        head.grid = g
        width = _width(encoder, spec)
        sample = np.unique(np.linspace(0, len(source) - 1, min(_PCA_TILES, len(source))).astype(int))
        projection = _projection(
            head, source, sample, n_components, n_context, dim=(g * g + 1) * width, **run
        )
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.savez(
                buf,
                fingerprint=np.array(base),
                **{n: np.asarray(v, np.float32) for n, v in projection.items()},
            )
            atomic_write_bytes(saved, buf.getvalue(), what="token-map projection")
    head = _TokenHead(encoder, projection)
    k, kc = len(projection["comp_t"]), len(projection["comp_c"])
    proj_digest = hashlib.sha256(
        b"".join(
            np.ascontiguousarray(np.asarray(projection[n], np.float32)).tobytes() for n in sorted(projection)
        )
    ).hexdigest()
    dim = g * g * k + kc
    ht, wt = (ny - 1) * g // 2 + g, (nx - 1) * g // 2 + g
    acc = np.zeros((ht, wt, k + kc), dtype=np.float32)
    wsum = np.zeros((ht, wt), dtype=np.float32)
    tent = _tent(g)
    per_call = max(bs, _CHUNK_BYTES // (4 * dim))
    order = source.read_order()
    for start in range(0, len(order), per_call):
        idx = np.sort(order[start : start + per_call])
        ckpt = None
        if checkpoint_dir is not None:
            info = {
                "model": spec.name,
                "tiles": f"{start}-{start + len(idx)}",
                "dtype": str(cdtype),
                "dim": dim,
            }
            fp = hashlib.sha256(f"{base}|{proj_digest}|{start}|{len(idx)}".encode()).hexdigest()
            ckpt = CheckpointStore(Path(checkpoint_dir) / f"chunk_{start:09d}", fp, len(idx), dim, info)
        try:
            out = run_encoder(
                head, _Subset(source, idx), dim=dim, desc=f"token map {spec.name}", checkpoint=ckpt, **run
            )
        finally:
            if ckpt is not None:
                ckpt.close()
        for i, row in zip(idx, out):
            r0, c0 = jy[i] * g // 2, jx[i] * g // 2
            t = row[: g * g * k].reshape(g, g, k)
            acc[r0 : r0 + g, c0 : c0 + g, :k] += t * tent[..., None]
            if kc:
                acc[r0 : r0 + g, c0 : c0 + g, k:] += tent[..., None] * row[g * g * k :]
            wsum[r0 : r0 + g, c0 : c0 + g] += tent
    acc /= np.maximum(wsum, 1e-6)[..., None]
    names = [f"tok{i}" for i in range(k)] + [f"ctx{i}" for i in range(kc)]
    to_um = Sequence([Scale([token_um, token_um], axes=("x", "y")), Translation([ox, oy], axes=("x", "y"))])
    sdata.images[key] = Image2DModel.parse(
        np.ascontiguousarray(acc.transpose(2, 0, 1)).astype(np.float16),
        dims=["c", "y", "x"],
        c_coords=names,
        chunks=(k + kc, _MAP_CHUNK, _MAP_CHUNK),
        transformations={MICROMETERS_CS: to_um},
    )
    record = {
        "model": spec.name,
        "weights_sha256": _weights_id(encoder),
        "mpp": float(spec.mpp),
        "patch_size": int(spec.input_size),
        "tile_um": float(tile_um),
        "token_um": float(token_um),
        "stride_um": float(tile_um / 2),
        "n_tiles": int(len(source)),
        "n_components": int(k),
        "n_context": int(kc),
        "image_key": image_key,
        "dtype": str(cdtype).removeprefix("torch."),
        "projection": {n: np.asarray(v, np.float32).tolist() for n, v in projection.items()},
        "projection_sha256": proj_digest,
    }
    sdata.attrs.setdefault(UNS_KEY, {}).setdefault("token_maps", {})[key] = record
    logger.info(
        "token map %r: %d tiles of %.0f µm -> %d x %d tokens of %.2f µm, %d + %d channels",
        key,
        len(source),
        tile_um,
        ht,
        wt,
        token_um,
        k,
        kc,
    )


def _fingerprint(spec, encoder, source, cdtype, k: int, kc: int) -> str:
    """What the reduced tokens depend on, besides the projection: model, weights, tiles (and their pixels)."""
    from ._embed import spec_identity

    parts = [spec_identity(spec), _weights_id(encoder), source.fingerprint(), str(cdtype), k, kc]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _load_projection(path: Path, fingerprint: str) -> dict:
    with np.load(path) as f:
        if str(f["fingerprint"]) != fingerprint:
            raise ValueError(
                f"{str(path)!r} holds the PCA of another run (model, weights, tiles or image differ): use a new "
                "checkpoint_dir, or delete that one to start over."
            )
        logger.info("token map: reusing the PCA saved in %s", path)
        return {n: f[n] for n in ("mean_t", "comp_t", "mean_c", "comp_c")}


def _width(encoder: Encoder, spec) -> int:
    if spec.arch == "handcrafted":
        from ..models._handcrafted import TOKEN_STAT_NAMES

        return len(TOKEN_STAT_NAMES)
    return int(getattr(encoder.backbone, "num_features", None) or encoder.backbone.embed_dim)


def token_map_record(sdata: SpatialData, key: str) -> dict:
    """What :func:`embed_tokens` recorded for the token map ``key`` (``KeyError`` naming the maps there)."""
    maps = sdata.attrs.get(UNS_KEY, {}).get("token_maps", {})
    if key not in maps or key not in sdata.images:
        raise KeyError(
            f"no token map {key!r} in this SpatialData (maps: {sorted(maps)}); run pp.embed_tokens first."
        )
    return maps[key]


def _map_array(sdata: SpatialData, key: str) -> tuple[np.ndarray, float, float, float]:
    """The map as float16 ``(H, W, C)`` in memory, its token size and origin (µm)."""
    img = sdata.images[key]
    m = micrometers_affine(img, f"token map {key!r}")
    return np.asarray(img.data).transpose(1, 2, 0), float(m[0, 0]), float(m[0, 2]), float(m[1, 2])


def _box_weights(lo: np.ndarray, hi: np.ndarray, n: int, max_span: int) -> tuple[np.ndarray, np.ndarray]:
    """First cell and overlap lengths (n_boxes, max_span) of intervals [lo, hi) (in cells) with unit cells."""
    first = np.floor(lo).astype(np.int64)
    cells = first[:, None] + np.arange(max_span)[None]
    w = np.clip(np.minimum(hi[:, None], cells + 1) - np.maximum(lo[:, None], cells), 0, None)
    w[(cells < 0) | (cells >= n)] = 0
    return np.clip(cells, 0, n - 1), w


def read_map_boxes(
    arr: np.ndarray, token_um: float, ox: float, oy: float, boxes_um: np.ndarray
) -> np.ndarray:
    """Area-weighted mean of ``arr`` (H, W, C) over axis-aligned boxes ``(n, 4)`` = (x0, y0, x1, y1) µm; rows
    of boxes outside the map are NaN."""
    h, w, c = arr.shape
    out = np.full((len(boxes_um), c), np.nan, dtype=np.float32)
    lo_x, hi_x = (boxes_um[:, 0] - ox) / token_um, (boxes_um[:, 2] - ox) / token_um
    lo_y, hi_y = (boxes_um[:, 1] - oy) / token_um, (boxes_um[:, 3] - oy) / token_um
    span = int(np.ceil(max((hi_x - lo_x).max(), (hi_y - lo_y).max()))) + 1
    step = max(1, (1 << 24) // (span * span * c))
    for s in range(0, len(boxes_um), step):
        sl = slice(s, s + step)
        cx, wx = _box_weights(lo_x[sl], hi_x[sl], w, span)
        cy, wy = _box_weights(lo_y[sl], hi_y[sl], h, span)
        wgt = wy[:, :, None] * wx[:, None, :]  # n, span_y, span_x
        vals = arr[cy[:, :, None], cx[:, None, :]].astype(np.float32)  # n, sy, sx, C
        tot = wgt.sum((1, 2))
        ok = tot > 0
        out[sl][ok] = (np.einsum("nij,nijc->nc", wgt, vals)[ok]) / tot[ok, None]
    return out


def _footprints_um(sdata: SpatialData, table_name: str | None):
    """The table, its geometries in micrometres (a GeoSeries) and whether they are axis-aligned squares."""
    import geopandas as gpd
    import shapely

    table, shapes_key = get_spot_table(sdata, table_name)
    shapes = sdata.shapes[shapes_key]
    m = micrometers_affine(shapes, f"shapes {shapes_key!r}")
    geoms = shapes.geometry
    if "radius" in shapes.columns and (geoms.geom_type == "Point").all():
        geoms = geoms.buffer(shapes["radius"].to_numpy(), resolution=8)
    # to micrometres in one vectorised call (shapely applies the affine to every coordinate array at once)
    geoms = gpd.GeoSeries(
        shapely.transform(np.asarray(geoms.values), lambda c: c @ m[:2, :2].T + m[:2, 2]), index=geoms.index
    )
    instance_key = table.uns["spatialdata_attrs"]["instance_key"]
    ids = table.obs[instance_key].to_numpy()
    geoms = geoms.loc[ids] if not np.array_equal(geoms.index.to_numpy(), ids) else geoms
    b = geoms.bounds.to_numpy()
    box_area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    squares = bool(np.allclose(geoms.area.to_numpy(), box_area, rtol=1e-6))
    return table, geoms, b, squares


def _read_map_polygons(arr, token_um, ox, oy, geoms, bounds, step_um) -> np.ndarray:
    """Mean of the map over points of a ``step_um`` lattice inside each polygon (the token under each point)."""
    import shapely

    h, w, c = arr.shape
    out = np.full((len(geoms), c), np.nan, dtype=np.float32)
    garr = np.asarray(geoms.values)
    for i, (g, (x0, y0, x1, y1)) in enumerate(zip(garr, bounds)):
        xs = np.arange(x0 + step_um / 2, x1, step_um)
        ys = np.arange(y0 + step_um / 2, y1, step_um)
        gx, gy = np.meshgrid(xs, ys)
        inside = shapely.contains_xy(g, gx.ravel(), gy.ravel())
        px, py = gx.ravel()[inside], gy.ravel()[inside]
        if not len(px):
            px, py = np.array([(x0 + x1) / 2]), np.array([(y0 + y1) / 2])
        ci = np.floor((px - ox) / token_um).astype(int)
        ri = np.floor((py - oy) / token_um).astype(int)
        ok = (ci >= 0) & (ci < w) & (ri >= 0) & (ri < h)
        if ok.any():
            out[i] = arr[ri[ok], ci[ok]].astype(np.float32).mean(0)
    return out


def token_features(
    sdata: SpatialData,
    tokens_key: str,
    *,
    table_name: str | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
) -> None:
    """Features of every bin or cell from a token map: the area-weighted mean of the map over its footprint.

    Parameters
    ----------
    sdata
        Holds the token map (:func:`embed_tokens`) and the table of bins or cells with its shapes
        (e.g. ``"square_008um"`` from :func:`hopt_st.io.read_visium_hd`, ``"table"`` of Xenium cells),
        placed in ``"micrometers"``.
    tokens_key
        The token map.
    table_name
        The bins' or cells' table.
    key_added
        ``obsm`` key; default ``"X_<tokens_key>"``.
    overwrite
        Replace an existing key.

    Returns
    -------
    ``None``; sets ``table.obsm[key_added]`` (float32, ``n_components + n_context`` columns: token channels
    then context channels; NaN rows for footprints outside the map) and its provenance in
    ``table.uns["hopt_st"]["embeddings"][key_added]`` (model, weights, µm/px, patch size, token map), which
    :func:`hopt_st.tl.fit_expression` / :func:`~hopt_st.tl.predict_expression` check.
    """
    rec = token_map_record(sdata, tokens_key)
    table, geoms, bounds, squares = _footprints_um(sdata, table_name)
    key = check_name(key_added or f"X_{tokens_key}", "key_added", existing=table.obsm.keys())
    if key in table.obsm and not overwrite:
        raise ValueError(f"obsm[{key!r}] already exists: pass overwrite=True or another key_added.")
    arr, token_um, ox, oy = _map_array(sdata, tokens_key)
    if squares:
        feats = read_map_boxes(arr, token_um, ox, oy, bounds)
    else:
        feats = _read_map_polygons(arr, token_um, ox, oy, geoms, bounds, step_um=token_um / 4)
    n_out = int(np.isnan(feats).any(1).sum())
    if n_out:
        logger.warning(
            "%d of %d footprints lie outside token map %r: NaN features.", n_out, len(feats), tokens_key
        )
    table.obsm[key] = feats
    prov = {k: rec[k] for k in ("model", "weights_sha256", "mpp", "patch_size", "dtype", "projection_sha256")}
    prov |= {"token_map": tokens_key, "token_um": rec["token_um"], "kind": "token_map"}
    table.uns.setdefault(UNS_KEY, {}).setdefault("embeddings", {})[key] = prov
    logger.info(
        "obsm[%r]: %d x %d token-map features (%s)", key, *feats.shape, "boxes" if squares else "polygons"
    )
