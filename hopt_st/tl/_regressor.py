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
from spatialdata import SpatialData

from .._atomic import atomic_write_bytes, check_overwrite
from .._constants import UNS_KEY
from .._docs import inject_docs
from .._errors import CorruptFileError
from ..io._elements import get_spot_table
from ..io._store import check_name
from ._metrics import pearson_per_gene
from ._provenance import check_provenance as _check_provenance
from ._provenance import embedding_provenance
from ._targets import TARGETS, target_matrix, top_variable_genes
from .linear import (
    HEST_N_COMPONENTS,
    LinearMap,
    check_embeddings,
    fit_hest_ridge,
    fit_hest_ridge_sklearn,
    fit_ridge_cv,
    hest_alpha,
)

logger = logging.getLogger(__name__)

METHODS = ("ridge", "ridge-hest", "mlp")
_FORMAT = "hopt_st.ExpressionRegressor/1"


class ExpressionRegressor(BaseEstimator, RegressorMixin):
    """Predict expression of several genes from spot embeddings.

    Parameters
    ----------
    method
        ``"ridge"``: ridge with intercept on standardised embeddings, alpha per gene by exact leave-one-out
        error, or by group-wise inner cross-validation when ``groups`` is passed to :meth:`fit`.
        ``"ridge-hest"``: HEST-Benchmark's probe (StandardScaler -> PCA(256) -> Ridge lsqr,
        alpha = 100 / (n_components * n_genes), no intercept).
        ``"mlp"``: one-hidden-layer torch MLP, early stopping on an inner split.
    seed
        Seed for PCA (sklearn solver), the MLP initialisation and its validation split.
    alphas
        Candidate penalties for ``"ridge"``.
    n_components
        PCA dimension of ``"ridge-hest"`` (256 in HEST).
    solver
        ``"ridge-hest"`` only: closed-form/reduced-LSQR implementation or the scikit-learn pipeline itself.
    hidden, max_epochs, patience, device
        MLP settings.

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
        seed: int = 0,
        alphas: Sequence[float] | None = None,
        n_components: int = HEST_N_COMPONENTS,
        solver: Literal["fast", "sklearn"] = "fast",
        hidden: int = 256,
        max_epochs: int = 200,
        patience: int = 10,
        device: str | None = None,
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

    # -- metadata set by fit_expression (kept outside get_params) --
    use_rep: str | None = None
    target: str = "log1p"
    layer: str | None = None
    spatial_context: bool = False
    provenance_: dict = {}  # replaced (never mutated) per instance by fit_expression / load

    def fit(self, X, y, groups=None):
        """Fit on embeddings ``X`` (n_spots, dim) and targets ``y`` (n_spots, n_genes)."""
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}.")
        if self.solver not in ("fast", "sklearn"):
            raise ValueError(f"solver={self.solver!r} must be 'fast' or 'sklearn'.")
        if isinstance(y, pd.DataFrame):
            genes = [str(c) for c in y.columns]
        else:
            genes = None
        X = check_embeddings(X)
        Y = np.asarray(y, dtype=np.float64)
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} spots but y has {Y.shape[0]}; they must match row by row.")
        if not np.all(np.isfinite(Y)):
            raise ValueError("y has NaN or infinite values; check the target expression.")
        if X.shape[0] < Y.shape[1]:
            raise ValueError(
                f"Only {X.shape[0]} training spots for {Y.shape[1]} genes: need at least as many spots as "
                "genes (use more samples in the training fold or fewer genes)."
            )
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape[0] != X.shape[0]:
                raise ValueError(f"groups has {groups.shape[0]} entries for {X.shape[0]} spots.")
        self.genes_ = genes if genes is not None else list(getattr(self, "genes_", None) or [])
        if len(self.genes_) != Y.shape[1]:
            self.genes_ = [f"gene_{i}" for i in range(Y.shape[1])]
        self.n_features_in_ = X.shape[1]
        self.linear_ = None
        self.mlp_ = None
        self.sklearn_ = None
        if self.method == "ridge":
            self.linear_, self.alpha_ = fit_ridge_cv(X, Y, alphas=self.alphas, groups=groups)
        elif self.method == "ridge-hest":
            k = min(self.n_components, *X.shape)
            self.alpha_ = np.full(Y.shape[1], hest_alpha(k, Y.shape[1]))
            if self.solver == "sklearn":
                self.sklearn_ = fit_hest_ridge_sklearn(X, Y, n_components=self.n_components, seed=self.seed)
                # the pipeline is linear: store it as a LinearMap so save/load needs no pickle
                lin = np.vstack([np.zeros(X.shape[1]), np.eye(X.shape[1])])
                out = self.sklearn_.predict(lin)
                self.linear_ = LinearMap(x_mean=np.zeros(X.shape[1]), coef=out[1:] - out[0], intercept=out[0])
            else:
                self.linear_ = fit_hest_ridge(X, Y, n_components=self.n_components)
        else:
            from ._mlp import fit_mlp

            self.mlp_, self.mlp_norm_ = fit_mlp(
                X,
                Y,
                groups=groups,
                seed=self.seed,
                hidden=self.hidden,
                max_epochs=self.max_epochs,
                patience=self.patience,
                device=self.device,
            )
        return self

    def _check_fitted(self):
        if not hasattr(self, "n_features_in_"):
            raise RuntimeError("This ExpressionRegressor is not fitted yet; call fit() or fit_expression().")

    def predict(self, X) -> np.ndarray:
        """Predicted expression (n_spots, n_genes), float32, in the target space."""
        self._check_fitted()
        X = check_embeddings(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features but the regressor was fitted on {self.n_features_in_} "
                f"(use_rep={self.use_rep!r}); use embeddings from the same model."
            )
        if self.sklearn_ is not None:
            return self.sklearn_.predict(X).astype(np.float32)
        if self.linear_ is not None:
            return self.linear_.predict(X).astype(np.float32)
        import torch

        nm = self.mlp_norm_
        with torch.no_grad():
            out = self.mlp_(torch.as_tensor((X - nm["x_mean"]) / nm["x_std"], dtype=torch.float32)).numpy()
        return (out * nm["y_std"] + nm["y_mean"]).astype(np.float32)

    def score(self, X, y, sample_weight=None) -> float:
        """Mean Pearson correlation over genes (genes with constant values are ignored)."""
        r = pearson_per_gene(np.asarray(y, dtype=np.float64), self.predict(X))
        return float(np.nanmean(r))

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
            "params": {k: v for k, v in self.get_params().items() if k not in ("alphas", "device")},
            "alphas": None if self.alphas is None else [float(a) for a in self.alphas],
            "genes": list(self.genes_),
            "n_features_in": int(self.n_features_in_),
            "use_rep": self.use_rep,
            "target": self.target,
            "layer": self.layer,
            "spatial_context": bool(self.spatial_context),
            "provenance": dict(self.provenance_),
        }
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        data = save(tensors, metadata={"hopt_st": json.dumps(meta)})
        atomic_write_bytes(path, data, overwrite=overwrite, what="regressor file")

    @classmethod
    def load(cls, path) -> ExpressionRegressor:
        """Read a regressor written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"regressor file {str(path)!r} does not exist.")
        try:
            with safe_open(str(path), framework="numpy") as f:
                raw = (f.metadata() or {}).get("hopt_st")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = None if raw is None else json.loads(raw)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for truncated/garbled files
            raise CorruptFileError.from_error(
                path,
                e,
                what="regressor file",
                fix="save the regressor again (ExpressionRegressor.save) or copy it again.",
            ) from None
        if meta is None:
            raise ValueError(f"{path} was not written by ExpressionRegressor.save (no hopt_st metadata).")
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: unsupported format {meta.get('format')!r} (expected {_FORMAT}).")
        reg = cls(**meta["params"], alphas=meta["alphas"])
        reg.genes_ = meta["genes"]
        reg.n_features_in_ = meta["n_features_in"]
        reg.use_rep, reg.target = meta["use_rep"], meta["target"]
        reg.layer = meta.get("layer")
        reg.spatial_context = meta["spatial_context"]
        reg.provenance_ = dict(meta.get("provenance") or {})
        reg.linear_, reg.mlp_, reg.sklearn_ = None, None, None
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


def _embeddings(adata, use_rep: str, spatial_context: bool) -> np.ndarray:
    if use_rep not in adata.obsm:
        raise KeyError(
            f"use_rep={use_rep!r} is not in adata.obsm ({list(adata.obsm)}); compute embeddings first with "
            f"hopt_st.pp.embed(..., key_added={use_rep!r})."
        )
    X = check_embeddings(np.asarray(adata.obsm[use_rep]), name=f"adata.obsm[{use_rep!r}]")
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
    seed: int = 0,
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
        Random seed.
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
    if genes is None:
        genes = top_variable_genes(adata, n_top_genes, layer=layer, target=target)
    genes = [str(g) for g in genes]
    Y = target_matrix(adata, genes, target=target, layer=layer)
    if isinstance(groups, str):
        if groups not in adata.obs:
            raise KeyError(f"groups={groups!r} is not a column of adata.obs ({list(adata.obs.columns)}).")
        groups = adata.obs[groups].to_numpy()
    reg = ExpressionRegressor(method, seed=seed, **kwargs)
    reg.use_rep, reg.target, reg.spatial_context = use_rep, target, spatial_context
    reg.layer = layer
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
    check_provenance: bool = True,
) -> None:
    """Predict expression at every spot with a fitted regressor.

    Parameters
    ----------
    adata_or_sdata
        Spots with embeddings: an AnnData, or a SpatialData (its spot table).
    regressor
        Fitted by :func:`fit_expression` (or :meth:`ExpressionRegressor.fit`).
    use_rep
        {use_rep} Default: the one the regressor was fit on.
    key_added
        ``obsm`` key of the predictions.
    table_name
        {table_name}
    overwrite
        {overwrite}
    check_provenance
        Refuse embeddings whose recorded model, weights, µm/px or patch size differ from those the regressor
        was fit on (``regressor.provenance_``); ``False`` skips the check.

    Returns
    -------
    ``None``, and sets:

    ``obsm[key_added]``
        DataFrame (obs_names x genes) of predictions in the regressor's target space.
    ``uns["hopt_st"]["predictions"][key_added]``
        ``{{"genes", "target", "use_rep", "method"}}`` (plus ``"layer"`` when the regressor was fit on counts
        in a layer).
    """
    if isinstance(adata_or_sdata, SpatialData):
        adata, _ = get_spot_table(adata_or_sdata, table_name)
    elif isinstance(adata_or_sdata, AnnData):
        adata = adata_or_sdata
    else:
        raise TypeError(
            f"predict_expression takes an AnnData or a SpatialData, got {type(adata_or_sdata).__name__}."
        )
    use_rep = use_rep or regressor.use_rep
    if use_rep is None:
        raise ValueError("use_rep is unknown: pass use_rep= (the obsm key of the embeddings).")
    check_name(key_added, "key_added", existing=adata.obsm.keys())  # a key the .zarr store can hold
    if key_added in adata.obsm and not overwrite:
        raise ValueError(f"obsm[{key_added!r}] already exists; pass overwrite=True or another key_added.")
    if check_provenance:
        _check_provenance(
            getattr(regressor, "provenance_", None),
            embedding_provenance(adata, use_rep),
            what=f"obsm[{use_rep!r}]",
        )
    X = _embeddings(adata, use_rep, regressor.spatial_context)
    pred = regressor.predict(X)
    adata.obsm[key_added] = pd.DataFrame(pred, index=adata.obs_names.copy(), columns=list(regressor.genes_))
    meta = {
        "genes": list(regressor.genes_),
        "target": regressor.target,
        "use_rep": use_rep,
        "method": regressor.method,
    }
    if getattr(regressor, "layer", None) is not None:  # where the measured counts are (None is not storable)
        meta["layer"] = str(regressor.layer)
    adata.uns.setdefault(UNS_KEY, {}).setdefault("predictions", {})[key_added] = meta
