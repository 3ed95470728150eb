"""Regressors from spot embeddings to gene expression, with a scikit-learn estimator API."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data
from spatialdata import SpatialData

from .._atomic import atomic_write_bytes, check_overwrite
from .._constants import UNS_KEY
from .._docs import inject_docs
from .._errors import CorruptFileError
from ..io._elements import get_spot_table
from ..io._store import check_name
from ._predictions import prediction_table
from ._provenance import check_provenance as _check_provenance
from ._provenance import embedding_provenance
from ._targets import TARGETS, target_matrix, top_variable_genes
from .linear import (
    _HEST_N_COMPONENTS,
    _HEST_SEED,
    LinearMap,
    _check_embeddings,
    _fit_hest_exact,
    _hest_alpha,
    fit_ridge_cv,
)

logger = logging.getLogger(__name__)

METHODS = ("ridge", "ridge-hest", "mlp")
_FORMAT = "hopt_st.ExpressionRegressor/1"
#: constructor arguments saved elsewhere in the file's metadata (not under "params")
_NOT_IN_PARAMS = ("alphas", "device", "use_rep", "target", "layer", "spatial_context")


class ExpressionRegressor(RegressorMixin, BaseEstimator):
    """Predict expression of several genes from spot embeddings (a scikit-learn regressor).

    It passes scikit-learn's estimator checks, so it works in pipelines, ``clone``, ``cross_val_score`` and
    ``GridSearchCV``. :meth:`score` is scikit-learn's R² (averaged uniformly over genes); the mean Pearson
    correlation over genes, the usual figure in spatial transcriptomics, is the scorer
    :func:`hopt_st.tl.mean_pearson` (``GridSearchCV(..., scoring=hs.tl.mean_pearson)``).

    Parameters
    ----------
    method
        ``"ridge"``: ridge with intercept on standardised embeddings, alpha per gene by exact leave-one-out
        error (scikit-learn's ``StandardScaler`` + ``RidgeCV(alpha_per_target=True)``), or by group-wise inner
        cross-validation when ``groups`` is passed to :meth:`fit`.
        ``"ridge-hest"``: HEST-Benchmark's probe (StandardScaler -> PCA(256) -> Ridge lsqr,
        alpha = 100 / (n_components * n_genes), no intercept).
        ``"mlp"``: one-hidden-layer torch MLP, early stopping on an inner split.
    seed
        Seed of the PCA of ``"ridge-hest"``, the MLP initialisation and its validation split. ``None``: HEST's
        seed (1) for ``"ridge-hest"``, so that with ``solver="exact"`` (the default) its coefficients are
        HEST-Benchmark's (fitted with HEST's operations on the embeddings in their own dtype, float32 as stored);
        its predictions differ from HEST's only by HEST's float32 rounding of the test scores (~1e-7 relative,
        not amplified: per-gene Pearson within 1e-6 of HEST's); 0 for the MLP.
    alphas
        Candidate penalties for ``"ridge"``.
    n_components
        PCA dimension of ``"ridge-hest"`` (256 in HEST).
    solver
        ``"ridge-hest"`` only: ``"exact"`` (default; HEST's operations) or ``"fast"`` (opt-in: from moments,
        ~1e-4 per gene off HEST's numbers; see ``hopt_st/tl/_hest_fast.py``).
    hidden, max_epochs, patience, device
        MLP settings.
    use_rep, target, layer, spatial_context
        What the embeddings and targets are (set by :func:`fit_expression`, used by
        :func:`predict_expression`; :meth:`fit` on arrays ignores them): the ``obsm`` key of the embeddings,
        the target space (see :func:`hopt_st.tl.target_matrix`), the layer of raw counts, and whether each
        spot's embedding was concatenated with its neighbours' mean.

    Attributes
    ----------
    genes_ : list of str
    n_features_in_ : int
    alpha_ : numpy.ndarray
        Penalty per gene (``"ridge"``) or HEST's single alpha.
    provenance_ : dict
        Set by :func:`fit_expression`: model, weights sha256, µm/px and patch size of the embeddings it was fit
        on (``{}`` when unknown); :func:`predict_expression` refuses embeddings of another kind.
    """

    def __init__(
        self,
        method: Literal["ridge", "ridge-hest", "mlp"] = "ridge",
        *,
        seed: int | None = None,
        alphas: Sequence[float] | None = None,
        n_components: int = _HEST_N_COMPONENTS,
        solver: Literal["exact", "fast"] = "exact",
        hidden: int = 256,
        max_epochs: int = 200,
        patience: int = 10,
        device: str | None = None,
        use_rep: str | None = None,
        target: Literal["log1p", "normalize_log1p", "none"] = "log1p",
        layer: str | None = None,
        spatial_context: bool = False,
    ):
        self.method = method
        self.seed = seed
        self.alphas = alphas
        self.n_components = n_components
        self.solver = solver
        self.hidden = hidden
        self.max_epochs = max_epochs
        self.patience = patience
        self.device = device
        self.use_rep = use_rep
        self.target = target
        self.layer = layer
        self.spatial_context = spatial_context

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True  # one output per gene
        tags.target_tags.single_output = True  # a 1-D y (one gene) works too
        tags.input_tags.sparse = False  # embeddings are dense
        return tags

    def fit(self, X, y, groups=None):
        """Fit on embeddings ``X`` (n_spots, dim) and targets ``y`` (n_spots, n_genes) or (n_spots,).

        ``y`` as a DataFrame names the genes (``genes_``); ``groups`` (one sample/patient id per spot) makes the
        ``"ridge"`` penalty and the ``"mlp"`` validation split group-aware.
        """
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}.")
        if self.solver not in ("exact", "fast"):
            raise ValueError(f"solver={self.solver!r} must be 'exact' or 'fast'.")
        genes = [str(c) for c in y.columns] if isinstance(y, pd.DataFrame) else None
        # float32 embeddings stay float32 for "ridge-hest" (HEST runs its PCA on them so); float64 elsewhere
        X, y = validate_data(
            self, X, y, accept_sparse=False, multi_output=True, y_numeric=True, dtype=(np.float64, np.float32)
        )
        X_hest, X = X, X.astype(np.float64, copy=False)
        y = np.asarray(y, dtype=np.float64)
        self._y_1d = y.ndim == 1
        Y = y[:, None] if y.ndim == 1 else y
        if X.shape[0] < Y.shape[1]:
            raise ValueError(
                f"Only {X.shape[0]} training spots for {Y.shape[1]} genes: need at least as many spots as "
                "genes (use more samples in the training fold or fewer genes)."
            )
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape[0] != X.shape[0]:
                raise ValueError(f"groups has {groups.shape[0]} entries for {X.shape[0]} spots.")
        self.genes_ = genes if genes is not None else [f"gene_{i}" for i in range(Y.shape[1])]
        self.linear_ = None
        self.mlp_ = None
        seed = self.seed if self.seed is not None else (_HEST_SEED if self.method == "ridge-hest" else 0)
        if self.method == "ridge":
            self.linear_, self.alpha_ = fit_ridge_cv(X, Y, alphas=self.alphas, groups=groups)
        elif self.method == "ridge-hest":
            k = min(self.n_components, *X.shape)
            self.alpha_ = np.full(Y.shape[1], _hest_alpha(k, Y.shape[1]))
            if self.solver == "fast":
                from ._hest_fast import fit_if_replayable

                self.linear_ = fit_if_replayable(X_hest, Y, n_components=self.n_components, seed=seed)
            if self.linear_ is None:
                self.linear_ = _fit_hest_exact(X_hest, Y, n_components=self.n_components, seed=seed)
        else:
            from ._mlp import fit_mlp

            self.mlp_, self.mlp_norm_ = fit_mlp(
                X,
                Y,
                groups=groups,
                seed=seed,
                hidden=self.hidden,
                max_epochs=self.max_epochs,
                patience=self.patience,
                device=self.device,
            )
        return self

    def _check_fitted(self):
        check_is_fitted(
            self, "genes_", msg="This ExpressionRegressor is not fitted yet; call fit() or fit_expression()."
        )

    def predict(self, X) -> np.ndarray:
        """Predicted expression (n_spots, n_genes) in the target space, float64; (n_spots,) when fit on a 1-D y."""
        self._check_fitted()
        X = validate_data(self, X, reset=False, accept_sparse=False, dtype=np.float64)
        if self.linear_ is not None:
            out = self.linear_.predict(X)
        else:
            import torch

            nm = self.mlp_norm_
            with torch.no_grad():
                z = torch.as_tensor((X - nm["x_mean"]) / nm["x_std"], dtype=torch.float32)
                out = self.mlp_(z).numpy().astype(np.float64) * nm["y_std"] + nm["y_mean"]
        out = np.asarray(out, dtype=np.float64)
        return out[:, 0] if getattr(self, "_y_1d", False) else out

    # -- persistence: safetensors + JSON, no pickle --
    def save(self, path, *, overwrite: bool = False) -> None:
        """Write the fitted regressor to one ``.safetensors`` file (arrays) with JSON metadata inside.

        The file is written under a temporary name in the same folder, flushed and renamed, so a failed save
        leaves no partial file and an existing file untouched. An existing ``path`` is only replaced with
        ``overwrite=True`` (``FileExistsError`` otherwise).
        """
        from safetensors.numpy import save

        path = check_overwrite(path, overwrite, "regressor file")
        self._check_fitted()
        tensors: dict[str, np.ndarray] = {}
        if self.linear_ is not None:
            tensors = {
                "linear.x_mean": self.linear_.x_mean,
                "linear.coef": self.linear_.coef,
                "linear.intercept": self.linear_.intercept,
            }
        else:
            tensors = {f"mlp.{k}": v.numpy() for k, v in self.mlp_.state_dict().items()}
            tensors.update({f"norm.{k}": np.asarray(v) for k, v in self.mlp_norm_.items()})
        if hasattr(self, "alpha_"):
            tensors["alpha"] = np.asarray(self.alpha_, dtype=np.float64)
        meta = {
            "format": _FORMAT,
            "params": {k: v for k, v in self.get_params().items() if k not in _NOT_IN_PARAMS},
            "alphas": None if self.alphas is None else [float(a) for a in self.alphas],
            "genes": list(self.genes_),
            "n_features_in": int(self.n_features_in_),
            "use_rep": self.use_rep,
            "target": self.target,
            "layer": self.layer,
            "spatial_context": bool(self.spatial_context),
            "provenance": dict(getattr(self, "provenance_", {})),
            "y_1d": bool(getattr(self, "_y_1d", False)),
        }
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        data = save(tensors, metadata={"hopt_st": json.dumps(meta)})
        atomic_write_bytes(path, data, overwrite=overwrite, what="regressor file")

    @classmethod
    def load(cls, path) -> ExpressionRegressor:
        """Read a regressor written by :meth:`save`."""
        from .._safetensors import read_model_file

        path = Path(path)
        tensors, meta = read_model_file(
            path,
            what="regressor file",
            fix="save the regressor again (ExpressionRegressor.save) or copy it again.",
        )
        if meta is None:
            raise CorruptFileError(
                path, f"{str(path)!r} was not written by ExpressionRegressor.save (no hopt_st metadata)."
            )
        # everything predict relies on is checked now (rule 7), the parameter names included
        meta = _check_regressor_file(path, meta, tensors)
        reg = cls(**meta["params"], alphas=meta["alphas"])
        reg.genes_ = meta["genes"]
        reg.n_features_in_ = meta["n_features_in"]
        reg.use_rep, reg.target = meta["use_rep"], meta["target"]
        reg.layer = meta.get("layer")
        reg.spatial_context = meta["spatial_context"]
        reg.provenance_ = dict(meta.get("provenance") or {})
        reg._y_1d = bool(meta.get("y_1d", False))
        reg.linear_, reg.mlp_ = None, None
        if "alpha" in tensors:
            reg.alpha_ = tensors["alpha"]
        if "linear.coef" in tensors:
            reg.linear_ = LinearMap(
                tensors["linear.x_mean"], tensors["linear.coef"], tensors["linear.intercept"]
            )
        else:
            import torch

            from ._mlp import build_mlp

            state = {k[4:]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("mlp.")}
            hidden, n_in = state["0.weight"].shape
            reg.mlp_ = build_mlp(n_in, state["3.weight"].shape[0], hidden, 0.0)
            reg.mlp_.load_state_dict(state)
            reg.mlp_.eval()
            reg.mlp_norm_ = {k[5:]: v for k, v in tensors.items() if k.startswith("norm.")}
        return reg


# ------------------------------------------------------------------------------------------------------------
# a regressor file, checked completely at load
# ------------------------------------------------------------------------------------------------------------
#: metadata keys of a regressor file and the types their values may have
_META_TYPES: dict[str, tuple] = {
    "format": (str,),
    "params": (dict,),
    "alphas": (list, type(None)),
    "genes": (list,),
    "n_features_in": (int,),
    "use_rep": (str, type(None)),
    "target": (str,),
    "layer": (str, type(None)),
    "spatial_context": (bool,),
    "provenance": (dict, type(None)),
    "y_1d": (bool,),
}
_OPTIONAL_META = ("layer", "provenance", "y_1d")


def _check_regressor_file(path: Path, meta, tensors: dict[str, np.ndarray]) -> dict:
    """Refuse (:class:`CorruptFileError`, naming ``path``) a regressor file that :meth:`ExpressionRegressor.load`
    could read but ``predict`` could not use, or would use to give wrong numbers: unknown format, missing or
    mistyped metadata, parameters the regressor does not take, tensors missing, extra, mis-shaped or holding
    NaN/inf, genes that do not match the coefficients. Returns ``meta``."""
    import inspect

    def bad(what: str) -> CorruptFileError:
        return CorruptFileError(
            path,
            f"regressor file {str(path)!r} {what}: it was not written by ExpressionRegressor.save or was edited "
            "since. Save the regressor again (ExpressionRegressor.save) or copy the original file.",
        )

    if not isinstance(meta, dict):
        raise bad(f"has metadata of type {type(meta).__name__}, not a JSON object")
    if meta.get("format") != _FORMAT:
        raise bad(f"has format {meta.get('format')!r} (expected {_FORMAT!r})")
    for key, types in _META_TYPES.items():
        if key not in meta:
            if key in _OPTIONAL_META:
                continue
            raise bad(f"has no {key!r} in its metadata")
        if not isinstance(meta[key], types) or (int in types and isinstance(meta[key], bool)):
            raise bad(f"has {key}={meta[key]!r} ({type(meta[key]).__name__})")
    unknown = sorted(set(meta) - set(_META_TYPES))
    if unknown:
        raise bad(f"has unknown metadata {unknown}")
    allowed = set(inspect.signature(ExpressionRegressor.__init__).parameters) - {"self", *_NOT_IN_PARAMS}
    extra = sorted(set(meta["params"]) - allowed)
    if extra:
        raise bad(
            f"has parameters {extra} that ExpressionRegressor does not take (it takes {sorted(allowed)})"
        )
    method = meta["params"].get("method", "ridge")
    if method not in METHODS:
        raise bad(f"has method={method!r} (not one of {METHODS})")
    if meta["target"] not in TARGETS:
        raise bad(f"has target={meta['target']!r} (not one of {TARGETS})")
    if meta["alphas"] is not None and not all(
        isinstance(a, int | float) and not isinstance(a, bool) and np.isfinite(a) and a > 0
        for a in meta["alphas"]
    ):
        raise bad(f"has alphas={meta['alphas']!r} (need finite numbers > 0)")
    genes, d = meta["genes"], meta["n_features_in"]
    if not genes or not all(isinstance(g, str) for g in genes) or len(set(genes)) != len(genes):
        raise bad(f"has genes {genes[:5]!r}... (need a non-empty list of distinct names)")
    if d < 1:
        raise bad(f"has n_features_in={d}")
    g = len(genes)
    if meta.get("y_1d") and g != 1:
        raise bad(f"records a 1-D target but {g} genes")
    if method == "mlp":
        h = tensors.get("mlp.0.weight", np.empty((0, 0))).shape[0]
        shapes = {
            "mlp.0.weight": (h, d),
            "mlp.0.bias": (h,),
            "mlp.3.weight": (g, h),
            "mlp.3.bias": (g,),
            "norm.x_mean": (d,),
            "norm.x_std": (d,),
            "norm.y_mean": (g,),
            "norm.y_std": (g,),
        }
    else:
        shapes = {"linear.x_mean": (d,), "linear.coef": (d, g), "linear.intercept": (g,)}
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise bad(f"({method}) has no tensor {missing}")
    extra = sorted(set(tensors) - set(shapes) - {"alpha"})
    if extra:
        raise bad(f"({method}) has unexpected tensors {extra}")
    if "alpha" in tensors:
        shapes["alpha"] = (g,) if tensors["alpha"].ndim == 1 else ()
    for key, shape in shapes.items():
        t = tensors[key]
        if t.shape != shape:
            raise bad(f"has tensor {key!r} of shape {t.shape}, expected {shape} ({d} features, {g} genes)")
        if not np.issubdtype(t.dtype, np.floating):
            raise bad(f"has tensor {key!r} of dtype {t.dtype}, expected floating point")
        n_bad = int(np.size(t) - np.isfinite(t).sum())
        if n_bad:
            raise bad(f"has {n_bad} NaN/inf values in tensor {key!r}, which would make every prediction NaN")
    for key in ("norm.x_std", "norm.y_std"):
        if key in tensors and not (tensors[key] > 0).all():
            raise bad(f"has non-positive values in {key!r}")
    return meta


def _embeddings(adata, use_rep: str, spatial_context: bool) -> np.ndarray:
    if use_rep not in adata.obsm:
        raise KeyError(
            f"use_rep={use_rep!r} is not in adata.obsm ({list(adata.obsm)}); compute embeddings first with "
            f"hopt_st.pp.embed(..., key_added={use_rep!r})."
        )
    X = _check_embeddings(np.asarray(adata.obsm[use_rep]), name=f"adata.obsm[{use_rep!r}]", keep_dtype=True)
    if spatial_context:
        from ._spatial import neighbour_mean

        X = np.hstack([X, neighbour_mean(adata, X)])
    return X


def fit_expression(
    adata: AnnData,
    *,
    use_rep: str = "X_h-optimus-1",
    genes: Sequence[str] | None = None,
    n_top_genes: int = 50,
    method: Literal["ridge", "ridge-hest", "mlp"] = "ridge",
    layer: str | None = None,
    target: Literal["log1p", "normalize_log1p", "none"] = "log1p",
    groups: str | ArrayLike | None = None,
    seed: int | None = None,
    spatial_context: bool = False,
    **kwargs,
) -> ExpressionRegressor:
    """Fit a regressor from ``adata.obsm[use_rep]`` to the expression of ``genes``.

    Parameters
    ----------
    adata
        Spots with embeddings in ``obsm[use_rep]`` and raw counts in ``X`` (or ``layers[layer]``).
    use_rep
        Key of the embeddings in ``obsm``.
    genes
        Genes to predict; when None, the ``n_top_genes`` with the largest variance of the target.
    n_top_genes
        Number of genes chosen when ``genes`` is None.
    method
        See :class:`ExpressionRegressor`.
    layer
        Layer with raw counts.
    target
        Target space, see :func:`hopt_st.tl.target_matrix`.
    groups
        Column of ``obs`` (or one value per spot) with sample/patient ids, for group-aware tuning.
    seed
        Random seed (``None``: HEST's for ``"ridge-hest"``, 0 otherwise; see :class:`ExpressionRegressor`).
    spatial_context
        Concatenate each spot's embedding with the mean embedding of its spatial neighbours.
    **kwargs
        Passed to :class:`ExpressionRegressor`.

    Returns
    -------
    ExpressionRegressor
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {TARGETS}.")
    X = _embeddings(adata, use_rep, spatial_context)
    if len(X) >= 2 and (X == X[:1]).all():
        raise ValueError(
            f"adata.obsm[{use_rep!r}] holds one and the same vector for all {len(X)} spots: every prediction "
            "would be the same and every Pearson r undefined (NaN). The encoder ignored the image: check its "
            "weights and that the patches are not blank (hs.pp.patches(...).to_numpy()), then embed again."
        )
    if genes is None:
        genes = top_variable_genes(adata, n_top_genes, layer=layer, target=target)
    genes = [str(g) for g in genes]
    Y = target_matrix(adata, genes, target=target, layer=layer)
    if isinstance(groups, str):
        if groups not in adata.obs:
            raise KeyError(f"groups={groups!r} is not a column of adata.obs ({list(adata.obs.columns)}).")
        groups = adata.obs[groups].to_numpy()
    reg = ExpressionRegressor(
        method,
        seed=seed,
        use_rep=use_rep,
        target=target,
        layer=layer,
        spatial_context=spatial_context,
        **kwargs,
    )
    reg.fit(X, pd.DataFrame(Y, columns=genes), groups=groups)
    reg.provenance_ = embedding_provenance(adata, use_rep)
    logger.info("fit_expression: %s on %d spots x %d features -> %d genes", method, *X.shape, len(genes))
    return reg


@inject_docs()
def predict_expression(
    adata_or_sdata: AnnData | SpatialData,
    regressor: ExpressionRegressor,
    *,
    use_rep: str | None = None,
    key_added: str = "predicted",
    table_name: str | None = None,
    overwrite: bool = False,
    copy: bool = False,
    check_provenance: bool = True,
) -> AnnData | None:
    """Predict expression at every spot with a fitted regressor.

    The predictions go where spatial tools look: a table of their own (``X`` = predictions), which
    spatialdata-plot draws with ``sdata.pl.render_shapes(spots, color=GENE, table_name=key_added)`` and
    squidpy with ``sq.pl.spatial_scatter(predictions, color=GENE)``; and, for code working on the spot table
    alone, a DataFrame in its ``obsm``.

    Parameters
    ----------
    adata_or_sdata
        Spots with embeddings: an AnnData, or a SpatialData (its spot table).
    regressor
        Fitted by :func:`fit_expression` (or :meth:`ExpressionRegressor.fit`).
    use_rep
        {use_rep} Default: the one the regressor was fit on.
    key_added
        ``obsm`` key of the predictions, and name of the predictions table in a SpatialData.
    table_name
        {table_name}
    overwrite
        {overwrite}
    copy
        Write nothing and return the predictions table instead (the way AnnData users get it).
    check_provenance
        Refuse embeddings whose recorded model, weights, µm/px or patch size differ from those the regressor
        was fit on (``regressor.provenance_``); ``False`` skips the check.

    Returns
    -------
    With ``copy=True`` the predictions table: an AnnData with ``X`` = predictions (float32, in the
    regressor's target space), ``var_names`` = genes, ``obs`` as the spot table's, ``layers["measured"]`` =
    the measured values in the same target space (when the spots measure those genes; NaN for genes they do
    not), ``obsm["spatial"]`` / ``uns["spatial"]`` as the spot table's, ``uns["hopt_st"]["prediction"]``
    (the entry below); for a SpatialData it annotates the same spot shapes. Otherwise ``None``, and sets:

    ``obsm[key_added]``
        DataFrame (obs_names x genes) of the predictions, on the spot table.
    ``uns["hopt_st"]["predictions"][key_added]``
        ``{{"genes", "target", "use_rep", "method"}}`` (plus ``"layer"`` when the regressor was fit on counts
        in a layer), on the spot table.
    ``sdata.tables[key_added]``
        SpatialData only: the predictions table.
    """
    sdata = None
    if isinstance(adata_or_sdata, SpatialData):
        sdata = adata_or_sdata
        adata, _ = get_spot_table(sdata, table_name)
    elif isinstance(adata_or_sdata, AnnData):
        adata = adata_or_sdata
    else:
        raise TypeError(
            f"predict_expression takes an AnnData or a SpatialData, got {type(adata_or_sdata).__name__}."
        )
    use_rep = use_rep or regressor.use_rep
    if use_rep is None:
        raise ValueError("use_rep is unknown: pass use_rep= (the obsm key of the embeddings).")
    if not copy:
        check_name(key_added, "key_added", existing=adata.obsm.keys())  # a key the .zarr store can hold
        if key_added in adata.obsm and not overwrite:
            raise ValueError(f"obsm[{key_added!r}] already exists; pass overwrite=True or another key_added.")
        if sdata is not None and key_added in sdata.tables:
            if sdata.tables[key_added] is adata:
                raise ValueError(f"key_added={key_added!r} names the spot table itself; choose another name.")
            if not overwrite:
                raise ValueError(
                    f"table {key_added!r} already exists in the SpatialData; pass overwrite=True or another key_added."
                )
    if check_provenance:
        _check_provenance(
            getattr(regressor, "provenance_", None),
            embedding_provenance(adata, use_rep),
            what=f"obsm[{use_rep!r}]",
        )
    X = _embeddings(adata, use_rep, regressor.spatial_context)
    n_in = getattr(regressor, "n_features_in_", None)
    if n_in is not None and X.shape[1] != n_in:
        raise ValueError(
            f"obsm[{use_rep!r}] has {X.shape[1]} features but the regressor was fitted on {n_in} "
            f"(use_rep={regressor.use_rep!r}); use embeddings from the same model."
        )
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below, naming the genes
        pred = np.asarray(regressor.predict(X), dtype=np.float32).reshape(X.shape[0], -1)
    finite = np.isfinite(pred)
    if (
        not finite.all()
    ):  # finite embeddings and coefficients can still overflow (rule 7, the other direction)
        genes = [g for g, ok in zip(regressor.genes_, finite.all(axis=0)) if not ok]
        raise ValueError(
            f"the regressor gives NaN/inf for {int((~finite).sum())} of {pred.size} predicted values (genes "
            f"{genes[:5]}{'...' if len(genes) > 5 else ''}) from obsm[{use_rep!r}]: the embeddings are far outside "
            "the range the regressor was fitted on. Check that they come from the regressor's model and weights."
        )
    df = pd.DataFrame(pred, index=adata.obs_names.copy(), columns=list(regressor.genes_))
    meta = {
        "genes": list(regressor.genes_),
        "target": regressor.target,
        "use_rep": use_rep,
        "method": regressor.method,
    }
    if getattr(regressor, "layer", None) is not None:  # where the measured counts are (None is not storable)
        meta["layer"] = str(regressor.layer)
    table = prediction_table(adata, df, meta)
    if copy:
        return table
    adata.obsm[key_added] = df
    adata.uns.setdefault(UNS_KEY, {}).setdefault("predictions", {})[key_added] = meta
    if sdata is not None:
        sdata.tables[key_added] = table
    return None
