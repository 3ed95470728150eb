"""A synthetic H&E whole slide: tissue pieces on glass, drawn from the same tissue model as ``synthetic_visium``.

The slide has no spots and no counts: it is what a plain H&E scan gives. Its tissue follows the latent field /
tissue model of :func:`hopt_st.datasets.synthetic_visium` (state looks and gene programmes from ``model_seed``,
spatial layout from ``seed``), so a regressor fitted on ``synthetic_visium(model_seed=m)`` can be checked on
``synthetic_slide(model_seed=m)`` against the known expected expression
(:func:`hopt_st.datasets.synthetic_slide_truth`).

Every window of the slide is rendered on its own and deterministically (nuclei drawn per 64 µm cell, noise per
block, each from a seed of its own), so a 40k x 40k px slide can be written band by band as a pyramidal TIFF
at bounded memory, and the pixels do not depend on how the slide is cut into windows.
"""

from __future__ import annotations

import logging
import math
from os import PathLike

import dask.array as da
import numpy as np
import pandas as pd
import shapely
from geopandas import GeoDataFrame, GeoSeries
from shapely import affinity
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel
from spatialdata.transformations import Identity

from .._constants import UNS_KEY
from ..io._coords import add_micrometers
from ._synthetic import (
    FIBRE_STEP_UM,
    STROMA_STEP_UM,
    _LatentField,
    _stamp_nuclei,
    _tissue_model,
    _upsample,
    expected_counts,
    look_arrays,
)
from ._tiff import _downsample2, _level_shapes, write_pyramidal_tiff

logger = logging.getLogger(__name__)

#: nuclei are drawn per square cell of this side (µm)
_CELL_UM = 64.0
#: nuclei reach at most this far from their centre (µm): cells this close to a window are drawn for it
_NUCLEUS_MARGIN_UM = 20.0
#: pixel noise is drawn per block of this many px, fibre-texture lattice values per block of lattice points
_BLOCK = 256
_LATTICE_BLOCK = 64
#: a window is rendered in column chunks of at most this many px (bounds the float temporaries)
_CHUNK_COLS = 2048
#: the tissue outline is sampled every this many µm and interpolated
_MASK_STEP_UM = 4.0
#: glass: a faintly blue-grey white, and the colour of dust specks on it
_GLASS_RGB = np.array([243.0, 241.0, 245.0], dtype=np.float32)
_DUST_RGB = np.array([90.0, 80.0, 95.0], dtype=np.float32)
#: slides with more pixels than this are written to a TIFF (``path=``), not held in memory
_MAX_IN_MEMORY_PX = 2**28
# streams of the per-cell / per-block seeds
_NUCLEI, _LATTICE, _GRAIN, _SPECKLE = 1, 2, 3, 4


class _TissueShape:
    """Tissue pieces on the slide: a large lobed piece with a lumen, a small fragment, and dust (not tissue).

    Each piece is star-shaped around its centre: inside when ``|p - c| < r(θ)``, with ``r(θ)`` an ellipse
    perturbed by a few low harmonics. ``level(x, y)`` is positive inside tissue, negative outside, zero on
    the outline; the outline polygons are the same curves sampled at 720 angles.
    """

    def __init__(self, width_um: float, height_um: float, rng: np.random.Generator):
        side = min(width_um, height_um)
        # (centre x, centre y, semi-axis x, semi-axis y, harmonic amplitudes, phases)
        self.pieces = [
            self._piece(rng, width_um * 0.42, height_um * 0.48, width_um * 0.28, height_um * 0.33),
            self._piece(rng, width_um * 0.82, height_um * 0.72, side * 0.11, side * 0.09),
        ]
        cx, cy = self.pieces[0][:2]
        self.hole = self._piece(rng, cx + 0.06 * width_um, cy - 0.05 * height_um, side * 0.08, side * 0.07)
        # dust specks on the glass (µm): x, y, radius; kept clear of the tissue
        dust = []
        for _ in range(1000):  # up to 8 specks, rejection-sampled on the glass
            x, y = rng.uniform(0.02, 0.98) * width_um, rng.uniform(0.02, 0.98) * height_um
            if self.level(np.array([x]), np.array([y]))[0] < -0.3:
                dust.append((x, y, rng.uniform(4.0, 12.0)))
                if len(dust) == 8:
                    break
        self.dust = np.array(dust).reshape(-1, 3)

    @staticmethod
    def _piece(rng, cx, cy, ax, ay):
        amps = rng.uniform(0.0, 0.07, 4)
        phases = rng.uniform(0, 2 * np.pi, 4)
        return (cx, cy, ax, ay, amps, phases)

    @staticmethod
    def _radius(piece, theta: np.ndarray) -> np.ndarray:
        _, _, ax, ay, amps, phases = piece
        base = 1.0 / np.sqrt((np.cos(theta) / ax) ** 2 + (np.sin(theta) / ay) ** 2)
        k = np.arange(2, 2 + len(amps))
        wobble = (amps * np.cos(k * theta[..., None] + phases)).sum(-1)
        return base * (1.0 + wobble)

    def _piece_level(self, piece, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = x - piece[0], y - piece[1]
        return 1.0 - np.hypot(dx, dy) / self._radius(piece, np.arctan2(dy, dx))

    def level(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        inside = np.max([self._piece_level(p, x_um, y_um) for p in self.pieces], axis=0)
        return np.minimum(inside, -self._piece_level(self.hole, x_um, y_um))

    def _polygon(self, piece) -> shapely.Polygon:
        theta = np.linspace(0, 2 * np.pi, 720, endpoint=False)
        r = self._radius(piece, theta)
        return shapely.Polygon(np.column_stack([piece[0] + r * np.cos(theta), piece[1] + r * np.sin(theta)]))

    def outline_um(self) -> shapely.MultiPolygon | shapely.Polygon:
        """The tissue as polygons in µm (pieces united, the lumen cut out)."""
        pieces = shapely.union_all([self._polygon(p) for p in self.pieces])
        return shapely.difference(pieces, self._polygon(self.hole))


class _SlideRenderer:
    """Any window of the slide's level 0, rendered on its own: ``window(y0, x0, h, w) -> (h, w, 3) uint8``."""

    def __init__(self, params: dict):
        self.params = params
        self.mpp = float(params["image_mpp"])
        self.seed = int(params["seed"])
        self.width = int(math.ceil(params["width_um"] / self.mpp))
        self.height = int(math.ceil(params["height_um"] / self.mpp))
        rng = np.random.default_rng(self.seed)
        self.field = _LatentField(params["n_states"], params["width_um"], params["height_um"], rng)
        self.shape = _TissueShape(params["width_um"], params["height_um"], rng) if params["tissue"] else None
        self.model = _tissue_model(
            params["n_states"], params["n_genes"], params["n_state_genes"], params["model_seed"]
        )
        self.looks = look_arrays(self.model)

    # -- seeded noise, the same whatever the window -------------------------------------------------------
    def _rng(self, stream: int, i: int, j: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, stream, i, j))

    def _blocks(self, stream: int, block: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Standard normals on the integer lattice ``[y0, y1) x [x0, x1)``, drawn per ``block`` x ``block``."""
        out = np.empty((y1 - y0, x1 - x0), dtype=np.float32)
        for by in range(y0 // block, (y1 - 1) // block + 1):
            for bx in range(x0 // block, (x1 - 1) // block + 1):
                vals = self._rng(stream, by, bx).standard_normal((block, block), dtype=np.float32)
                ya, yb = max(y0, by * block), min(y1, (by + 1) * block)
                xa, xb = max(x0, bx * block), min(x1, (bx + 1) * block)
                out[ya - y0 : yb - y0, xa - x0 : xb - x0] = vals[
                    ya - by * block : yb - by * block, xa - bx * block : xb - bx * block
                ]
        return out

    def _speckle(self, y0: int, x0: int):
        salt = np.uint64((self.seed * 2654435761 + _SPECKLE) % 2**63)

        def speckle(py: np.ndarray, px: np.ndarray) -> np.ndarray:
            h = (py + y0).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            h ^= (px + x0).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F) + salt
            h ^= h >> np.uint64(31)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(29)
            return (h >> np.uint64(40)).astype(np.float64) / float(2**24)

        return speckle

    # -- layers ------------------------------------------------------------------------------------------
    @staticmethod
    def _span(start: int, n: int, step: float) -> tuple[int, int]:
        """Lattice indices ``[a, b)`` whose bilinear interpolation covers pixels ``start .. start + n - 1``."""
        a = int(math.floor((start + 0.5) / step))
        b = int(math.floor((start + n - 0.5) / step)) + 2
        return max(a, 0), b

    def _stroma(self, y0: int, x0: int, h: int, w: int, grain: np.ndarray) -> np.ndarray:
        """Stroma colour with its fibrous texture and grain, (3, h, w) float32 (as ``synthetic_visium``)."""
        step = STROMA_STEP_UM / self.mpp
        (ya, yb), (xa, xb) = self._span(y0, h, step), self._span(x0, w, step)
        gx, gy = np.arange(xa, xb) * STROMA_STEP_UM, np.arange(ya, yb) * STROMA_STEP_UM
        fr = self.field.fractions(*np.meshgrid(gx, gy)).astype(np.float32)
        la = self.looks
        coarse = np.concatenate([fr @ la["stroma_rgb"], fr @ la["texture"][:, None]], axis=-1).transpose(
            2, 0, 1
        )
        maps = _upsample(coarse, h, w, step, y0 - ya * step, x0 - xa * step)
        # fibres: lattice every 3 µm, columns stretched 3x along x (as synthetic_visium)
        fstep = FIBRE_STEP_UM / self.mpp
        c0, c1 = x0 // 3, (x0 + w - 1) // 3 + 1
        (ra, rb), (ca, cb) = self._span(y0, h, fstep), self._span(c0, c1 - c0, fstep)
        lattice = self._blocks(_LATTICE, _LATTICE_BLOCK, ra, rb, ca, cb)
        fib = _upsample(lattice[None], h, c1 - c0, fstep, y0 - ra * fstep, c0 - ca * fstep)[0]
        fibres = np.repeat(fib, 3, axis=1)[:, x0 - 3 * c0 : x0 - 3 * c0 + w]
        return maps[:3] + (fibres * maps[3] + grain * 4.0)[None]

    def _nuclei(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Alpha (h, w) and alpha-weighted colour (3, h, w) of the nuclei reaching into the window."""
        mpp, la = self.mpp, self.looks
        density = la["density"]
        dmax = density.max()
        lo_x, hi_x = x0 * mpp - _NUCLEUS_MARGIN_UM, (x0 + w) * mpp + _NUCLEUS_MARGIN_UM
        lo_y, hi_y = y0 * mpp - _NUCLEUS_MARGIN_UM, (y0 + h) * mpp + _NUCLEUS_MARGIN_UM
        parts = []
        for cy in range(max(0, int(lo_y // _CELL_UM)), int(hi_y // _CELL_UM) + 1):
            for cx in range(max(0, int(lo_x // _CELL_UM)), int(hi_x // _CELL_UM) + 1):
                rng = self._rng(_NUCLEI, cy, cx)
                n = rng.poisson(_CELL_UM * _CELL_UM * dmax)
                x = (cx + rng.uniform(size=n)) * _CELL_UM
                y = (cy + rng.uniform(size=n)) * _CELL_UM
                # each candidate picks a state by the local fractions; kept with that state's relative density
                cum = np.cumsum(self.field.fractions(x, y), axis=1)
                state = np.minimum((rng.uniform(size=(n, 1)) > cum).sum(axis=1), len(density) - 1)
                keep = rng.uniform(size=n) < density[state] / dmax
                r_um = la["radius"][state] * rng.lognormal(0, 0.15, n)
                theta = rng.uniform(0, np.pi, n)
                keep &= self.shape.level(x, y) > 0
                parts.append((x[keep], y[keep], state[keep], r_um[keep], theta[keep]))
        x, y, state, r_um, theta = (np.concatenate(v) for v in zip(*parts))
        return _stamp_nuclei(
            x / mpp - x0,
            y / mpp - y0,
            r_um / mpp,
            la["elong"][state],
            theta,
            la["nucleus_rgb"][state],
            h,
            w,
            None,
            batch=512,
            speckle=self._speckle(y0, x0),
        )

    def _tissue(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Boolean (h, w): pixel centres inside the tissue outline."""
        if self.shape is None:
            return np.zeros((h, w), dtype=bool)
        step = _MASK_STEP_UM / self.mpp
        (ya, yb), (xa, xb) = self._span(y0, h, step), self._span(x0, w, step)
        gx, gy = np.meshgrid(np.arange(xa, xb) * _MASK_STEP_UM, np.arange(ya, yb) * _MASK_STEP_UM)
        level = self.shape.level(gx, gy).astype(np.float32)[None]
        return _upsample(level, h, w, step, y0 - ya * step, x0 - xa * step)[0] > 0

    def _glass(self, y0: int, x0: int, h: int, w: int, grain: np.ndarray) -> np.ndarray:
        """Glass with faint noise and dust specks, (3, h, w) float32."""
        glass = _GLASS_RGB[:, None, None] + grain[None] * 1.5
        if self.shape is not None:
            yy, xx = np.ogrid[y0 : y0 + h, x0 : x0 + w]
            for dx, dy, dr in self.shape.dust / self.mpp:
                if dx + dr < x0 or dx - dr > x0 + w or dy + dr < y0 or dy - dr > y0 + h:
                    continue
                disc = (xx + 0.5 - dx) ** 2 + (yy + 0.5 - dy) ** 2 <= dr * dr
                glass[:, disc] = _DUST_RGB[:, None]
        return glass

    def _chunk(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        inside = self._tissue(y0, x0, h, w)
        grain = self._blocks(_GRAIN, _BLOCK, y0, y0 + h, x0, x0 + w)
        out = self._glass(y0, x0, h, w, grain)
        if inside.any():
            alpha, colour = self._nuclei(y0, x0, h, w)
            a = np.minimum(alpha, 1.0)
            nuc = colour / np.maximum(alpha, 1e-6)[None]
            tissue = self._stroma(y0, x0, h, w, grain) * (1 - a)[None] + nuc * a[None]
            out = np.where(inside[None], tissue, out)
        return np.clip(out, 0, 255).astype(np.uint8).transpose(1, 2, 0)

    def window(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Pixels ``[y0, y0 + h) x [x0, x0 + w)`` of level 0 as ``(h, w, 3)`` uint8."""
        out = np.empty((h, w, 3), dtype=np.uint8)
        for c in range(0, w, _CHUNK_COLS):
            cw = min(_CHUNK_COLS, w - c)
            out[:, c : c + cw] = self._chunk(int(y0), int(x0) + c, int(h), cw)
        return out

    def image(self, band: int = 512) -> np.ndarray:
        """The whole level 0 as (3, height, width) uint8, rendered band by band."""
        out = np.empty((3, self.height, self.width), dtype=np.uint8)
        for y0 in range(0, self.height, band):
            h = min(band, self.height - y0)
            out[:, y0 : y0 + h] = self.window(y0, 0, h, self.width).transpose(2, 0, 1)
        return out


def _check_slide_arguments(width_um, height_um, image_mpp, n_states, n_genes) -> None:
    for name, v in (("width_um", width_um), ("height_um", height_um), ("image_mpp", image_mpp)):
        if not isinstance(v, int | float | np.number) or isinstance(v, bool):
            raise TypeError(f"{name} must be a number, got {type(v).__name__}.")
    for name, v in (("n_states", n_states), ("n_genes", n_genes)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool):
            raise TypeError(f"{name} must be an integer, got {type(v).__name__}.")
    if min(width_um, height_um) < 300:
        raise ValueError(
            f"width_um x height_um = {width_um} x {height_um}: a slide needs at least 300 µm a side."
        )
    if not (0.05 <= float(image_mpp) <= 20):
        raise ValueError(
            f"image_mpp = {image_mpp!r} µm/px is not plausible; use e.g. 0.5 (20x) or 0.25 (40x)."
        )
    if n_states < 2 or n_genes < 1:
        raise ValueError(f"need n_states >= 2 and n_genes >= 1, got {n_states} and {n_genes}.")


def synthetic_slide(
    width_um: float = 2400.0,
    height_um: float = 1600.0,
    image_mpp: float = 0.5,
    seed: int = 0,
    n_genes: int = 100,
    n_states: int = 4,
    *,
    n_state_genes: int | None = None,
    model_seed: int = 0,
    mean_library_size: float = 2000.0,
    tissue: bool = True,
    path: str | PathLike | None = None,
    compression: str = "jpeg",
) -> SpatialData:
    """A synthetic H&E whole slide (tissue on glass, no spots, no counts) with a known expression field.

    Parameters
    ----------
    width_um
        Slide width in µm.
    height_um
        Slide height in µm.
    image_mpp
        µm per pixel of level 0.
    seed
        Seed of the spatial layout: latent field, tissue outline, nuclei, noise.
    n_genes
        Number of genes of the tissue model (as in :func:`synthetic_visium`).
    n_states
        Number of latent cell states.
    n_state_genes
        Genes driven by the states (default 70%).
    model_seed
        Seed of the tissue model (state looks and gene programmes): a regressor fitted on
        ``synthetic_visium(model_seed=model_seed, n_genes=n_genes, n_states=n_states)`` applies here.
    mean_library_size
        Library size of the expected counts of :func:`synthetic_slide_truth`.
    tissue
        ``False``: bare glass (with dust), for the "no tissue" case.
    path
        Write the slide there as a tiled pyramidal BigTIFF (band by band, bounded memory, the pixel size in
        its metadata) and open it lazily with :func:`hopt_st.io.read_slide`; otherwise the image is rendered
        in memory (up to 2^28 px).
    compression
        Tile compression of the TIFF (``"jpeg"`` or ``"zlib"``).

    Returns
    -------
    SpatialData
        Image ``"he"`` (c, y, x) uint8 (multiscale when both sides reach 1024 px, or the TIFF's pyramid);
        shapes ``"tissue_truth"`` (absent when ``tissue=False``): the true tissue outline as polygons in
        level-0 pixels, one per piece (dust specks on the glass are not tissue); ``attrs["hopt_st"]``: ``image_mpp`` (``{"he": image_mpp}``, as
        :func:`hopt_st.io.read_slide` records it) and ``synthetic`` (the generation parameters, used by
        :func:`synthetic_slide_truth`). Elements sit in ``"global"`` (level-0 pixels) and ``"micrometers"``.

    Examples
    --------
    >>> sdata = synthetic_slide(1200, 800, seed=1)
    >>> sdata["tissue_truth"].geometry.area.sum() > 0
    True
    """
    _check_slide_arguments(width_um, height_um, image_mpp, n_states, n_genes)
    params = {
        "kind": "slide",
        "width_um": float(width_um),
        "height_um": float(height_um),
        "image_mpp": float(image_mpp),
        "seed": int(seed),
        "model_seed": int(model_seed),
        "n_states": int(n_states),
        "n_genes": int(n_genes),
        "n_state_genes": None if n_state_genes is None else int(n_state_genes),
        "mean_library_size": float(mean_library_size),
        "tissue": bool(tissue),
    }
    renderer = _SlideRenderer(params)
    shape = (renderer.height, renderer.width)
    if path is not None:
        from ..io import read_slide

        write_pyramidal_tiff(
            path, shape=shape, tile_fn=renderer.window, mpp=image_mpp, compression=compression
        )
        sdata = read_slide(path)
    else:
        if shape[0] * shape[1] > _MAX_IN_MEMORY_PX:
            raise ValueError(
                f"a {shape[1]} x {shape[0]} px slide is too large to hold in memory: pass path= to write it as "
                "a pyramidal TIFF and read it lazily."
            )
        sdata = SpatialData(images={"he": _pyramid(renderer.image())})
        sdata.attrs[UNS_KEY] = {"image_mpp": {"he": float(image_mpp)}}
    if renderer.shape is not None:
        sdata.shapes["tissue_truth"] = _truth_shapes(renderer)
    add_micrometers(sdata, "he", float(image_mpp))
    sdata.attrs[UNS_KEY]["synthetic"] = params
    logger.info("synthetic_slide: %d x %d px at %.3g µm/px", shape[1], shape[0], image_mpp)
    return sdata


def _pyramid(image: np.ndarray):
    """(3, H, W) uint8 as an image element: multiscale (2x2 means down to a side of 512 px, as the TIFF writer
    builds its levels) when a side allows it."""
    from ..io._tiff import multiscale_image

    shapes = _level_shapes(image.shape[1], image.shape[2], None, 512)
    if len(shapes) == 1:
        return Image2DModel.parse(
            image, dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations={"global": Identity()}
        )
    levels = [np.ascontiguousarray(image.transpose(1, 2, 0))]
    for _ in shapes[1:]:
        levels.append(_downsample2(levels[-1]))
    return multiscale_image([da.from_array(lv.transpose(2, 0, 1), chunks=(3, 1024, 1024)) for lv in levels])


def _truth_shapes(renderer: _SlideRenderer):
    """The tissue outline (level-0 px) as a shapes element, one row per piece."""
    outline = affinity.scale(renderer.shape.outline_um(), 1 / renderer.mpp, 1 / renderer.mpp, origin=(0, 0))
    geoms = list(getattr(outline, "geoms", [outline]))
    gdf = GeoDataFrame(geometry=GeoSeries(geoms), index=pd.RangeIndex(len(geoms)))
    return ShapesModel.parse(gdf, transformations={"global": Identity()})


def synthetic_slide_truth(sdata: SpatialData, *, table_name: str = "grid") -> None:
    """Write the known state fractions and expected expression of a synthetic slide at each row of a table.

    The truth at a grid tile is the mean of the latent field over the tile's footprint (circle or square of
    ``uns["hopt_st"]["grid"]["size_um"]``, as :func:`hopt_st.pp.tile_grid` records it), pushed through the
    tissue model of :func:`synthetic_slide` at its mean library size.

    Parameters
    ----------
    sdata
        Made by :func:`synthetic_slide` (its ``attrs["hopt_st"]["synthetic"]``), with a grid table.
    table_name
        The grid table (from :func:`hopt_st.pp.tile_grid`).

    Returns
    -------
    ``None``, and sets:

    ``table.obsm["latent_truth"]``
        ``(n_tiles, n_states)`` mean state fractions over each tile.
    ``table.obsm["expected_log1p"]``
        DataFrame (tiles x genes) of ``log1p`` expected counts at the mean library size.
    """
    params = sdata.attrs.get(UNS_KEY, {}).get("synthetic")
    if not params or params.get("kind") != "slide":
        raise ValueError(
            "sdata was not made by hopt_st.datasets.synthetic_slide (no attrs['hopt_st']['synthetic'])."
        )
    if table_name not in sdata.tables:
        raise KeyError(
            f"table {table_name!r} not found; make the grid first with hopt_st.pp.tile_grid(sdata)."
        )
    table = sdata.tables[table_name]
    store = table.uns.get(UNS_KEY, {})
    grid = store.get("grid")
    if grid is None:
        raise ValueError(
            f"table {table_name!r} has no uns['{UNS_KEY}']['grid']: make it with hopt_st.pp.tile_grid."
        )
    renderer = _SlideRenderer(params)
    centers_um = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2] * float(store["fullres_mpp"])
    latent = renderer.field.spot_fractions(centers_um, float(grid["size_um"]) / 2, grid["shape"] == "square")
    expected = expected_counts(renderer.model, latent, params["mean_library_size"])
    table.obsm["latent_truth"] = latent.astype(np.float32)
    table.obsm["expected_log1p"] = pd.DataFrame(
        np.log1p(expected).astype(np.float32),
        index=table.obs_names.copy(),
        columns=renderer.model["gene_names"],
    )
