"""A synthetic Visium-like sample whose expression is a known function of what the H&E image shows.

The tissue is a smooth, non-symmetric field of ``n_states`` latent "cell states". Each state has its own
look -- nuclei density and size, stain hue (eosin pink to haematoxylin purple), texture -- and its own gene
programme. Counts at a spot are Poisson draws whose means depend on the state fractions at that spot.

Ground truth
------------
``table.obsm["latent_truth"]``
    ``(n_spots, n_states)`` state fractions of the latent field at each spot (mean over the spot's disc or
    square), rows summing to 1.
``table.varm["truth_loadings"]``
    ``(n_genes, n_states)`` log-fold effects: the expected count of gene ``g`` at a spot is
    ``library_size * exp(var["truth_log_base"][g] + latent_truth @ truth_loadings[g]) / Z`` with one constant
    ``Z`` per slide (so noise genes do not depend on the states) and a log-normal library size per spot.
``table.var["state_dependent"]``
    ``True`` for genes driven by the latent states, ``False`` for pure noise genes.
``table.uns["hopt_st"]["metadata"]["synthetic"]``
    The generation parameters.

The tissue model (state looks, gene programmes) is drawn from ``model_seed`` and the spatial layout and
counts from ``seed``, so different seeds give different slides of the *same* biology.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import xarray as xr
from anndata import AnnData
from geopandas import GeoDataFrame
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity

from .._constants import SQUARE_SPOT_SIDE_UM, UNS_KEY, VISIUM_SPOT_DIAMETER_UM, VISIUM_SPOT_DISTANCE_UM
from ..io._coords import add_micrometers

logger = logging.getLogger(__name__)

_MARGIN_UM = 120.0
_MULTISCALE_SIDE = 4096
_CHUNK = 1024
#: pixels of the image rendered at a time (bounds the float work arrays: ~100 bytes per pixel)
_BAND_PIXELS = 1 << 21
#: stamp pixels computed at a time when drawing nuclei
_STAMP_ENTRIES = 1 << 20

# Per-state appearance of the first four states: (stroma RGB, nucleus RGB, nuclei per 1000 µm²,
# nucleus radius µm, elongation, texture amplitude). Further states are drawn from model_seed.
_STATE_LOOKS = [
    # dense large pale-purple nuclei (tumour-like)
    ((214, 150, 196), (92, 46, 128), 9.0, 4.4, 1.2, 10.0),
    # pink fibrous stroma with few elongated nuclei
    ((238, 150, 176), (120, 60, 140), 2.0, 2.6, 2.6, 26.0),
    # packed small dark nuclei (lymphoid-like)
    ((200, 160, 206), (50, 28, 100), 22.0, 2.2, 1.0, 6.0),
    # pale, sparse (adipose / necrotic-like)
    ((246, 218, 228), (140, 100, 160), 1.0, 3.4, 1.4, 4.0),
]


def synthetic_visium(
    n_spots: int = 400,
    image_mpp: float = 0.5,
    seed: int = 0,
    n_genes: int = 100,
    n_states: int = 4,
    *,
    n_state_genes: int | None = None,
    model_seed: int = 0,
    technology: str = "Visium",
    mean_library_size: float = 2000.0,
    sample_id: str | None = None,
) -> SpatialData:
    """A synthetic Visium/HEST-like sample with a known link between image and expression.

    Parameters
    ----------
    n_spots
        Number of spots (the slide is about 1.6 times wider than tall).
    image_mpp
        µm per pixel of the image (0.5 = 20x). Spot coordinates are full-resolution pixels of this image.
    seed
        Seed of the spatial field, the nuclei and the counts.
    n_genes
        Number of genes.
    n_states
        Number of latent cell states (at least 2).
    n_state_genes
        How many genes depend on the states; the others are noise genes. Default: 70% of ``n_genes``.
    model_seed
        Seed of the tissue model: state looks and gene programmes, shared across ``seed`` values.
    technology
        ``"Visium"`` (55 µm circles on a 100 µm hexagonal grid) or ``"Xenium"`` / ``"Visium HD"``
        (100 µm square pseudo-spots on a 100 µm square grid).
    mean_library_size
        Mean total counts per spot.
    sample_id
        Sample id recorded in ``uns["hopt_st"]["sample_id"]``; default ``f"synthetic_{seed}"``.

    Returns
    -------
    SpatialData
        Image ``"he"`` (c, y, x) uint8, dask-backed, multiscale when a side exceeds 4096 px; shapes
        ``"spots"``; table ``"table"`` of raw counts (integer-valued float32 CSR, like Space Ranger).
        Elements sit in ``"global"`` (full-resolution pixels) and ``"micrometers"``. The image is rendered
        band by band: peak memory is about the uint8 image plus ~200 MB (``n_spots=2000``, a 6k x 12.6k px
        image: 1.2 GB peak RSS including the imports).

    Notes
    -----
    Ground truth for tests and tutorials: ``table.obsm["latent_truth"]`` (n_spots, n_states) state
    fractions at each spot, ``table.varm["truth_loadings"]`` (n_genes, n_states) log effects of the states
    on each gene, ``table.var["state_dependent"]`` (marker vs. noise genes). The expected count of gene
    ``g`` is ``library_size * exp(var["truth_log_base"][g] + latent_truth @ truth_loadings[g]) / Z``.
    The mean colour of a spot's own pixels predicts ``latent_truth`` well (R² ~0.9); the field is not
    symmetric under an x/y swap, so reading the wrong place does not.

    Examples
    --------
    >>> sdata = synthetic_visium(n_spots=100, seed=0)
    >>> sdata.tables["table"].obsm["latent_truth"].shape
    (100, 4)
    """
    _check_arguments(n_spots, n_states, n_genes, image_mpp)
    squares = _is_square_technology(technology)
    sample_id = sample_id or f"synthetic_{seed}"
    mpp = float(image_mpp)
    rng = np.random.default_rng(seed)
    model = _tissue_model(n_states, n_genes, n_state_genes, model_seed)

    # spot grid (µm), slide size, latent field and the image it shows
    centers_um, array_row, array_col = _grid(n_spots, squares)
    width_um = centers_um[:, 0].max() + _MARGIN_UM
    height_um = centers_um[:, 1].max() + _MARGIN_UM
    width, height = int(np.ceil(width_um / mpp)), int(np.ceil(height_um / mpp))
    field = _LatentField(n_states, width_um, height_um, rng)
    image = _render(field, model, width, height, mpp, rng)

    # ground truth at spots: mean state fractions over the spot's footprint; counts drawn from it
    half_um = SQUARE_SPOT_SIDE_UM / 2 if squares else VISIUM_SPOT_DIAMETER_UM / 2
    latent = field.spot_fractions(centers_um, half_um, squares)
    counts = _counts(model, latent, mean_library_size, rng)

    xy = centers_um / mpp
    table = _table(counts, latent, model, xy, array_row, array_col, seed)
    table.uns[UNS_KEY] = _uns(mpp, sample_id, squares, seed, model_seed, n_states)
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    logger.info("synthetic_visium: %d spots, image %d x %d px at %.3g µm/px", n_spots, width, height, mpp)
    sdata = SpatialData(
        images={"he": _image_element(image)},
        shapes={"spots": _spot_shapes(xy, mpp, squares)},
        tables={"table": table},
    )
    add_micrometers(sdata, "spots", mpp)
    return sdata


def _check_arguments(n_spots: int, n_states: int, n_genes: int, image_mpp: float) -> None:
    for name, v in (("n_spots", n_spots), ("n_states", n_states), ("n_genes", n_genes)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool):
            raise TypeError(f"{name} must be an integer, got {type(v).__name__}.")
    if not isinstance(image_mpp, int | float | np.number) or isinstance(image_mpp, bool):
        raise TypeError(f"image_mpp must be a number (µm per pixel), got {type(image_mpp).__name__}.")
    if n_spots < 1:
        raise ValueError(f"n_spots = {n_spots!r}: need at least one spot.")
    if n_states < 2:
        raise ValueError(f"n_states = {n_states!r}: need at least 2 latent states.")
    if n_genes < 1:
        raise ValueError(f"n_genes = {n_genes!r}: need at least one gene.")
    if not (0.05 <= float(image_mpp) <= 20):
        raise ValueError(
            f"image_mpp = {image_mpp!r} µm/px is not plausible; use e.g. 0.5 (20x) or 0.25 (40x)."
        )


def _counts(
    model: dict, latent: np.ndarray, mean_library_size: float, rng: np.random.Generator
) -> np.ndarray:
    """Poisson counts (n_spots, n_genes) float32 around the model's rates at each spot's state fractions."""
    lib = mean_library_size * rng.lognormal(0.0, 0.15, size=len(latent))
    return rng.poisson(expected_counts(model, latent, lib)).astype(np.float32)


def expected_counts(model: dict, latent: np.ndarray, library_size) -> np.ndarray:
    """Poisson means (n_spots, n_genes) at state fractions ``latent`` for library size(s) ``library_size``."""
    # a constant normaliser (not per spot) keeps noise genes independent of the states
    norm = np.exp(model["log_base"] + model["loadings"].mean(axis=1)).sum()
    lib = np.broadcast_to(np.asarray(library_size, dtype=np.float64), (len(latent),))
    return np.exp(model["log_base"][None, :] + latent @ model["loadings"].T) / norm * lib[:, None]


def _spot_shapes(xy: np.ndarray, mpp: float, squares: bool) -> GeoDataFrame:
    """55 µm circles, or 100 µm squares, centred at ``xy`` (full-resolution px), indexed 0..n-1."""
    spot_ids = np.arange(len(xy))
    if squares:
        from shapely.geometry import box

        half = SQUARE_SPOT_SIDE_UM / 2 / mpp
        geoms = [box(x - half, y - half, x + half, y + half) for x, y in xy]
        return ShapesModel.parse(
            GeoDataFrame(geometry=geoms, index=pd.Index(spot_ids)), transformations={"global": Identity()}
        )
    return ShapesModel.parse(
        xy.copy(),
        geometry=0,
        radius=np.full(len(xy), VISIUM_SPOT_DIAMETER_UM / 2 / mpp),
        index=spot_ids,
        transformations={"global": Identity()},
    )


def _table(
    counts: np.ndarray,
    latent: np.ndarray,
    model: dict,
    xy: np.ndarray,
    array_row: np.ndarray,
    array_col: np.ndarray,
    seed: int,
) -> AnnData:
    """Counts with Visium obs columns, ``obsm["spatial"]`` and the ground truth (not yet a TableModel)."""
    n_spots = len(xy)
    barcodes = [f"SYN{seed % 1000:03d}{i:05d}-1" for i in range(n_spots)]
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(n_spots, dtype=np.int64),
            "array_row": array_row,
            "array_col": array_col,
            "pxl_col_in_fullres": xy[:, 0],
            "pxl_row_in_fullres": xy[:, 1],
            "region": pd.Categorical(["spots"] * n_spots),
            "spot_id": np.arange(n_spots),
        },
        index=pd.Index(barcodes),
    )
    var = pd.DataFrame(
        {"state_dependent": model["state_dependent"], "truth_log_base": model["log_base"]},
        index=pd.Index(model["gene_names"]),
    )
    adata = AnnData(X=sparse.csr_matrix(counts), obs=obs, var=var)
    adata.obsm["spatial"] = xy.copy()
    adata.obsm["latent_truth"] = latent.astype(np.float32)
    adata.varm["truth_loadings"] = model["loadings"].astype(np.float32)
    return adata


def _uns(mpp: float, sample_id: str, squares: bool, seed: int, model_seed: int, n_states: int) -> dict:
    """``uns["hopt_st"]``: pixel sizes (the readers' convention), sample id, Visium-like metadata."""
    return {
        "image_mpp": {"he": mpp},
        "fullres_mpp": mpp,
        "sample_id": sample_id,
        "metadata": {
            "st_technology": "Xenium" if squares else "Visium",
            "spot_diameter": SQUARE_SPOT_SIDE_UM if squares else VISIUM_SPOT_DIAMETER_UM,
            "inter_spot_dist": VISIUM_SPOT_DISTANCE_UM,
            "synthetic": {
                "seed": int(seed),
                "model_seed": int(model_seed),
                "n_states": int(n_states),
                "state_names": [f"state{k}" for k in range(n_states)],
            },
        },
    }


def _image_element(image: np.ndarray) -> xr.DataArray | xr.DataTree:
    """The (3, height, width) uint8 image as element ``"he"``: multiscale when a side exceeds 4096 px."""
    scale_factors = _scale_factors(*image.shape[1:])
    return Image2DModel.parse(
        image,
        dims=["c", "y", "x"],
        c_coords=["r", "g", "b"],
        scale_factors=scale_factors or None,
        chunks=(3, _CHUNK, _CHUNK),
        transformations={"global": Identity()},
    )


def _is_square_technology(technology: str) -> bool:
    t = str(technology).lower().replace("_", " ")
    if "xenium" in t or "visium hd" in t or t == "hd":
        return True
    if t in ("visium", "st"):
        return False
    raise ValueError(f"technology = {technology!r} is not known: use 'Visium', 'Xenium' or 'Visium HD'.")


def _scale_factors(height: int, width: int) -> list[int]:
    factors: list[int] = []
    side = max(height, width)
    if side <= _MULTISCALE_SIDE:
        return factors
    while side > 1024:
        factors.append(2)
        side //= 2
    return factors


def _grid(n_spots: int, squares: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spot centres (µm) on a 100 µm hexagonal (Visium) or square grid; the slide is ~1.6x wider than tall."""
    row_step = VISIUM_SPOT_DISTANCE_UM if squares else VISIUM_SPOT_DISTANCE_UM * np.sqrt(3) / 2
    n_rows = max(1, int(round(np.sqrt(n_spots * row_step / (1.6 * VISIUM_SPOT_DISTANCE_UM)))))
    n_cols = int(np.ceil(n_spots / n_rows))
    idx = np.arange(n_spots)
    row, col = idx // n_cols, idx % n_cols
    offset = 0.0 if squares else (row % 2) * VISIUM_SPOT_DISTANCE_UM / 2
    x = _MARGIN_UM + col * VISIUM_SPOT_DISTANCE_UM + offset
    y = _MARGIN_UM + row * row_step
    # Visium array coordinates: columns step by 2, odd rows shifted by one
    array_col = col * 2 + (row % 2) if not squares else col
    return np.column_stack([x, y]).astype(np.float64), row.astype(np.int64), array_col.astype(np.int64)


def _tissue_model(n_states: int, n_genes: int, n_state_genes: int | None, model_seed: int) -> dict:
    rng = np.random.default_rng(10_000 + model_seed)
    looks = []
    for k in range(n_states):
        if k < len(_STATE_LOOKS):
            looks.append(_STATE_LOOKS[k])
        else:
            stroma = tuple(int(v) for v in rng.integers([200, 130, 170], [250, 200, 230]))
            nucleus = tuple(int(v) for v in rng.integers([40, 20, 90], [150, 100, 170]))
            looks.append(
                (
                    stroma,
                    nucleus,
                    float(rng.uniform(1, 20)),
                    float(rng.uniform(2, 4.5)),
                    1.3,
                    float(rng.uniform(4, 25)),
                )
            )
    if n_state_genes is None:
        n_state_genes = int(round(0.7 * n_genes))
    n_state_genes = int(np.clip(n_state_genes, 0, n_genes))
    loadings = np.zeros((n_genes, n_states))
    # state-dependent genes: each is a marker of one state (strong), with weaker effects elsewhere
    for g in range(n_state_genes):
        k = g % n_states
        loadings[g] = rng.normal(0.0, 0.3, n_states)
        loadings[g, k] += rng.uniform(1.5, 3.0)
    order = rng.permutation(n_genes)  # markers and noise genes interleaved
    loadings = loadings[order]
    state_dependent = np.zeros(n_genes, dtype=bool)
    state_dependent[:n_state_genes] = True
    state_dependent = state_dependent[order]
    log_base = rng.normal(0.0, 0.8, n_genes)
    return {
        "looks": looks,
        "loadings": loadings,
        "state_dependent": state_dependent,
        "log_base": log_base,
        "gene_names": [f"GENE{g:04d}" for g in range(n_genes)],
    }


class _LatentField:
    """Softmax of random smooth (Fourier) logits plus per-state linear trends: smooth and not symmetric."""

    def __init__(self, n_states: int, width_um: float, height_um: float, rng: np.random.Generator):
        self.n_states = n_states
        n_waves = 6
        # wavelengths 500-1500 µm, random directions
        wavelength = rng.uniform(500.0, 1500.0, (n_states, n_waves))
        angle = rng.uniform(0, 2 * np.pi, (n_states, n_waves))
        self.freq = np.stack([np.cos(angle), np.sin(angle)], axis=-1) / wavelength[..., None]
        self.phase = rng.uniform(0, 2 * np.pi, (n_states, n_waves))
        self.amp = rng.uniform(0.6, 1.2, (n_states, n_waves))
        # linear trends in x and y with different slopes per state break the x/y symmetry
        trend = rng.normal(0.0, 1.0, (n_states, 2))
        trend[:, 0] *= 2.0 / width_um
        trend[:, 1] *= 1.0 / height_um
        self.trend = trend
        self.sharpness = 2.5

    def fractions(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """State fractions at points; returns shape ``x_um.shape + (n_states,)``."""
        p = np.stack([np.asarray(x_um, float), np.asarray(y_um, float)], axis=-1)
        arg = 2 * np.pi * np.einsum("...d,kwd->...kw", p, self.freq) + self.phase
        logits = (self.amp * np.cos(arg)).sum(-1) + np.einsum("...d,kd->...k", p, self.trend)
        logits = self.sharpness * logits
        logits -= logits.max(axis=-1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=-1, keepdims=True)

    def spot_fractions(self, centers_um: np.ndarray, half: float, squares: bool) -> np.ndarray:
        """Mean fractions over each spot's disc/square (sampled on a 7x7 grid of offsets)."""
        t = np.linspace(-half, half, 7)
        ox, oy = np.meshgrid(t, t)
        keep = np.ones_like(ox, dtype=bool) if squares else (ox**2 + oy**2 <= half**2)
        ox, oy = ox[keep], oy[keep]
        f = self.fractions(centers_um[:, 0:1] + ox[None], centers_um[:, 1:2] + oy[None])
        return f.mean(axis=1)


def _upsample(
    coarse: np.ndarray, height: int, width: int, step_px: float, y0: float = 0.0, x0: float = 0.0
) -> np.ndarray:
    """Bilinear upsampling of ``(C, h, w)`` samples taken every ``step_px`` pixels to ``(C, height, width)``.

    Output pixel ``(i, j)`` sits at ``(y0 + i, x0 + j)`` pixels from the first sample: a window of a larger
    upsampled image is the same whichever window it is cut from.
    """
    out = []
    yi = (y0 + np.arange(height) + 0.5) / step_px
    xi = (x0 + np.arange(width) + 0.5) / step_px
    y0 = np.clip(np.floor(yi).astype(np.int64), 0, coarse.shape[1] - 2)
    x0 = np.clip(np.floor(xi).astype(np.int64), 0, coarse.shape[2] - 2)
    ty = np.clip(yi - y0, 0, 1).astype(np.float32)[:, None]
    tx = np.clip(xi - x0, 0, 1).astype(np.float32)[None, :]
    for c in coarse.astype(np.float32):
        rows = c[y0] * (1 - ty) + c[y0 + 1] * ty  # (height, w)
        out.append(rows[:, x0] * (1 - tx) + rows[:, x0 + 1] * tx)
    return np.stack(out)


def _generator(state: dict) -> np.random.Generator:
    """A generator continuing from a saved ``bit_generator.state`` (PCG64, as ``default_rng`` makes)."""
    bg = np.random.PCG64()
    bg.state = state
    return np.random.Generator(bg)


def look_arrays(model: dict) -> dict[str, np.ndarray]:
    """The per-state looks as arrays: stroma / nucleus RGB (K, 3), nuclei per µm², radius µm, elongation, texture."""
    looks = model["looks"]
    return {
        "stroma_rgb": np.array([lk[0] for lk in looks], dtype=np.float32),
        "nucleus_rgb": np.array([lk[1] for lk in looks], dtype=np.float32),
        "density": np.array([lk[2] for lk in looks]) / 1000.0,
        "radius": np.array([lk[3] for lk in looks]),
        "elong": np.array([lk[4] for lk in looks]),
        "texture": np.array([lk[5] for lk in looks], dtype=np.float32),
    }


#: the stroma colour / texture amplitude maps are sampled every this many µm and upsampled
STROMA_STEP_UM = 8.0
#: correlation length of the fibrous texture, µm (stretched 3x along x)
FIBRE_STEP_UM = 3.0


def _render(field: _LatentField, model: dict, width: int, height: int, mpp: float, rng) -> np.ndarray:
    """Render the H&E-like image (3, height, width) uint8, one band of rows at a time.

    Memory is bounded by the output plus one band of float work arrays (about ``_BAND_PIXELS`` pixels) and
    the nuclei's parameters. The random draws happen in one fixed order whatever the band size (the fine
    grain is drawn band after band from one stream and regenerated from saved generator states when its band
    is composed), so the image depends only on the seed.
    """
    K = field.n_states
    la = look_arrays(model)
    stroma_rgb, nucleus_rgb, texture = la["stroma_rgb"], la["nucleus_rgb"], la["texture"]
    density, radius, elong = la["density"], la["radius"], la["elong"]

    # coarse maps every 8 µm: stroma colour and texture amplitude
    step_um = STROMA_STEP_UM
    step_px = step_um / mpp
    gx = (np.arange(int(np.ceil(width / step_px)) + 2)) * step_um
    gy = (np.arange(int(np.ceil(height / step_px)) + 2)) * step_um
    fr = field.fractions(*np.meshgrid(gx, gy)).astype(np.float32)  # (h, w, K)
    coarse = np.concatenate([fr @ stroma_rgb, fr @ texture[:, None]], axis=-1).transpose(2, 0, 1)

    # fibrous texture: anisotropic noise at ~3 µm upsampled (stretched along x), plus fine grain
    fib_step = FIBRE_STEP_UM / mpp
    nh, nw = int(np.ceil(height / fib_step)) + 2, int(np.ceil(width / fib_step / 3)) + 2
    fib = rng.standard_normal((1, nh, nw)).astype(np.float32)
    rows = max(16, _BAND_PIXELS // max(width, 1))
    bands = [(y, min(y + rows, height)) for y in range(0, height, rows)]
    grain_states = []
    for y0, y1 in bands:  # the same stream as one (height, width) draw
        grain_states.append(rng.bit_generator.state)
        rng.standard_normal((y1 - y0, width), dtype=np.float32)

    # nuclei: thinning of a Poisson process by the local state's density
    area = width * height * mpp * mpp
    dmax = density.max()
    n_cand = rng.poisson(area * dmax)
    cx = rng.uniform(0, width * mpp, n_cand)
    cy = rng.uniform(0, height * mpp, n_cand)
    f = field.fractions(cx, cy)
    # each candidate picks a state by the local fractions; kept with that state's relative density
    cum = np.cumsum(f, axis=1)
    state = (rng.uniform(size=(n_cand, 1)) > cum).sum(axis=1)
    state = np.minimum(state, K - 1)
    keep = rng.uniform(size=n_cand) < density[state] / dmax
    cx, cy, state = cx[keep], cy[keep], state[keep]
    r_um = radius[state] * rng.lognormal(0, 0.15, len(state))
    stamps = _NucleusStamps(
        cx / mpp,
        cy / mpp,
        r_um / mpp,
        elong[state],
        rng.uniform(0, np.pi, len(state)),
        nucleus_rgb[state],
        height,
        width,
        rng,
    )

    img = np.empty((3, height, width), dtype=np.uint8)
    fib_width = int(np.ceil(width / 3)) + 1
    for (y0, y1), grain_state in zip(bands, grain_states):
        maps = _upsample(
            coarse, y1 - y0, width, step_px, y0=y0
        )  # (4, rows, W): stroma RGB, texture amplitude
        stroma = maps[:3]
        tex_amp = maps[3]
        fibres = _upsample(fib, y1 - y0, fib_width, fib_step, y0=y0)[0]
        fibres = np.repeat(fibres, 3, axis=1)[:, :width]
        grain = _generator(grain_state).standard_normal((y1 - y0, width), dtype=np.float32) * 4.0
        shade = fibres * tex_amp + grain
        stroma += shade[None]
        alpha_sum, col_sum = stamps.band(y0, y1)
        a = np.minimum(alpha_sum, 1.0)
        nuc = col_sum / np.maximum(alpha_sum, 1e-6)[None]
        band = stroma * (1 - a)[None] + nuc * a[None]
        img[:, y0:y1] = np.clip(band, 0, 255).astype(np.uint8)
    return img


class _NucleusStamps:
    """Elliptical soft blobs (nuclei), accumulated band by band: alpha sum and alpha-weighted colour sum.

    Nuclei are stamped in order of size, in batches of ``batch`` sharing one square stamp window (which
    also clips the largest blobs of a batch). Each stamped pixel gets a "chromatin speckle" factor drawn from
    ``rng``, one uniform per pixel in stamping order: the constructor counts the pixels of every nucleus and
    advances ``rng`` past all of them; :meth:`band` regenerates the factors it needs from the saved state.
    Within a band, contributions are summed in the same order as over the whole image, so any banding gives
    the same sums bit for bit.
    """

    def __init__(self, x, y, r, elong, theta, rgb, height, width, rng, batch: int = 4000):
        n = len(x)
        self.height, self.width = height, width
        reach = r * np.sqrt(elong)
        order = np.argsort(reach)  # batches of similar size keep the stamp windows small
        # per nucleus, in stamping order
        self.x, self.y, self.rgb = x[order], y[order], rgb[order]
        self.xi, self.yi = np.round(self.x).astype(np.int64), np.round(self.y).astype(np.int64)
        self.cos, self.sin = np.empty(n), np.empty(n)
        self.a_ax, self.b_ax = np.empty(n), np.empty(n)
        self.half = np.empty(n, dtype=np.int64)
        self.batches = [(s, min(s + batch, n)) for s in range(0, n, batch)]
        for s, e in self.batches:
            sl = order[s:e]
            self.half[s:e] = int(np.ceil(reach[sl].max())) + 1
            self.cos[s:e], self.sin[s:e] = np.cos(theta[sl]), np.sin(theta[sl])
            self.a_ax[s:e] = r[sl] * np.sqrt(elong[sl])
            self.b_ax[s:e] = r[sl] / np.sqrt(elong[sl])
        # pixels stamped by each nucleus -> where its speckle factors start in the stream
        counts = np.zeros(n, dtype=np.int64)
        for ids in self._groups(np.arange(n)):
            _, _, _, ok = self._stamp(ids)
            counts[ids] = ok.sum(axis=1)
        self.start = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n else counts
        self.counts = counts
        self.speckle_state = rng.bit_generator.state
        _advance(rng, int(counts.sum()))

    def _groups(self, ids: np.ndarray):
        """``ids`` (increasing) split by batch and into groups of at most ~``_STAMP_ENTRIES`` stamp pixels."""
        for s, e in self.batches:
            sel = ids[(ids >= s) & (ids < e)]
            if not len(sel):
                continue
            side = 2 * int(self.half[s]) + 1
            step = max(1, _STAMP_ENTRIES // (side * side))
            for k in range(0, len(sel), step):
                yield sel[k : k + step]

    def _stamp(self, ids: np.ndarray):
        """Pixels ``(py, px)``, blob weights ``w`` and the in-image mask of nuclei ``ids`` (one batch)."""
        return _ellipses(
            self.xi[ids],
            self.yi[ids],
            self.x[ids],
            self.y[ids],
            self.cos[ids],
            self.sin[ids],
            self.a_ax[ids],
            self.b_ax[ids],
            int(self.half[ids[0]]),
            self.height,
            self.width,
        )

    def band(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        """Alpha sum ``(y1 - y0, W)`` and alpha-weighted colour sum ``(3, y1 - y0, W)`` of rows ``y0:y1``."""
        ids = np.flatnonzero((self.yi + self.half >= y0) & (self.yi - self.half < y1) & (self.counts > 0))
        gen = _generator(self.speckle_state)
        pos = 0
        flats, weights, colors = [], [], []
        for grp in self._groups(ids):
            py, px, w, ok = self._stamp(grp)
            rank = np.cumsum(ok, axis=1) - 1  # index of each pixel among its nucleus's stamped pixels
            inside = ok & (py >= y0) & (py < y1)
            j, k = np.nonzero(inside)  # (nucleus, pixel) in stamping order
            if not len(j):
                continue
            runs = []
            for i in grp[np.unique(j)]:  # each nucleus's speckle factors, from its place in the stream
                gen.bit_generator.advance(int(self.start[i]) - pos)
                runs.append(gen.random(int(self.counts[i])))
                pos = int(self.start[i] + self.counts[i])
            first = np.zeros(len(grp), dtype=np.int64)
            uj = np.unique(j)
            first[uj] = np.concatenate([[0], np.cumsum([len(rn) for rn in runs])[:-1]])
            speckle = np.concatenate(runs)[first[j] + rank[j, k]]
            weights.append(w[j, k] * (0.8 + 0.2 * speckle))
            flats.append((py[j, k] - y0) * self.width + px[j, k])
            colors.append(self.rgb[grp[j]])
        return _accumulate(flats, weights, colors, y1 - y0, self.width)


def _advance(rng: np.random.Generator, n: int) -> None:
    """Advance ``rng`` as if ``n`` doubles had been drawn (keeping its buffered 32-bit half, if any)."""
    state = rng.bit_generator.state
    bg = np.random.PCG64()
    bg.state = state
    bg.advance(n)
    new = bg.state
    new["has_uint32"], new["uinteger"] = state["has_uint32"], state["uinteger"]
    rng.bit_generator.state = new


def _stamp_nuclei(x, y, r, elong, theta, rgb, height, width, rng, batch: int = 4000, speckle=None):
    """Accumulate elliptical soft blobs: returns alpha sum (H, W) and alpha-weighted colour sum (3, H, W).

    ``speckle(py, px)`` gives the chromatin speckle in [0, 1) of the stamped pixels (default: drawn from ``rng``).
    """
    n = len(x)
    flats, weights, colors = [], [], []
    reach = r * np.sqrt(elong)
    order = np.argsort(reach)  # batches of similar size keep the stamp windows small
    for s in range(0, n, batch):
        sl = order[s : s + batch]
        xi, yi = np.round(x[sl]).astype(np.int64), np.round(y[sl]).astype(np.int64)
        py, px, w, ok = _ellipses(
            xi,
            yi,
            x[sl],
            y[sl],
            np.cos(theta[sl]),
            np.sin(theta[sl]),
            r[sl] * np.sqrt(elong[sl]),
            r[sl] / np.sqrt(elong[sl]),
            int(np.ceil(reach[sl].max())) + 1,
            height,
            width,
        )
        grain = rng.uniform(size=int(ok.sum())) if speckle is None else speckle(py[ok], px[ok])
        wv = w[ok] * (0.8 + 0.2 * grain)  # chromatin speckle
        flats.append((py * width + px)[ok])
        weights.append(wv)
        colors.append(np.broadcast_to(rgb[sl, None, :], w.shape + (3,))[ok])
    return _accumulate(flats, weights, colors, height, width)


def _ellipses(xi, yi, x, y, cos, sin, a_ax, b_ax, half: int, height: int, width: int):
    """Elliptical soft blobs centred at ``(x, y)`` (rounded: ``(xi, yi)``), axes ``a_ax`` / ``b_ax`` turned by
    the angle of ``(cos, sin)``, in square windows of side ``2 * half + 1``: pixels ``(py, px)``, weights ``w``
    and the mask ``ok`` of pixels with weight inside the ``height`` x ``width`` image (each ``(n, side**2)``)."""
    off = np.arange(-half, half + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    px, py = xi[:, None] + ox.ravel()[None], yi[:, None] + oy.ravel()[None]
    dx, dy = px - x[:, None], py - y[:, None]
    c, sn = cos[:, None], sin[:, None]
    u, v = dx * c + dy * sn, -dx * sn + dy * c
    d2 = (u / a_ax[:, None]) ** 2 + (v / b_ax[:, None]) ** 2
    w = np.clip(1.25 - d2, 0, 1) * 0.9
    ok = (w > 0) & (px >= 0) & (px < width) & (py >= 0) & (py < height)
    return py, px, w, ok


def _accumulate(flats, weights, colors, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Alpha sum ``(height, width)`` and alpha-weighted colour sum ``(3, height, width)`` (float32) of stamped
    pixels given as lists of flat indices, weights and RGB rows, summed in list order."""
    if not flats:
        return np.zeros((height, width), np.float32), np.zeros((3, height, width), np.float32)
    size = height * width
    flat = np.concatenate(flats)
    wv = np.concatenate(weights)
    cols = np.concatenate(colors)
    alpha = np.bincount(flat, weights=wv, minlength=size).astype(np.float32).reshape(height, width)
    color = np.stack(
        [np.bincount(flat, weights=wv * cols[:, ch], minlength=size).astype(np.float32) for ch in range(3)]
    ).reshape(3, height, width)
    return alpha, color
