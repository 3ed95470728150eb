"""A weight-free baseline encoder: colour, H&E stain and texture statistics per patch.

Runs anywhere (no download), fast on CPU, and is the floor every foundation model must beat.
Stains are separated by colour deconvolution (Ruifrok & Johnston 2001): optical density
``OD = -log10((I + 1) / 256)`` is projected on the inverse of the haematoxylin / eosin / residual
stain matrix; nuclei show up as high haematoxylin density.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB/residual), in OD space.
_STAIN_MATRIX = (
    (0.650, 0.704, 0.286),
    (0.072, 0.990, 0.105),
    (0.268, 0.570, 0.776),
)
_H_THRESHOLDS = (0.15, 0.3, 0.5)
_QUANTILES = (0.1, 0.5, 0.9)

FEATURE_NAMES: tuple[str, ...] = (
    *(f"rgb_mean_{c}" for c in "rgb"),
    *(f"rgb_std_{c}" for c in "rgb"),
    "saturation_mean",
    "background_fraction",
    "tissue_fraction",
    *(f"{s}_{stat}" for s in ("hema", "eosin") for stat in ("mean", "std", "q10", "q50", "q90")),
    "residual_mean",
    *(f"hema_fraction_above_{t}" for t in _H_THRESHOLDS),
    "nuclei_peaks_per_kpx",
    "hema_centre_mean",
    "eosin_centre_mean",
    "hema_block_heterogeneity",
    "gray_gradient_mean",
    "hema_gradient_mean",
    "gray_laplacian_mean",
    "gray_local_std_4",
    "gray_local_std_16",
)
N_FEATURES = len(FEATURE_NAMES)


def _local_std(x: torch.Tensor, k: int) -> torch.Tensor:
    m = F.avg_pool2d(x, k, stride=k)
    m2 = F.avg_pool2d(x * x, k, stride=k)
    return (m2 - m * m).clamp_min(0).sqrt().mean(dim=(1, 2, 3))


class HandcraftedEncoder(nn.Module):
    """Per-patch colour / stain / texture statistics (``N_FEATURES`` values).

    ``forward`` takes a uint8 tensor ``(B, H, W, 3)`` (RGB) and returns float32 ``(B, N_FEATURES)``.
    Patches should be at least 16 px wide.
    """

    feature_names = FEATURE_NAMES

    def __init__(self) -> None:
        super().__init__()
        m = torch.tensor(_STAIN_MATRIX, dtype=torch.float64)
        m = m / m.norm(dim=1, keepdim=True)
        self.register_buffer("stain_inv", torch.linalg.inv(m).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"HandcraftedEncoder expects (B, H, W, 3) uint8 RGB, got shape {tuple(x.shape)}."
            )
        if x.device.type not in ("cpu", "cuda", "mps", "xpu"):  # e.g. meta: no autocast there
            return self._features(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._features(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        xf = x.float()
        rgb = (xf / 255.0).permute(0, 3, 1, 2)  # B,3,H,W
        flat = rgb.flatten(2)
        feats = [flat.mean(2), flat.std(2)]
        sat = rgb.amax(1) - rgb.amin(1)
        feats.append(sat.flatten(1).mean(1, keepdim=True))
        gray = rgb.mean(1, keepdim=True)  # B,1,H,W
        od = -torch.log10((xf + 1.0) / 256.0)  # B,H,W,3
        od_sum = od.sum(-1)
        feats.append((gray.flatten(1) > 0.85).float().mean(1, keepdim=True))
        feats.append((od_sum.flatten(1) > 0.3).float().mean(1, keepdim=True))
        conc = (od @ self.stain_inv).clamp_min(0)  # B,H,W,3 : haematoxylin, eosin, residual
        hema = conc[..., 0]
        eosin = conc[..., 1]
        q = torch.tensor(_QUANTILES, device=x.device)
        step = max(1, int((h * w / 4096) ** 0.5))  # quantiles on a regular subsample (≤ ~4k px)
        for s in (hema, eosin):
            sf = s.flatten(1)
            sub = s[:, ::step, ::step].flatten(1)
            feats += [sf.mean(1, keepdim=True), sf.std(1, keepdim=True), torch.quantile(sub, q, dim=1).T]
        feats.append(conc[..., 2].flatten(1).mean(1, keepdim=True))
        feats.append(torch.stack([(hema > t).float().flatten(1).mean(1) for t in _H_THRESHOLDS], 1))
        hs = F.avg_pool2d(hema[:, None], 3, stride=1, padding=1)
        peaks = (hs == F.max_pool2d(hs, 7, stride=1, padding=3)) & (hs > _H_THRESHOLDS[1])
        feats.append(peaks.float().flatten(1).sum(1, keepdim=True) * 1000.0 / (h * w))
        ch, cw = h // 4, w // 4
        feats.append(hema[:, ch : h - ch, cw : w - cw].flatten(1).mean(1, keepdim=True))
        feats.append(eosin[:, ch : h - ch, cw : w - cw].flatten(1).mean(1, keepdim=True))
        blocks = F.adaptive_avg_pool2d(hema[:, None], 4).flatten(1)
        feats.append(blocks.std(1, keepdim=True))
        for img in (gray, hema[:, None]):
            gx = img[..., :, 1:] - img[..., :, :-1]
            gy = img[..., 1:, :] - img[..., :-1, :]
            feats.append((gx.abs().flatten(1).mean(1) + gy.abs().flatten(1).mean(1))[:, None])
        lap = 4 * gray[..., 1:-1, 1:-1] - gray[..., :-2, 1:-1] - gray[..., 2:, 1:-1] - gray[..., 1:-1, :-2]
        lap = lap - gray[..., 1:-1, 2:]
        feats.append(lap.abs().flatten(1).mean(1, keepdim=True))
        feats.append(_local_std(gray, 4)[:, None])
        feats.append(_local_std(gray, 16)[:, None])
        out = torch.cat(feats, 1)
        assert out.shape[1] == N_FEATURES, out.shape
        return out.float()


#: names of :func:`token_stats`' channels
TOKEN_STAT_NAMES = (
    "r", "g", "b", "r_sd", "g_sd", "b_sd", "haematoxylin", "eosin", "dark_fraction", "gradient", "haem_sd",
)  # fmt: skip


def token_stats(x: torch.Tensor, stain_inv: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """Weight-free "tokens": colour, stain and texture statistics of every ``patch`` x ``patch`` pixel square of
    uint8 tiles ``(B, H, W, 3)``; returns float32 ``(B, H // patch, W // patch, len(TOKEN_STAT_NAMES))``."""
    rgb = (x.float() / 255.0).permute(0, 3, 1, 2)  # B,3,H,W
    od = -torch.log10((x.float() + 1.0) / 256.0)
    conc = (od @ stain_inv).clamp_min(0).permute(0, 3, 1, 2)  # B,3,H,W: haematoxylin, eosin, residual
    gray = rgb.mean(1, keepdim=True)
    # gradients inside each square only (differences across a square's edge are left out), so a token depends
    # on its own pixels alone, whatever tile it was cut from
    gx = F.pad((gray[..., :, 1:] - gray[..., :, :-1]).abs(), (0, 1))
    gy = F.pad((gray[..., 1:, :] - gray[..., :-1, :]).abs(), (0, 0, 0, 1))
    gx[..., (torch.arange(gx.shape[-1], device=x.device) % patch) == patch - 1] = 0
    gy[..., (torch.arange(gy.shape[-2], device=x.device) % patch) == patch - 1, :] = 0
    grad = gx + gy
    dark = (od.sum(-1)[:, None] > 0.6).float()

    def pool(t):
        return F.avg_pool2d(t, patch, stride=patch)

    mean = pool(rgb)
    sd = (pool(rgb * rgb) - mean * mean).clamp_min(0).sqrt()
    hm = pool(conc[:, :1])
    hsd = (pool(conc[:, :1] ** 2) - hm * hm).clamp_min(0).sqrt()
    out = torch.cat([mean, sd, hm, pool(conc[:, 1:2]), pool(dark), pool(grad), hsd], 1)
    return out.permute(0, 2, 3, 1).float()
