"""A synthetic Visium HD sample with truth below the spot, and a writer of Space Ranger's Visium HD layout.

The tissue is a mosaic of cells (a jittered lattice of seeds, each pixel belonging to its nearest seed, so
cells are 10-30 µm polygons). Each cell has one latent state, drawn from a smooth slide-scale field of state
probabilities: a 55 µm spot averages a dozen cells and sees the smooth field, a 2-16 µm bin sees one or two
cells. The state sets the cell's look (stroma colour, nucleus size and colour, texture; the looks of
:func:`hopt_st.datasets.synthetic_visium`) and its gene programme. Counts are Poisson draws per 2 µm bin from
the state fractions of the bin (sampled on a 4 x 4 sub-grid).

Ground truth, kept in the returned object: ``tables["square_002um"].obsm["latent_truth"]`` (state fractions
per 2 µm bin), ``varm["truth_loadings"]`` / ``var["truth_log_base"]`` (the gene model, as in
:func:`~hopt_st.datasets.synthetic_visium`), ``attrs["hopt_st"]["synthetic_cells"]`` (seed positions in µm
and states). :func:`bin_truth` gives the noise-free expected log expression at any bin size.

:func:`write_visium_hd_outs` writes the files ``spatialdata_io.visium_hd`` reads (checked against
spatialdata-io 0.7.1, ``spatialdata_io/readers/visium_hd.py`` and ``_constants/_constants.py``
``VisiumHDKeys``): ``feature_slice.h5`` (its ``metadata_json`` attribute with ``hd_layout_json``
``file_format`` "1.0"), ``spatial/`` (scalefactors, hires/lowres PNG), ``microscope_image/`` (the
full-resolution H&E) and ``binned_outputs/square_NNNum/{filtered_feature_bc_matrix.h5,
spatial/tissue_positions.parquet, spatial/scalefactors_json.json}``; the scalefactors of a bin hold
``bin_size_um``, ``microns_per_pixel`` and ``spot_diameter_fullres = bin_size_um / microns_per_pixel``
(the reader checks that identity).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree
from spatialdata import SpatialData
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, Scale

from .._atomic import atomic_dir, check_overwrite
from .._constants import MICROMETERS_CS, UNS_KEY
from ._synthetic import _LatentField, _tissue_model, expected_counts, look_arrays

logger = logging.getLogger(__name__)

#: Space Ranger's smallest Visium HD bin, µm
HD_BIN_UM = 2
_SUB = 4  # sub-grid per 2 µm bin for the state fractions


def _barcode(bin_um: int, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Space Ranger's bin barcodes: ``s_008um_00012_00034-1`` (row, then column)."""
    return np.array([f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(row, col)], dtype=object)


class _Cells:
    """Seeds of the cell mosaic (µm) and their states."""

    def __init__(self, width_um, height_um, cell_um, n_states, mixing, rng):
        nx, ny = int(np.ceil(width_um / cell_um)) + 1, int(np.ceil(height_um / cell_um)) + 1
        gx, gy = np.meshgrid((np.arange(nx) + 0.5) * cell_um, (np.arange(ny) + 0.5) * cell_um)
        xy = np.column_stack([gx.ravel(), gy.ravel()])
        self.xy = xy + rng.uniform(-0.4, 0.4, xy.shape) * cell_um
        field = _LatentField(n_states, width_um, height_um, rng)
        p = field.fractions(self.xy[:, 0], self.xy[:, 1]) ** mixing  # softened: cells of a region mix
        p /= p.sum(1, keepdims=True)
        u = rng.uniform(size=(len(p), 1))
        self.state = np.minimum((u > np.cumsum(p, 1)).sum(1), n_states - 1)
        self.n_states = n_states
        self._tree = cKDTree(self.xy)

    def nearest(self, x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index of the cell at each point and the distance to its seed (µm)."""
        d, i = self._tree.query(np.column_stack([np.ravel(x_um), np.ravel(y_um)]))
        return i.reshape(np.shape(x_um)), d.reshape(np.shape(x_um))


def _render(cells: _Cells, looks: dict, width: int, height: int, mpp: float, rng) -> np.ndarray:
    """(3, height, width) uint8: each pixel takes its cell's stroma colour, or nucleus colour near the seed."""
    out = np.empty((3, height, width), dtype=np.uint8)
    xs = (np.arange(width) + 0.5) * mpp
    band = max(1, (1 << 20) // width)
    for y0 in range(0, height, band):
        ys = (np.arange(y0, min(height, y0 + band)) + 0.5) * mpp
        gx, gy = np.meshgrid(xs, ys)
        idx, dist = cells.nearest(gx, gy)
        k = cells.state[idx]
        rgb = looks["stroma_rgb"][k].copy()
        nuc = dist < looks["radius"][k]
        rgb[nuc] = looks["nucleus_rgb"][k[nuc]]
        rgb += rng.normal(0.0, 1.0, gx.shape)[..., None] * looks["texture"][k][..., None] * 0.5
        out[:, y0 : y0 + len(ys)] = np.clip(rgb, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return out


def synthetic_visium_hd(
    width_um: float = 640.0,
    height_um: float = 480.0,
    image_mpp: float = 0.5,
    seed: int = 0,
    n_genes: int = 30,
    n_states: int = 4,
    *,
    cell_um: float = 16.0,
    mixing: float = 0.3,
    counts_per_bin: float = 20.0,
    model_seed: int = 0,
) -> SpatialData:
    """A synthetic Visium HD sample whose expression varies at cell scale, with the truth kept.

    Parameters
    ----------
    width_um, height_um
        Size of the capture area, µm (multiples of 16 µm are kept whole at 2, 8 and 16 µm bins).
    image_mpp
        µm per pixel of the H&E.
    seed
        Seed of the cells, their states, the image noise and the counts.
    n_genes, n_states
        Genes and latent states (gene model of :func:`hopt_st.datasets.synthetic_visium`, ``model_seed``).
    cell_um
        Spacing of the cell seeds, µm (cells are about this wide; 10-30 µm with the jitter).
    mixing
        Exponent applied to the slide-scale state probabilities before each cell draws its state
        (1: as the field; smaller: cells of different states mix more within a spot).
    counts_per_bin
        Library size per 2 µm bin (the expected total is of this order: the gene model divides by one
        constant per slide, as in :func:`~hopt_st.datasets.synthetic_visium`).
    model_seed
        Seed of the tissue model (state looks and gene programmes).

    Returns
    -------
    SpatialData
        Image ``"he"`` (in ``"global"`` = its pixels, and ``"micrometers"``); table ``"square_002um"`` (raw
        counts per 2 µm bin, ``obs`` ``array_row``/``array_col``, ``obsm["spatial"]`` bin centres in px,
        ``obsm["latent_truth"]``, ``varm["truth_loadings"]``, ``var["truth_log_base"]``,
        ``var["state_dependent"]``, ``uns["hopt_st"]`` with ``image_mpp``); ``attrs["hopt_st"]`` holding
        ``synthetic_cells`` (``xy_um``, ``state``) and the generation parameters. Write it in Space Ranger's
        layout with :func:`write_visium_hd_outs`.
    """
    for name, v in (("width_um", width_um), ("height_um", height_um), ("cell_um", cell_um)):
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"{name} = {v!r} must be a positive number of µm.")
    if width_um < 4 * cell_um or height_um < 4 * cell_um:
        raise ValueError(f"the area ({width_um} x {height_um} µm) must span at least 4 cells ({cell_um} µm).")
    if not 0.05 <= float(image_mpp) <= 5:
        raise ValueError(f"image_mpp = {image_mpp!r} µm/px is not plausible (e.g. 0.25 or 0.5).")
    if n_states < 2 or n_genes < 1:
        raise ValueError(f"need n_states >= 2 and n_genes >= 1 (got {n_states}, {n_genes}).")
    rng = np.random.default_rng(seed)
    model = _tissue_model(n_states, n_genes, None, model_seed)
    cells = _Cells(width_um, height_um, cell_um, n_states, mixing, rng)
    mpp = float(image_mpp)
    width, height = int(np.ceil(width_um / mpp)), int(np.ceil(height_um / mpp))
    image = _render(cells, look_arrays(model), width, height, mpp, rng)

    n_col, n_row = int(width_um // HD_BIN_UM), int(height_um // HD_BIN_UM)
    row, col = np.divmod(np.arange(n_row * n_col), n_col)
    frac = np.zeros((len(row), n_states), dtype=np.float32)
    offs = (np.arange(_SUB) + 0.5) / _SUB * HD_BIN_UM
    for oy in offs:
        for ox in offs:
            idx, _ = cells.nearest(col * HD_BIN_UM + ox, row * HD_BIN_UM + oy)
            frac[np.arange(len(row)), cells.state[idx]] += 1.0 / _SUB**2
    lib = counts_per_bin * rng.lognormal(0.0, 0.15, len(row))
    counts = rng.poisson(expected_counts(model, frac.astype(np.float64), lib)).astype(np.float32)
    centres_px = np.column_stack([(col + 0.5) * HD_BIN_UM, (row + 0.5) * HD_BIN_UM]) / mpp
    table = AnnData(
        X=sparse.csr_matrix(counts),
        obs=pd.DataFrame(
            {"in_tissue": 1, "array_row": row, "array_col": col}, index=pd.Index(_barcode(2, row, col))
        ),
        var=pd.DataFrame(
            {"state_dependent": model["state_dependent"], "truth_log_base": model["log_base"]},
            index=pd.Index(model["gene_names"]),
        ),
    )
    table.obsm["spatial"] = centres_px
    table.obsm["latent_truth"] = frac
    table.varm["truth_loadings"] = model["loadings"].astype(np.float32)
    table.uns[UNS_KEY] = {"image_mpp": {"he": mpp}, "fullres_mpp": mpp, "bin_size_um": HD_BIN_UM}
    he = Image2DModel.parse(
        image,
        dims=["c", "y", "x"],
        c_coords=["r", "g", "b"],
        chunks=(3, 1024, 1024),
        transformations={"global": Identity(), MICROMETERS_CS: Scale([mpp, mpp], axes=("x", "y"))},
    )
    sdata = SpatialData(images={"he": he}, tables={"square_002um": table})
    sdata.attrs[UNS_KEY] = {
        "image_mpp": {"he": mpp},
        "synthetic_cells": {"xy_um": cells.xy, "state": cells.state},
        "synthetic": {
            "seed": int(seed),
            "model_seed": int(model_seed),
            "n_states": int(n_states),
            "cell_um": float(cell_um),
            "mixing": float(mixing),
            "counts_per_bin": float(counts_per_bin),
            "width_um": float(width_um),
            "height_um": float(height_um),
        },
    }
    logger.info(
        "synthetic_visium_hd: %d 2 µm bins, %d cells, image %d x %d px",
        len(row),
        len(cells.xy),
        width,
        height,
    )
    return sdata


def pool_bins(table: AnnData, bin_um: int) -> tuple[AnnData, np.ndarray]:
    """Sum a 2 µm bin table into ``bin_um`` squares of the same grid (Space Ranger's nesting: an 8 µm bin is
    4 x 4 bins of 2 µm); returns the pooled counts (barcodes ``s_NNNum_row_col-1``) and each 2 µm bin's row
    in it. State fractions in ``obsm["latent_truth"]`` are averaged."""
    if bin_um % HD_BIN_UM:
        raise ValueError(f"bin_um = {bin_um!r} must be a multiple of {HD_BIN_UM} µm.")
    f = bin_um // HD_BIN_UM
    r = table.obs["array_row"].to_numpy() // f
    c = table.obs["array_col"].to_numpy() // f
    key = r * (int(c.max()) + 1) + c
    uniq, inv = np.unique(key, return_inverse=True)
    agg = sparse.csr_matrix((np.ones(len(inv)), (inv, np.arange(len(inv)))), shape=(len(uniq), len(inv)))
    n_c = int(c.max()) + 1
    rows, cols = uniq // n_c, uniq % n_c
    pooled = AnnData(
        X=sparse.csr_matrix(agg @ table.X),
        obs=pd.DataFrame(
            {"in_tissue": 1, "array_row": rows, "array_col": cols},
            index=pd.Index(_barcode(bin_um, rows, cols)),
        ),
        var=table.var.copy(),
    )
    n = np.asarray(agg.sum(1)).ravel()[:, None]
    if "latent_truth" in table.obsm:
        pooled.obsm["latent_truth"] = np.asarray(agg @ table.obsm["latent_truth"]) / n
    return pooled, inv


def bin_truth(sdata: SpatialData, bin_um: int, *, table_name: str = "square_002um") -> pd.DataFrame:
    """Noise-free expected ``log1p`` counts per gene at ``bin_um`` bins of a :func:`synthetic_visium_hd`
    sample (mean library size), indexed by Space Ranger's barcodes of that bin size."""
    table = sdata.tables[table_name]
    pooled, _ = pool_bins(table, bin_um)
    model = {
        "log_base": table.var["truth_log_base"].to_numpy(),
        "loadings": np.asarray(table.varm["truth_loadings"], dtype=np.float64),
    }
    lib = sdata.attrs[UNS_KEY]["synthetic"]["counts_per_bin"] * (bin_um // HD_BIN_UM) ** 2
    mu = expected_counts(model, np.asarray(pooled.obsm["latent_truth"], dtype=np.float64), lib)
    return pd.DataFrame(np.log1p(mu), index=pooled.obs_names, columns=table.var_names)


def _feature_slice(path: Path) -> None:
    import h5py

    eye = np.eye(3).ravel().tolist()
    meta = {
        "hd_layout_json": json.dumps({"file_format": "1.0", "transform": eye}),
        "transform_matrices": {
            k: eye
            for k in (
                "cytassist_colrow_to_spot_colrow",
                "spot_colrow_to_cytassist_colrow",
                "microscope_colrow_to_spot_colrow",
                "spot_colrow_to_microscope_colrow",
            )
        },
    }
    with h5py.File(path, "w") as f:
        f.attrs["metadata_json"] = json.dumps(meta)


def write_visium_hd_outs(
    sdata: SpatialData,
    path: str | Path,
    *,
    bin_sizes: tuple[int, ...] = (2, 8, 16),
    table_name: str = "square_002um",
    image_key: str = "he",
    hires_size: int = 2000,
    lowres_size: int = 600,
    segmentation: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a :func:`synthetic_visium_hd` sample as a Space Ranger Visium HD ``outs/`` folder.

    Files (what ``spatialdata_io.visium_hd`` reads): ``feature_slice.h5``; ``spatial/scalefactors_json.json``,
    ``spatial/tissue_hires_image.png``, ``spatial/tissue_lowres_image.png``; ``microscope_image/he.tif`` (the
    full-resolution H&E, which Space Ranger takes as input); for each bin size ``binned_outputs/square_NNNum/``
    with ``filtered_feature_bc_matrix.h5`` (10x HDF5), ``spatial/tissue_positions.parquet`` (``barcode,
    in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres``) and
    ``spatial/scalefactors_json.json`` (plus ``bin_size_um``, ``microns_per_pixel``). Bins of 8 or 16 µm sum
    the 2 µm counts of the squares they cover. The folder appears complete or not at all.

    Parameters
    ----------
    sdata
        From :func:`synthetic_visium_hd`.
    path
        The ``outs/`` folder to create (its parent must exist).
    bin_sizes
        Bin sizes to write, µm (multiples of 2).
    table_name, image_key
        The 2 µm table and the H&E.
    hires_size, lowres_size
        Largest side of the hires / lowres PNGs, px.
    segmentation
        Also write Space Ranger 4's ``segmented_outputs/`` (``filtered_feature_cell_matrix.h5`` with barcodes
        ``cellid_000000001-1``, ``cell_segmentations.geojson`` with ``properties.cell_id`` and polygons in
        full-resolution px, ``spatial/scalefactors_json.json``): the sample's cells
        (:func:`hopt_st.datasets._xenium.xenium_cells`), each summing the 2 µm bins whose centre it holds.
    overwrite
        Replace an existing ``path`` (only once the new folder is complete); otherwise it is refused.

    Returns
    -------
    Path
        ``path``.
    """
    import tifffile

    from ._spaceranger import _write_counts_h5, _write_png

    path = check_overwrite(
        path, overwrite, "Visium HD outs/ folder"
    )  # before any work; atomic_dir replaces it whole
    table = sdata.tables[table_name]
    mpp = float(table.uns[UNS_KEY]["fullres_mpp"])
    image = sdata.images[image_key]
    with atomic_dir(path) as tmp:
        (tmp / "spatial").mkdir(parents=True)
        (tmp / "microscope_image").mkdir()
        _feature_slice(tmp / "feature_slice.h5")
        side = max(int(image.sizes["y"]), int(image.sizes["x"]))
        hires = _write_png([image], min(hires_size, side), tmp / "spatial" / "tissue_hires_image.png")
        lowres = _write_png([image], min(lowres_size, side), tmp / "spatial" / "tissue_lowres_image.png")
        tifffile.imwrite(
            tmp / "microscope_image" / "he.tif",
            np.asarray(image.transpose("y", "x", "c").data),
            photometric="rgb",
        )
        for b in bin_sizes:
            pooled = table if b == HD_BIN_UM else pool_bins(table, b)[0]
            d = tmp / "binned_outputs" / f"square_{b:03d}um"
            (d / "spatial").mkdir(parents=True)
            _write_counts_h5(pooled, d / "filtered_feature_bc_matrix.h5")
            r, c = pooled.obs["array_row"].to_numpy(), pooled.obs["array_col"].to_numpy()
            pd.DataFrame(
                {
                    "barcode": pooled.obs_names.to_numpy(),
                    "in_tissue": np.ones(len(r), dtype=np.int32),
                    "array_row": r.astype(np.int32),
                    "array_col": c.astype(np.int32),
                    "pxl_row_in_fullres": (r + 0.5) * b / mpp,
                    "pxl_col_in_fullres": (c + 0.5) * b / mpp,
                }
            ).to_parquet(d / "spatial" / "tissue_positions.parquet", index=False)
            sf = {
                "spot_diameter_fullres": b / mpp,
                "bin_size_um": float(b),
                "microns_per_pixel": mpp,
                "tissue_hires_scalef": hires,
                "tissue_lowres_scalef": lowres,
                "fiducial_diameter_fullres": 1.615 * 65.0 / mpp,
                "regist_target_img_scalef": hires,
            }
            (d / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf, indent=2))
            if b == HD_BIN_UM:
                (tmp / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf, indent=2))
                if segmentation:
                    _write_segmentation(sdata, table, tmp / "segmented_outputs", mpp, sf)
    logger.info("wrote a Visium HD outs/ folder %s (bins %s µm)", path, list(bin_sizes))
    return path


def _write_segmentation(sdata: SpatialData, table: AnnData, folder: Path, mpp: float, sf: dict) -> None:
    """Space Ranger 4's ``segmented_outputs/``: the cells, their polygons and their counts (2 µm bins by centre)."""
    from ._spaceranger import _write_counts_h5
    from ._xenium import xenium_cells

    cells = xenium_cells(sdata)
    seeds = np.asarray(sdata.attrs[UNS_KEY]["synthetic_cells"]["xy_um"])
    seed_of_cell = np.array([int(c[len("cell") :]) for c in cells.index])
    row_of_seed = np.full(len(seeds), -1)
    row_of_seed[seed_of_cell] = np.arange(len(cells))
    _, nearest = cKDTree(seeds).query(np.asarray(table.obsm["spatial"]) * mpp)
    rows = row_of_seed[nearest]
    ok = rows >= 0
    pool = sparse.csr_matrix(
        (np.ones(int(ok.sum())), (rows[ok], np.flatnonzero(ok))), shape=(len(cells), table.n_obs)
    )
    ids = np.arange(1, len(cells) + 1)
    counts = AnnData(X=sparse.csr_matrix(pool @ table.X), var=table.var[[]].copy())
    counts.obs_names = [f"cellid_{i:09d}-1" for i in ids]
    (folder / "spatial").mkdir(parents=True)
    _write_counts_h5(counts, folder / "filtered_feature_cell_matrix.h5")
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [(np.asarray(p.exterior.coords) / mpp).tolist()]},
            "properties": {"cell_id": int(i)},
        }
        for i, p in zip(ids, cells["polygon"])
    ]
    (folder / "cell_segmentations.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": features})
    )
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf, indent=2))
