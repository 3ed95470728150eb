"""A synthetic cohort of slides as bags of tile embeddings, with planted slide labels: :func:`synthetic_mil_cohort`.

Each slide is a square grid of tiles on a disc of tissue. Its tissue is a mosaic of ``n_states`` cell states
(Voronoi regions around 16 random seeds, with slide-specific proportions); a tile's embedding is its state's
centroid plus tile noise, plus one offset shared by every tile of the slide (staining / scanner variation).
Two labels are planted:

``localised``
    Positive slides hold one small patch (a disc of ``patch_share`` of the tissue, 5 % by default) of an extra
    state that appears nowhere else. Its tiles are easy to tell from their neighbours, but they move the slide's
    mean embedding by much less than the slide offsets do: a needle that mean pooling cannot find.
``global``
    Positive slides have a larger share of state 0 (``global_shift`` more of the tissue): a shift in the
    proportions of states, visible in the mean embedding.

Files are written in HEST's embedding-file layout (:func:`hopt_st.io.write_embeddings`); the planted tiles
of each slide are in ``<out_dir>/planted.npz`` (:func:`planted_tiles`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .._atomic import atomic_path, atomic_write_bytes

logger = logging.getLogger(__name__)

#: provenance recorded in the synthetic bags' files
SYNTHETIC_PROVENANCE = {"model": "synthetic", "weights_sha256": "none", "mpp": 0.5, "patch_size": 224}


def synthetic_mil_cohort(
    out_dir: str | os.PathLike,
    *,
    n_slides: int = 80,
    n_patients: int | None = None,
    grid: int = 14,
    dim: int = 32,
    n_states: int = 4,
    patch_share: float = 0.05,
    global_shift: float = 0.5,
    tile_noise: float = 1.0,
    slide_offset: float = 0.6,
    centroid_scale: float = 2.0,
    seed: int = 0,
    model: str = "synthetic",
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write a synthetic cohort of bags (one embedding file per slide) and its label table.

    Parameters
    ----------
    out_dir
        Files go to ``<out_dir>/<model>/<sample_id>.h5`` (as :func:`hopt_st.pp.embed_cohort` writes them) and
        the labels to ``<out_dir>/labels.csv``.
    n_slides
        Number of slides (half positive for each label, assigned independently).
    n_patients
        Number of patients (slides are dealt to patients in turn); default one patient per two slides.
    grid
        Tiles per side of the square grid (tissue is the inscribed disc).
    dim
        Embedding size.
    n_states
        Cell states of the background tissue.
    patch_share
        Share of the tissue covered by the planted patch of a ``localised``-positive slide.
    global_shift
        Extra share of state 0 in ``global``-positive slides.
    tile_noise
        Standard deviation of each tile's noise (per dimension).
    slide_offset
        Standard deviation of the per-slide offset added to every tile (per dimension).
    centroid_scale
        Standard deviation of the states' centroids (per dimension).
    seed
        Seed of everything.
    model
        The model name the files record (their folder name).
    overwrite
        Replace existing files.

    Returns
    -------
    pandas.DataFrame
        The label table: ``sample_id``, ``patient``, ``localised`` (0/1), ``global`` (0/1), ``subtype``
        (three classes: ``A`` = neither, ``B`` = localised, ``C`` = global, with ``localised`` winning ties),
        ``n_tiles``, ``patch_tiles``; ``attrs["labels_path"]``, ``attrs["folder"]``.
    """
    from ..io._cohort import model_dirname
    from ..io._embeddings import write_embeddings

    if n_slides < 4 or grid < 4 or dim < 2 or n_states < 2:
        raise ValueError("need n_slides >= 4, grid >= 4, dim >= 2 and n_states >= 2.")
    if not 0 < patch_share < 0.5:
        raise ValueError(f"patch_share = {patch_share!r} must lie in (0, 0.5).")
    rng = np.random.default_rng(seed)
    n_patients = max(2, n_slides // 2) if n_patients is None else int(n_patients)
    folder = Path(out_dir) / model_dirname(model)
    folder.mkdir(parents=True, exist_ok=True)
    centroids = rng.normal(0.0, centroid_scale, size=(n_states + 1, dim))  # the last: the planted state
    rows_, cols_ = np.mgrid[0:grid, 0:grid]
    centre = (grid - 1) / 2
    on = (rows_ - centre) ** 2 + (cols_ - centre) ** 2 <= (grid / 2) ** 2
    rr, cc = rows_[on], cols_[on]
    n_tiles = len(rr)
    n_patch = max(1, int(np.floor(patch_share * n_tiles)))
    local = rng.permutation(np.arange(n_slides) % 2)
    glob = rng.permutation(np.arange(n_slides) % 2)
    tile_um = 112.0
    records, truth = [], {}
    for s in range(n_slides):
        sid = f"slide{s:03d}"
        # background states: Voronoi regions of 8 seeds whose states follow slide-specific proportions
        props = rng.dirichlet(np.full(n_states, 8.0))
        if glob[s]:
            props = props * (1 - global_shift)
            props[0] += global_shift
        seeds = rng.uniform(0, grid, size=(16, 2))
        seed_state = rng.choice(n_states, size=16, p=props)
        d = (rr[:, None] - seeds[None, :, 0]) ** 2 + (cc[:, None] - seeds[None, :, 1]) ** 2
        state = seed_state[np.argmin(d, axis=1)]
        planted = np.zeros(n_tiles, dtype=bool)
        if local[s]:
            k = rng.integers(n_tiles)
            dist = (rr - rr[k]) ** 2 + (cc - cc[k]) ** 2
            planted[np.argsort(dist, kind="stable")[:n_patch]] = True
            state = np.where(planted, n_states, state)
        offset = rng.normal(0.0, slide_offset, size=dim)
        emb = centroids[state] + offset + rng.normal(0.0, tile_noise, size=(n_tiles, dim))
        coords = np.column_stack([cc, rr]) * tile_um / SYNTHETIC_PROVENANCE["mpp"]
        path = folder / f"{sid}.h5"
        write_embeddings(
            path,
            emb.astype(np.float32),
            [f"tile_{r}_{c}" for r, c in zip(rr, cc)],
            coords=coords.astype(np.int64),
            centers=coords + tile_um / SYNTHETIC_PROVENANCE["mpp"] / 2,
            provenance={**SYNTHETIC_PROVENANCE, "model": model, "sample_id": sid},
            overwrite=overwrite,
        )
        truth[sid] = planted
        records.append(
            {
                "sample_id": sid,
                "patient": f"patient{s % n_patients:03d}",
                "localised": int(local[s]),
                "global": int(glob[s]),
                "subtype": "B" if local[s] else "C" if glob[s] else "A",
                "n_tiles": n_tiles,
                "patch_tiles": int(planted.sum()),
            }
        )
    labels = pd.DataFrame(records)
    truth_path = Path(out_dir) / "planted.npz"
    with atomic_path(truth_path, overwrite=overwrite, what="planted-tile file") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **truth)
    labels_path = Path(out_dir) / "labels.csv"
    atomic_write_bytes(
        labels_path, labels.to_csv(index=False).encode(), overwrite=overwrite, what="label table"
    )
    labels.attrs.update(labels_path=str(labels_path), folder=str(folder), planted_path=str(truth_path))
    logger.info("synthetic_mil_cohort: %d slides x %d tiles x %d dims in %s", n_slides, n_tiles, dim, folder)
    return labels


def planted_tiles(out_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The planted-patch masks of a synthetic cohort: ``{sample_id: bool per tile, in file order}``."""
    with np.load(Path(out_dir) / "planted.npz") as f:
        return {k: np.asarray(f[k], dtype=bool) for k in f.files}
