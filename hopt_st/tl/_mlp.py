"""A small seeded torch MLP regressor with early stopping on an inner validation split."""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)


def build_mlp(n_in: int, n_out: int, hidden: int, dropout: float) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, hidden),
        torch.nn.GELU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(hidden, n_out),
    )


def fit_mlp(
    X: np.ndarray,
    Y: np.ndarray,
    *,
    groups=None,
    seed: int = 0,
    hidden: int = 256,
    dropout: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    max_epochs: int = 200,
    patience: int = 10,
    val_fraction: float = 0.1,
    device=None,
) -> tuple[torch.nn.Module, dict]:
    """Fit on standardised inputs/outputs; keeps the weights of the best validation epoch.

    The validation split is random (seeded) or, with ``groups``, whole groups are held out.
    Returns the module (on CPU, eval mode) and the normalisation arrays.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(int(seed))
    n = X.shape[0]
    if groups is not None:
        ug = np.unique(groups)
        n_val_groups = max(1, int(round(val_fraction * len(ug))))
        if len(ug) < 2:
            raise ValueError("groups has a single value; the MLP's validation split needs at least 2 groups.")
        val_groups = rng.choice(ug, size=n_val_groups, replace=False)
        is_val = np.isin(groups, val_groups)
    else:
        is_val = np.zeros(n, dtype=bool)
        is_val[rng.choice(n, size=max(1, int(round(val_fraction * n))), replace=False)] = True
    x_mean, x_std = X[~is_val].mean(0), X[~is_val].std(0)
    x_std[x_std == 0] = 1.0
    y_mean, y_std = Y[~is_val].mean(0), Y[~is_val].std(0)
    y_std[y_std == 0] = 1.0
    dev = torch.device(device) if device is not None else torch.device("cpu")
    Xt = torch.as_tensor((X - x_mean) / x_std, dtype=torch.float32, device=dev)
    Yt = torch.as_tensor((Y - y_mean) / y_std, dtype=torch.float32, device=dev)
    tr_idx = torch.as_tensor(np.flatnonzero(~is_val), device=dev)
    va_idx = torch.as_tensor(np.flatnonzero(is_val), device=dev)
    model = build_mlp(X.shape[1], Y.shape[1], hidden, dropout).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best, best_state, bad = np.inf, None, 0
    for epoch in range(max_epochs):
        model.train()
        perm = tr_idx[torch.randperm(len(tr_idx), generator=gen).to(dev)]
        for i in range(0, len(perm), batch_size):
            b = perm[i : i + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(Xt[b]), Yt[b])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = torch.nn.functional.mse_loss(model(Xt[va_idx]), Yt[va_idx]).item()
        if val < best - 1e-6:
            best, bad = val, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                logger.debug("mlp: early stop at epoch %d (best val mse %.4f)", epoch, best)
                break
    model = model.cpu()
    model.load_state_dict(best_state)
    model.eval()
    norm = {"x_mean": x_mean, "x_std": x_std, "y_mean": y_mean, "y_std": y_std}
    return model, norm
