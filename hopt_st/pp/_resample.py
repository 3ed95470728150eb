"""Antialiased resampling of a crop to the patch size.

Downsampling integrates the source exactly over each output pixel's footprint (area / box filter, the same
filter as ``PIL.Image.BOX``); upsampling interpolates linearly between pixel centres (``PIL.Image.BILINEAR``
for enlargement). Both are separable and applied as two small matrix products, so any non-integer ratio is
handled; an exact integer reduction takes a block-mean fast path with identical results.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def resample_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float32 weights mapping ``n_in`` samples to ``n_out``; rows sum to 1."""
    w = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    if n_in >= n_out:  # area: output pixel j covers [j*scale, (j+1)*scale) of the input
        edges = np.arange(n_out + 1) * scale
        for j in range(n_out):
            a, b = edges[j], edges[j + 1]
            i0, i1 = int(np.floor(a)), min(int(np.ceil(b)), n_in)
            for i in range(i0, i1):
                w[j, i] = min(b, i + 1) - max(a, i)
    else:  # linear between pixel centres, clamped at the borders
        src = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        f = src - i0
        w[np.arange(n_out), i0] += 1 - f
        w[np.arange(n_out), i1] += f
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def resize(crop: np.ndarray, size: int) -> np.ndarray:
    """Resample a uint8 ``(h, w, 3)`` crop to ``(size, size, 3)`` uint8 with antialiasing."""
    h, w = crop.shape[:2]
    if h == size and w == size:
        return crop
    if h % size == 0 and w % size == 0:  # exact integer reduction: block mean
        fy, fx = h // size, w // size
        blocks = crop.reshape(size, fy, size, fx, crop.shape[2]).astype(np.float32)
        return _to_uint8(blocks.mean(axis=(1, 3)))
    wy = resample_weights(h, size)
    wx = resample_weights(w, size)
    c = crop.shape[2]
    tmp = wy @ crop.reshape(h, w * c).astype(np.float32)  # (size, w*c)
    tmp = tmp.reshape(size, w, c).transpose(1, 0, 2).reshape(w, size * c)
    out = (wx @ tmp).reshape(size, size, c).transpose(1, 0, 2)
    return _to_uint8(out)
