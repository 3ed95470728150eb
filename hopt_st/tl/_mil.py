"""Slide-level prediction from bags of tile embeddings: gated-attention MIL (:class:`ABMIL`) and the
mean-pooling baseline (:class:`MeanPoolMIL`), both scikit-learn-style estimators.

ABMIL follows Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018, eq. 9
(gated attention): tiles ``x_k`` are embedded ``h_k = ReLU(W_h x_k)``, scored
``e_k = w^T (tanh(V h_k) ⊙ sigm(U h_k))``, weighted ``a = softmax(e)`` over the slide's tiles, pooled
``z = Σ_k a_k h_k`` and classified (or regressed) by a linear head on ``z``. One slide per optimisation step
(the paper's batch of one bag), Adam, a fixed number of steps; inputs are standardised with the training tiles'
per-dimension mean and standard deviation.

Targets: ``"binary"`` (logistic loss), ``"multiclass"`` (softmax cross-entropy) or ``"regression"`` (squared
error on standardised targets; one or many continuous values per slide, e.g. bulk expression per gene).
Training is deterministic on the CPU for a fixed ``seed`` (initialisation, slide order and tile subsampling
come from it); the same code runs on CUDA.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from .._atomic import atomic_write_bytes, check_overwrite
from ..io._bags import BAG_PROVENANCE_FIELDS, Bags, as_bags
from ._provenance import provenance_differences

logger = logging.getLogger(__name__)

TASKS = ("binary", "multiclass", "regression")
_FORMAT = "hopt_st.mil/1"
_EPS = 1e-6
_CHUNK = 2048  # tiles per chunk of the input moments


# ----------------------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------------------
def infer_task(y) -> str:
    """``"regression"`` for a 2-D target or non-integer numbers, else ``"binary"`` / ``"multiclass"`` by the
    number of distinct values."""
    y = np.asarray(y)
    if y.ndim == 2:
        return "regression"
    if y.dtype.kind == "f" and not np.all(np.isclose(y, np.round(y))):
        return "regression"
    n = len(np.unique(y))
    if n < 2:
        raise ValueError(f"the target has {n} distinct value: a classifier needs at least 2 classes.")
    return "binary" if n == 2 else "multiclass"


class _Target:
    """Encoding of a target for the loss, and back."""

    def __init__(self, task: str, y):
        if task not in TASKS:
            raise ValueError(f"task = {task!r} must be one of {TASKS} (or 'auto').")
        self.task = task
        y = np.asarray(y)
        if task == "regression":
            y2 = np.asarray(y, dtype=np.float64)
            self.one_d = y2.ndim == 1
            y2 = y2.reshape(len(y2), -1)
            if not np.isfinite(y2).all():
                raise ValueError("the continuous target holds NaN or infinite values: drop those slides.")
            self.mean, self.std = y2.mean(0), y2.std(0)
            self.std[self.std < _EPS] = 1.0
            self.classes = None
            self.n_out = y2.shape[1]
        else:
            if y.ndim != 1:
                raise ValueError(f"a {task} target must be 1-D, got shape {y.shape}.")
            self.classes = np.unique(y)
            if task == "binary" and len(self.classes) != 2:
                raise ValueError(f"task='binary' needs 2 classes, the target has {list(self.classes)}.")
            self.n_out = 1 if task == "binary" else len(self.classes)

    def encode(self, y) -> np.ndarray:
        if self.task == "regression":
            y2 = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
            return ((y2 - self.mean) / self.std).astype(np.float32)
        idx = np.searchsorted(self.classes, y)
        return idx.astype(np.int64)

    def meta(self) -> dict:
        if self.task == "regression":
            return {
                "task": self.task,
                "mean": self.mean.tolist(),
                "std": self.std.tolist(),
                "one_d": self.one_d,
            }
        return {"task": self.task, "classes": self.classes.tolist()}

    @classmethod
    def from_meta(cls, meta: dict) -> _Target:
        t = cls.__new__(cls)
        t.task = meta["task"]
        if t.task == "regression":
            t.mean, t.std = np.asarray(meta["mean"]), np.asarray(meta["std"])
            t.one_d, t.classes, t.n_out = bool(meta["one_d"]), None, len(t.mean)
        else:
            t.classes = np.asarray(meta["classes"])
            t.n_out = 1 if t.task == "binary" else len(t.classes)
        return t


def _check_y(bags: Bags, y) -> np.ndarray:
    y = np.asarray(y)
    if len(y) != len(bags):
        raise ValueError(f"{len(bags)} bags but {len(y)} targets.")
    if y.dtype == object:
        if any(v is None or v != v for v in y):
            raise ValueError("the target has missing values: drop those slides first.")
        y = y.astype(str)
    return y


def _check_dim(bag: np.ndarray, dim: int | None, what: str) -> None:
    if bag.ndim != 2 or bag.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty (n_tiles, dim) array; got shape {bag.shape}.")
    if dim is not None and bag.shape[1] != dim:
        raise ValueError(
            f"{what} has {bag.shape[1]}-dimensional embeddings but the model takes {dim}: it was embedded "
            "with another encoder."
        )


def _provenance_of(bags: Bags) -> dict:
    prov = bags.provenance
    return {k: prov[k] for k in BAG_PROVENANCE_FIELDS if k in prov}


def check_bag_provenance(expected: dict, bags: Bags, what: str = "the MIL model") -> None:
    """Refuse bags embedded with another model, weights, µm/px or tile size than the model was fitted on
    (compared as :func:`~hopt_st.tl._provenance.provenance_differences` compares them)."""
    if not expected:
        return
    diffs = provenance_differences(expected, bags.provenance, BAG_PROVENANCE_FIELDS)
    if diffs:
        raise ValueError(
            f"these bags were not embedded like the bags {what} was fitted on ({'; '.join(diffs)}): its "
            "predictions would be meaningless. Embed the slides with the same model, weights, µm/px and tile size."
        )


# ----------------------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------------------
def _network(dim: int, hidden: int, attention: int, n_out: int, dropout: float):
    import torch
    from torch import nn

    class GatedAttentionMIL(nn.Module):
        """Ilse et al. (2018) eq. 9: gated attention pooling of embedded tiles, then a linear head."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
            self.attention_v = nn.Linear(hidden, attention)
            self.attention_u = nn.Linear(hidden, attention)
            self.attention_w = nn.Linear(attention, 1)
            self.head = nn.Linear(hidden, n_out)

        def forward(self, x):  # x: (n_tiles, dim)
            h = self.embed(x)
            gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
            a = torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)
            return self.head(a @ h), a

    return GatedAttentionMIL()


class _Predictions:
    """``predict_proba`` and ``predict`` of a fitted slide-level model, from its ``_check_fitted`` and ``_scores``
    (probabilities, or predictions in target units, one row per bag)."""

    def predict_proba(self, bags) -> np.ndarray:
        """Class probabilities, ``(n_bags, n_classes)`` in the order of ``classes_``."""
        self._check_fitted()
        if self.task_ == "regression":
            raise AttributeError("predict_proba is for classification; this model regresses: use predict.")
        return self._scores(bags)

    def predict(self, bags) -> np.ndarray:
        """Predicted classes, or continuous values (``(n_bags,)`` or ``(n_bags, n_targets)``)."""
        self._check_fitted()
        return _decide(self.target_, self._scores(bags))


def _tile_moments(bags: Bags) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation over all tiles of all bags (one pass, one bag at a time)."""
    n, s, ss = 0, None, None
    for i in range(len(bags)):
        x = bags.arrays(i)
        _check_dim(x, None if s is None else len(s), f"bag {bags.sample_ids[i]!r}")
        if s is None:
            s, ss = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        for j in range(0, len(x), _CHUNK):  # float64 sums, a chunk at a time (no float64 copy of the bag)
            c = x[j : j + _CHUNK].astype(np.float64)
            s += c.sum(0)
            ss += (c * c).sum(0)
        n += len(x)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    std[std < _EPS] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


class ABMIL(_Predictions, BaseEstimator):
    """Gated-attention multiple-instance learning (Ilse et al., ICML 2018) on bags of tile embeddings.

    Parameters
    ----------
    lr
        Adam learning rate.
    steps
        Optimisation steps, one slide each (slides visited in a seeded random order, epoch after epoch).
    hidden_dim
        Size of the tile embedding ``h_k``.
    attention_dim
        Size of the gated attention layer.
    dropout
        Dropout on ``h_k`` during training.
    weight_decay
        Adam's L2 penalty.
    max_tiles
        During training, at most this many tiles per slide (a seeded random subset); ``None``: all.
        Prediction always uses every tile.
    task
        ``"auto"`` (from the target), ``"binary"``, ``"multiclass"`` or ``"regression"``.
    seed
        Seed of initialisation, slide order and tile subsampling.
    device
        Torch device; ``None``: CUDA when available, else the CPU.

    Attributes
    ----------
    task_
        The task fitted.
    classes_
        Class labels (classification).
    provenance_
        Model, weights, µm/px and tile size of the bags it was fitted on (bags from another encoder are refused).
    n_features_in_
        Embedding size.
    """

    def __init__(
        self,
        *,
        lr: float = 1e-4,
        steps: int = 1000,
        hidden_dim: int = 128,
        attention_dim: int = 128,
        dropout: float = 0.0,
        weight_decay: float = 1e-4,
        max_tiles: int | None = None,
        task: str = "auto",
        seed: int = 0,
        device: str | None = None,
    ):
        self.lr = lr
        self.steps = steps
        self.hidden_dim = hidden_dim
        self.attention_dim = attention_dim
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.max_tiles = max_tiles
        self.task = task
        self.seed = seed
        self.device = device

    # -- fitting --
    def _device(self):
        import torch

        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def fit(self, bags, y) -> ABMIL:
        """Fit on ``bags`` (a :class:`hopt_st.io.Bags` or a list of arrays) and one target per bag."""
        self._fit(bags, y)
        return self

    def fit_path(self, bags, y, val_bags, eval_steps) -> dict[int, np.ndarray]:
        """Fit for ``max(eval_steps)`` steps; return the predictions (as :meth:`predict_proba` /
        :meth:`predict` for regression) on ``val_bags`` after each of ``eval_steps`` steps. One training run
        scores every step count of a grid."""
        return self._fit(bags, y, val_bags=as_bags(val_bags), eval_steps=sorted({int(s) for s in eval_steps}))

    def _fit(self, bags, y, val_bags=None, eval_steps=None):
        import torch

        bags = as_bags(bags)
        y = _check_y(bags, y)
        for name in ("lr", "steps"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} = {getattr(self, name)!r} must be > 0.")
        task = infer_task(y) if self.task == "auto" else self.task
        target = _Target(task, y)
        y_enc = target.encode(y)
        mean, std = _tile_moments(bags)
        dim = len(mean)
        steps = int(max(eval_steps)) if eval_steps else int(self.steps)
        dev = self._device()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            net = _network(
                dim, int(self.hidden_dim), int(self.attention_dim), target.n_out, float(self.dropout)
            )
        net = net.to(dev)
        self.net_, self.target_, self.x_mean_, self.x_std_ = net, target, mean, std
        self.task_, self.n_features_in_ = task, dim
        self.classes_ = target.classes
        self.provenance_ = _provenance_of(bags)
        opt = torch.optim.Adam(net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
        rng = np.random.default_rng(int(self.seed))
        if task == "regression":
            loss_fn = torch.nn.MSELoss()
            yt = torch.as_tensor(y_enc)
        elif task == "binary":
            loss_fn = torch.nn.BCEWithLogitsLoss()
            yt = torch.as_tensor(y_enc, dtype=torch.float32).reshape(-1, 1)
        else:
            loss_fn = torch.nn.CrossEntropyLoss()
            yt = torch.as_tensor(y_enc)
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(
                int(self.seed) + 1
            )  # dropout's stream; the caller's random state is left as it was
            out = self._train(net, opt, loss_fn, bags, yt, steps, rng, dev, val_bags, eval_steps)
        net.eval()
        return out

    def _train(self, net, opt, loss_fn, bags, yt, steps, rng, dev, val_bags, eval_steps) -> dict:
        order = np.empty(0, dtype=np.int64)
        out: dict[int, np.ndarray] = {}
        net.train()
        for step in range(steps):
            if step % len(bags) == 0:
                order = rng.permutation(len(bags))
            i = int(order[step % len(bags)])
            x = bags.arrays(i)
            if self.max_tiles is not None and len(x) > int(self.max_tiles):
                x = x[np.sort(rng.choice(len(x), int(self.max_tiles), replace=False))]
            logits, _ = net(self._input(x, dev))
            loss = loss_fn(logits.reshape(1, -1), yt[i : i + 1].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if eval_steps and step + 1 in eval_steps:
                out[step + 1] = self._scores(val_bags)
                net.train()
        return out

    def _input(self, x: np.ndarray, dev):
        import torch

        _check_dim(x, self.n_features_in_, "a bag")
        return torch.as_tensor((x - self.x_mean_) / self.x_std_, dtype=torch.float32).to(dev)

    # -- prediction --
    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise RuntimeError("this ABMIL is not fitted: call fit(bags, y) first (or ABMIL.load).")

    def _forward(self, x: np.ndarray):
        import torch

        self.net_.eval()
        with torch.no_grad():
            logits, a = self.net_(self._input(x, next(self.net_.parameters()).device))
        return logits.float().cpu().numpy().astype(np.float64), a.float().cpu().numpy().astype(np.float64)

    def _scores(self, bags) -> np.ndarray:
        """Probabilities (classification) or predictions in target units (regression), one row per bag."""
        bags = as_bags(bags)
        check_bag_provenance(self.provenance_, bags)
        rows = [self._forward(bags.arrays(i))[0] for i in range(len(bags))]
        logits = np.vstack(rows) if rows else np.zeros((0, self.target_.n_out))
        return _link(self.target_, logits)

    def attention(self, bag) -> np.ndarray:
        """Attention weight of each tile of one bag (a :class:`~hopt_st.io.SampleEmbeddings` or an array);
        they sum to 1."""
        self._check_fitted()
        x = bag.embeddings if hasattr(bag, "embeddings") else np.asarray(bag, dtype=np.float32)
        return self._forward(x)[1]

    # -- persistence --
    def save(self, path, *, overwrite: bool = False) -> None:
        """Write the fitted model to one ``.safetensors`` file (weights) with JSON metadata inside
        (hyperparameters, target encoding, provenance); atomic, refuses to replace ``path`` without
        ``overwrite=True``."""

        def tensors():
            out = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net_.state_dict().items()}
            out["x_mean"], out["x_std"] = self.x_mean_, self.x_std_
            return out

        _save_model(self, path, overwrite, tensors)


def _link(target: _Target, logits: np.ndarray) -> np.ndarray:
    if target.task == "regression":
        return logits * target.std + target.mean
    if target.task == "binary":
        p = 1.0 / (1.0 + np.exp(-logits[:, 0]))
        return np.column_stack([1 - p, p])
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _decide(target: _Target, scores: np.ndarray) -> np.ndarray:
    if target.task == "regression":
        return scores[:, 0] if target.one_d else scores
    return target.classes[np.argmax(scores, axis=1)]


def _slide_scores(model: ABMIL | MeanPoolMIL, bag: Bags) -> tuple[np.ndarray, np.ndarray | None]:
    """One slide's scores, ``(n_outputs,)`` -- a row of :meth:`ABMIL.predict_proba` (classification) or the
    prediction in target units (regression) -- and, for an :class:`ABMIL`, its tiles' attention (``None`` for
    mean pooling), from one pass over the slide's tiles (``bag`` holds one bag; its provenance is checked)."""
    model._check_fitted()
    if not isinstance(model, ABMIL):
        return model._scores(bag)[0], None
    check_bag_provenance(model.provenance_, bag)
    logits, attention = model._forward(bag.arrays(0))
    return _link(model.target_, logits[None, :])[0], attention


def _meta(est, target: _Target) -> dict:
    return {
        "format": _FORMAT,
        "estimator": type(est).__name__,
        "params": {k: v for k, v in est.get_params().items() if k != "device"},
        "target": target.meta(),
        "n_features_in": int(est.n_features_in_),
        "provenance": dict(est.provenance_),
    }


# ----------------------------------------------------------------------------------------------------------
# the baseline
# ----------------------------------------------------------------------------------------------------------
def bag_means(bags) -> np.ndarray:
    """The mean embedding of each bag, ``(n_bags, dim)`` float64, reading one bag at a time."""
    bags = as_bags(bags)
    rows = []
    for i in range(len(bags)):
        x = bags.arrays(i)
        _check_dim(x, rows[0].shape[0] if rows else None, f"bag {bags.sample_ids[i]!r}")
        rows.append(x.mean(0, dtype=np.float64))
    return np.vstack(rows)


class MeanPoolMIL(_Predictions, BaseEstimator):
    """The baseline: each slide's mean tile embedding, standardised, then L2-penalised logistic regression
    (classification; multinomial for several classes) or ridge regression (continuous targets).

    Parameters
    ----------
    alpha
        Penalty strength (ridge's ``alpha``; logistic regression's ``C = 1 / alpha``).
    task
        ``"auto"``, ``"binary"``, ``"multiclass"`` or ``"regression"``.
    seed
        Seed of the solver (results do not depend on it for these convex problems).
    """

    def __init__(self, *, alpha: float = 1.0, task: str = "auto", seed: int = 0):
        self.alpha = alpha
        self.task = task
        self.seed = seed

    def fit(self, bags, y) -> MeanPoolMIL:
        """Fit on ``bags`` and one target per bag."""
        bags = as_bags(bags)
        y = _check_y(bags, y)
        if not float(self.alpha) > 0:
            raise ValueError(f"alpha = {self.alpha!r} must be > 0.")
        task = infer_task(y) if self.task == "auto" else self.task
        target = _Target(task, y)
        X = bag_means(bags)
        self.x_mean_, self.x_std_ = X.mean(0), X.std(0)
        self.x_std_[self.x_std_ < _EPS] = 1.0
        Z = (X - self.x_mean_) / self.x_std_
        if task == "regression":
            from sklearn.linear_model import Ridge

            model = Ridge(alpha=float(self.alpha)).fit(Z, target.encode(y))
            self.coef_, self.intercept_ = np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_)
        else:
            from sklearn.linear_model import LogisticRegression

            model = LogisticRegression(C=1.0 / float(self.alpha), max_iter=5000, random_state=int(self.seed))
            model.fit(Z, target.encode(y))
            self.coef_, self.intercept_ = model.coef_, model.intercept_
        self.target_, self.task_, self.classes_ = target, task, target.classes
        self.n_features_in_ = X.shape[1]
        self.provenance_ = _provenance_of(bags)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError("this MeanPoolMIL is not fitted: call fit(bags, y) first.")

    def _scores(self, bags) -> np.ndarray:
        self._check_fitted()
        bags = as_bags(bags)
        check_bag_provenance(self.provenance_, bags)
        X = bag_means(bags)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"the bags have {X.shape[1]}-dimensional embeddings but the model takes {self.n_features_in_}."
            )
        logits = ((X - self.x_mean_) / self.x_std_) @ self.coef_.T + self.intercept_
        return _link(self.target_, logits)

    def fit_path(self, bags, y, val_bags, eval_steps=None) -> dict:
        """For a uniform protocol: fit, and the predictions on ``val_bags`` under the key ``0``."""
        self.fit(bags, y)
        return {0: self._scores(val_bags)}

    def save(self, path, *, overwrite: bool = False) -> None:
        """As :meth:`ABMIL.save`."""
        _save_model(
            self,
            path,
            overwrite,
            lambda: {
                "x_mean": self.x_mean_,
                "x_std": self.x_std_,
                "coef": self.coef_,
                "intercept": self.intercept_,
            },
        )


def _save_model(est, path, overwrite: bool, tensors) -> None:
    """Write the fitted ``est`` to one ``.safetensors`` file: ``tensors()`` (built once ``path`` may be written
    and ``est`` is fitted) with :func:`_meta` as JSON metadata; atomic, ``path`` replaced only with
    ``overwrite``."""
    from safetensors.numpy import save

    path = check_overwrite(path, overwrite, "MIL model file")
    est._check_fitted()
    data = save(
        {k: np.ascontiguousarray(v) for k, v in tensors().items()},
        metadata={"hopt_st": json.dumps(_meta(est, est.target_))},
    )
    atomic_write_bytes(path, data, overwrite=overwrite, what="MIL model file")


def load_mil(path) -> ABMIL | MeanPoolMIL:
    """Read a model written by :meth:`ABMIL.save` or :meth:`MeanPoolMIL.save`."""
    import torch

    from .._safetensors import read_model_file

    path = Path(path)
    tensors, meta = read_model_file(
        path, what="MIL model file", fix="save the model again (ABMIL.save) or copy it again."
    )
    if meta is None or meta.get("format") != _FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a MIL model written by ABMIL.save / MeanPoolMIL.save (format "
            f"{None if meta is None else meta.get('format')!r}, expected {_FORMAT!r})."
        )
    target = _Target.from_meta(meta["target"])
    if meta["estimator"] == "ABMIL":
        est = ABMIL(**meta["params"])
        est.net_ = _network(
            meta["n_features_in"],
            int(est.hidden_dim),
            int(est.attention_dim),
            target.n_out,
            float(est.dropout),
        )
        state = {k[4:]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("net.")}
        est.net_.load_state_dict(state)
        est.net_ = est.net_.to(est._device()).eval()
        est.x_mean_, est.x_std_ = tensors["x_mean"], tensors["x_std"]
    elif meta["estimator"] == "MeanPoolMIL":
        est = MeanPoolMIL(**meta["params"])
        est.x_mean_, est.x_std_ = tensors["x_mean"], tensors["x_std"]
        est.coef_, est.intercept_ = tensors["coef"], tensors["intercept"]
    else:
        raise ValueError(f"{str(path)!r}: unknown estimator {meta['estimator']!r}.")
    est.target_, est.task_, est.classes_ = target, target.task, target.classes
    est.n_features_in_ = int(meta["n_features_in"])
    est.provenance_ = dict(meta["provenance"])
    return est


ABMIL.load = staticmethod(load_mil)
MeanPoolMIL.load = staticmethod(load_mil)


# ----------------------------------------------------------------------------------------------------------
# where the model looked
# ----------------------------------------------------------------------------------------------------------
def attention_table(model: ABMIL, bag) -> pd.DataFrame:
    """One slide's tiles with their attention: ``tile_id`` (the barcode), ``x``, ``y`` (tile centre, or top-left
    corner when the file has no centres, level-0 pixels) and ``attention`` (summing to 1)."""
    a = model.attention(bag)
    xy = bag.centers if bag.centers is not None else bag.coords
    out = pd.DataFrame({"tile_id": np.asarray(bag.barcodes).astype(str), "attention": a})
    if xy is not None:
        out.insert(1, "x", np.asarray(xy)[:, 0])
        out.insert(2, "y", np.asarray(xy)[:, 1])
    return out


def mil_attention(
    sdata,
    model: ABMIL | str | Path,
    *,
    table_name: str = "grid",
    use_rep: str | None = None,
    key_added: str = "attention",
    overwrite: bool = False,
) -> None:
    """Write a fitted ABMIL's attention over a slide's tiles into its grid table, for spatialdata-plot.

    Parameters
    ----------
    sdata
        A SpatialData whose ``tables[table_name]`` holds the tiles' embeddings (e.g. after
        :func:`hopt_st.pp.tile_grid` and :func:`hopt_st.pp.embed`).
    model
        A fitted :class:`ABMIL`, or the file it was saved to.
    table_name
        The grid table.
    use_rep
        ``obsm`` key of the embeddings; default ``"X_<model>"`` of the model's provenance.
    key_added
        ``obs`` column to write.
    overwrite
        Replace an existing column.

    Returns
    -------
    ``None``; sets ``tables[table_name].obs[key_added]`` (one weight per tile, summing to 1) and records the
    model's provenance in ``uns["hopt_st"]["attention"][key_added]``. Draw it with
    ``sdata.pl.render_images().pl.render_shapes("grid_shapes", color=key_added).pl.show()``.
    """
    from ..io._bags import ArrayBags
    from ._provenance import embedding_provenance

    if not isinstance(model, ABMIL | MeanPoolMIL):
        model = load_mil(model)
    if not isinstance(model, ABMIL):
        raise TypeError(f"attention comes from an ABMIL model; got {type(model).__name__}.")
    if table_name not in sdata.tables:
        raise KeyError(f"table {table_name!r} is not in the SpatialData (tables: {list(sdata.tables)}).")
    table = sdata.tables[table_name]
    if use_rep is None:
        from ..pp._embed import default_key

        use_rep = default_key(model.provenance_.get("model", ""))
    if use_rep not in table.obsm:
        raise KeyError(
            f"tables[{table_name!r}].obsm has no {use_rep!r} (it has {list(table.obsm)}): embed the tiles with "
            f"the model the MIL model was fitted on ({model.provenance_.get('model')!r}), or pass use_rep."
        )
    if key_added in table.obs.columns and not overwrite:
        raise ValueError(
            f"tables[{table_name!r}].obs[{key_added!r}] exists: pass overwrite=True to replace it."
        )
    prov = embedding_provenance(table, use_rep)
    bag = ArrayBags([np.asarray(table.obsm[use_rep], dtype=np.float32)], provenance=prov)
    check_bag_provenance(model.provenance_, bag)
    _store_attention(table, model.attention(bag.arrays(0)), model, use_rep, key_added)


def _store_attention(table, attention: np.ndarray, model: ABMIL, use_rep: str, key_added: str) -> None:
    """``table.obs[key_added]`` = the attention of each tile, and the model's provenance in
    ``uns["hopt_st"]["attention"][key_added]``."""
    from .._constants import UNS_KEY

    table.obs[key_added] = attention
    table.uns.setdefault(UNS_KEY, {}).setdefault("attention", {})[key_added] = {
        "use_rep": use_rep,
        **{k: v for k, v in model.provenance_.items()},
    }
