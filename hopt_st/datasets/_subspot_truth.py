"""The sub-spot truth test: on a :func:`synthetic_visium_hd` sample, how well do token-map features predict the
true expression of 8 / 16 µm bins, against (a) the 55 µm spot model upsampled to the bins and (b) one 224 px
patch centred on each bin, with a shuffled control.

Train on the left half of the capture area, score on the right half: the mean over state-dependent genes of
the Pearson correlation between the prediction and the noise-free truth (:func:`bin_truth`, expected
``log1p`` counts). Everything goes through the public path: the sample is written in Space Ranger's Visium HD
layout, read by :func:`hopt_st.io.read_visium_hd` (spatialdata-io), embedded by
:func:`hopt_st.pp.embed_tokens` / :func:`hopt_st.pp.embed`, fit by :func:`hopt_st.tl.fit_expression`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import Identity

from .._constants import UNS_KEY, VISIUM_SPOT_DIAMETER_UM, VISIUM_SPOT_DISTANCE_UM
from ..io._coords import add_micrometers, centers_um

logger = logging.getLogger(__name__)


def _mean_pearson(pred: np.ndarray, truth: np.ndarray) -> float:
    p = pred - pred.mean(0)
    t = truth - truth.mean(0)
    den = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    r = np.where(den > 0, (p * t).sum(0) / np.where(den > 0, den, 1), 0.0)
    return float(r.mean())


def _spots(sample: SpatialData, sd: SpatialData, image_key: str) -> SpatialData:
    """Visium-like 55 µm spots on a 100 µm hexagonal grid, counts summed from the 2 µm bins under each."""
    from scipy.spatial import cKDTree

    t2 = sample.tables["square_002um"]
    syn = sample.attrs[UNS_KEY]["synthetic"]
    mpp = float(t2.uns[UNS_KEY]["fullres_mpp"])
    r = VISIUM_SPOT_DIAMETER_UM / 2
    dy = VISIUM_SPOT_DISTANCE_UM * np.sqrt(3) / 2
    pts = []
    for i, y in enumerate(np.arange(r, syn["height_um"] - r + 1e-9, dy)):
        x0 = r + (VISIUM_SPOT_DISTANCE_UM / 2 if i % 2 else 0.0)
        pts += [(x, y) for x in np.arange(x0, syn["width_um"] - r + 1e-9, VISIUM_SPOT_DISTANCE_UM)]
    xy_um = np.array(pts)
    bins_um = np.asarray(t2.obsm["spatial"]) * mpp
    members = cKDTree(bins_um).query_ball_point(xy_um, r)
    rows = np.concatenate([np.full(len(m), i) for i, m in enumerate(members)])
    cols = np.concatenate(members)
    agg = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(xy_um), t2.n_obs))
    table = AnnData(X=sparse.csr_matrix(agg @ t2.X), var=pd.DataFrame(index=t2.var_names.copy()))
    table.obs_names = [f"spot{i}" for i in range(len(xy_um))]
    table.obs["region"] = pd.Categorical(["spots"] * len(xy_um))
    table.obs["spot_id"] = np.arange(len(xy_um))
    table.uns[UNS_KEY] = {"image_mpp": {image_key: mpp}, "fullres_mpp": mpp}
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    shapes = ShapesModel.parse(
        xy_um / mpp, geometry=0, radius=np.full(len(xy_um), r / mpp), transformations={"global": Identity()}
    )
    image = sd.images[image_key]
    out = SpatialData(images={image_key: image}, shapes={"spots": shapes}, tables={"table": table})
    add_micrometers(out, "spots", mpp)
    return out


def subspot_truth_test(
    width_um: float = 480.0,
    height_um: float = 384.0,
    *,
    seed: int = 0,
    n_genes: int = 24,
    bin_sizes: tuple[int, ...] = (8, 16),
    cells: bool = True,
    model="handcrafted",
    n_eval: int | None = 600,
    n_shuffles: int = 8,
    patch_train: int | None = 600,
    workdir: str | Path | None = None,
) -> pd.DataFrame:
    """Run the sub-spot truth test; returns one row per bin size with the mean per-gene Pearson of the token
    map, the two baselines and the shuffled control, and the forwards / seconds each feature set cost.

    Parameters
    ----------
    width_um, height_um
        Size of the synthetic capture area.
    seed
        Seed of the sample.
    n_genes
        Genes (70% state-dependent; the score averages those).
    bin_sizes
        Bin sizes scored, µm.
    cells
        Also score cells: the sample's cells written as a Xenium folder (:func:`write_xenium_outs`), read with
        :func:`hopt_st.io.read_xenium`, the post-Xenium H&E embedded with the bins' projection; truth
        :func:`cell_truth`.
    model
        Encoder of the token map and of both baselines (``"handcrafted"``: weight-free per-14 px statistics).
    n_eval
        Test bins scored per bin size (a random subset of the right half; ``None``: all), the same for every
        method.
    n_shuffles
        Permutations of the shuffled-label control (its score is their mean).
    patch_train
        Training bins of baseline (b), which costs one forward per bin (a random subset of the left half;
        ``None``: all; ``0``: skip it). The token map and the spot model train on the whole left half.
    workdir
        Folder for the Visium HD ``outs/`` (default a temporary folder, removed afterwards).
    """
    from .. import io
    from ._visium_hd import synthetic_visium_hd, write_visium_hd_outs
    from ._xenium import write_xenium_outs

    sample = synthetic_visium_hd(width_um, height_um, seed=seed, n_genes=n_genes)
    genes = list(
        sample.tables["square_002um"].var_names[sample.tables["square_002um"].var["state_dependent"]]
    )
    with tempfile.TemporaryDirectory() as tmp:
        outs = write_visium_hd_outs(sample, Path(workdir or tmp) / "outs", bin_sizes=tuple(bin_sizes))
        xenium = None
        if cells:
            xenium = io.read_xenium(write_xenium_outs(sample, Path(workdir or tmp) / "xenium"))
        return _run(
            sample,
            io.read_visium_hd(outs),
            xenium,
            genes,
            bin_sizes,
            model,
            n_eval,
            n_shuffles,
            patch_train,
            width_um,
        )


def _run(
    sample, sd, xenium, genes, bin_sizes, model, n_eval, n_shuffles, patch_train, width_um
) -> pd.DataFrame:
    from .. import pp, tl
    from ._visium_hd import bin_truth

    image_key = next(k for k in sd.images if k.endswith("_full_image"))
    t0 = time.perf_counter()
    pp.embed_tokens(sd, model, image_key=image_key, key_added="tokens", progress=False)
    t_tokens = time.perf_counter() - t0
    n_tiles = sd.attrs[UNS_KEY]["token_maps"]["tokens"]["n_tiles"]

    spots = _spots(sample, sd, image_key)
    pp.embed(spots, model, key_added="X_spot", progress=False)
    st = spots.tables["table"]
    sxy = np.asarray(st.obsm["spatial"]) if "spatial" in st.obsm else None
    sxy = centers_um(spots, "table")[1] if sxy is None else sxy * float(st.uns[UNS_KEY]["fullres_mpp"])
    half = float(width_um) / 2
    reg_spot = tl.fit_expression(st[sxy[:, 0] < half], use_rep="X_spot", genes=genes)
    spot_pred = np.asarray(reg_spot.predict(np.asarray(st.obsm["X_spot"])))

    rows = []
    rng = np.random.default_rng(0)
    run = dict(
        genes=genes, model=model, n_eval=n_eval, n_shuffles=n_shuffles, patch_train=patch_train, rng=rng
    )
    spot = (sxy, spot_pred, half)
    for b in bin_sizes:
        name = f"square_{b:03d}um"
        truth = bin_truth(sample, b)
        row = _score(sd, name, image_key, centers_um(sd, name)[1], truth, spot, **run)
        rows.append({"level": f"{b} µm bins", **row, "token_forwards": n_tiles, "token_s": t_tokens})
    if xenium is not None:
        from ._xenium import cell_truth

        xkey = "he_image"
        t0 = time.perf_counter()
        proj = sd.attrs[UNS_KEY]["token_maps"]["tokens"]["projection"]
        pp.embed_tokens(xenium, model, image_key=xkey, key_added="tokens", projection=proj, progress=False)
        t_cells = time.perf_counter() - t0
        xy = np.asarray(xenium.tables["table"].obsm["spatial"])  # cell centroids, µm
        row = _score(xenium, "table", xkey, xy, cell_truth(sample), spot, **run)
        n_cell_tiles = xenium.attrs[UNS_KEY]["token_maps"]["tokens"]["n_tiles"]
        rows.append({"level": "cells", **row, "token_forwards": n_cell_tiles, "token_s": t_cells})
    cols = ["level", "token_map", "spot_upsampled", "patch_per_bin", "shuffled_labels", "shuffled_bins"]
    cols += [
        "n_train",
        "n_test",
        "patch_n_train",
        "token_forwards",
        "token_s",
        "patch_forwards",
        "patch_s_per_1000",
    ]
    return pd.DataFrame(rows)[[c for c in cols if c in rows[0]]]


def _score(
    sd, name, image_key, xy, truth_df, spot, *, genes, model, n_eval, n_shuffles, patch_train, rng
) -> dict:
    """Token map, spot model upsampled, one patch per footprint and the shuffled controls on one table."""
    from scipy.interpolate import LinearNDInterpolator, NearestNDInterpolator

    from .. import pp, tl

    sxy, spot_pred, half = spot
    table = sd.tables[name]
    train_all = np.flatnonzero(xy[:, 0] < half)
    test = np.flatnonzero(xy[:, 0] >= half)
    if n_eval is not None and len(test) > n_eval:
        test = np.sort(rng.choice(test, n_eval, replace=False))
    truth = truth_df.loc[table.obs_names, genes].to_numpy()[test]
    pp.token_features(sd, "tokens", table_name=name, key_added="X_tok")
    X = np.asarray(table.obsm["X_tok"])
    reg = tl.fit_expression(table[train_all], use_rep="X_tok", genes=genes)
    r_tok = _mean_pearson(reg.predict(X[test]), truth)
    # controls: (1) the model refit on labels shuffled across training bins (mean over permutations: a
    # single one swings either way, since any direction of informative features correlates with the truth);
    # (2) the token model's predictions scored against the truth of other test bins
    shuffled = table[train_all].copy()
    r_perm = []
    for _ in range(n_shuffles):
        shuffled.X = table[train_all].X[rng.permutation(shuffled.n_obs)]
        pred = tl.fit_expression(shuffled, use_rep="X_tok", genes=genes).predict(X[test])
        r_perm.append(_mean_pearson(pred, truth))
    r_bins = _mean_pearson(reg.predict(X[test])[rng.permutation(len(test))], truth)
    lin = LinearNDInterpolator(sxy, spot_pred)(xy[test])
    near = NearestNDInterpolator(sxy, spot_pred)(xy[test])
    row = {
        "n_train": len(train_all),
        "n_test": len(test),
        "token_map": r_tok,
        "spot_upsampled": _mean_pearson(np.where(np.isnan(lin), near, lin), truth),
        "shuffled_labels": float(np.mean(r_perm)),
        "shuffled_bins": r_bins,
    }
    if patch_train:
        train_p = train_all
        if len(train_p) > patch_train:
            train_p = np.sort(rng.choice(train_all, patch_train, replace=False))
        rows_p = np.concatenate([train_p, test])
        shapes_key = table.uns["spatialdata_attrs"]["region"]
        sub = SpatialData(
            images={image_key: sd.images[image_key]},
            shapes={shapes_key: sd.shapes[shapes_key]},
            tables={"bins": table[rows_p].copy()},
        )
        t0 = time.perf_counter()
        pp.embed(sub, model, table_name="bins", image_key=image_key, key_added="X_patch", progress=False)
        row["patch_s_per_1000"] = (time.perf_counter() - t0) / len(rows_p) * 1000
        row["patch_forwards"] = table.n_obs  # one per bin or cell, for the whole area
        tp = sub.tables["bins"]
        reg_p = tl.fit_expression(tp[: len(train_p)], use_rep="X_patch", genes=genes)
        row["patch_per_bin"] = _mean_pearson(
            reg_p.predict(np.asarray(tp.obsm["X_patch"])[len(train_p) :]), truth
        )
        row["patch_n_train"] = len(train_p)
    return row
