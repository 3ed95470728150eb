"""Geometry of spot-centred patches: spots -> image pixels, pyramid level, crop boxes.

Pixel convention: pixel ``(row i, column j)`` of an image level covers ``[j, j + 1) x [i, i + 1)`` in that
level's continuous pixel frame; level ``L`` with downsample ``d`` covers ``[d j, d (j + 1))`` of level 0.
A spot centre ``(x, y)`` in level-0 pixels therefore lies at ``(x / d, y / d)`` in level ``L`` pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

#: relative tolerance when comparing a level's pixel size with the target (float noise of downsample ratios)
_MPP_RTOL = 1e-3


def apply_affine(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 3x3 affine matrix to ``(n, 2)`` points."""
    return xy @ m[:2, :2].T + m[:2, 2]


def units_per_image_px(m: np.ndarray) -> float:
    """How many shapes units one level-0 image pixel spans (inverse of the isotropic scale of ``m``)."""
    det = abs(np.linalg.det(m[:2, :2]))
    if not det > 0:
        raise ValueError("the spots-to-image transformation is singular.")
    return 1.0 / np.sqrt(det)


@dataclass(frozen=True)
class LevelChoice:
    """Pyramid level chosen for patching."""

    level: int
    downsample: tuple[float, float]  # (y, x) level-0 pixels per level pixel
    mpp: float  # µm per pixel of the chosen level (mean of axes)
    upsampling: bool


def choose_level(shapes: list[tuple[int, int]], image_mpp: float, target_mpp: float) -> LevelChoice:
    """Coarsest level whose pixel size is still at least as fine as ``target_mpp`` (level 0 if none is).

    Parameters
    ----------
    shapes
        (height, width) of each level, finest first.
    image_mpp
        µm per level-0 pixel.
    target_mpp
        Wanted µm per patch pixel.
    """
    h0, w0 = shapes[0]
    best = 0
    for i, (h, w) in enumerate(shapes):
        d = 0.5 * (h0 / h + w0 / w)
        if image_mpp * d <= target_mpp * (1 + _MPP_RTOL):
            best = i
    h, w = shapes[best]
    ds = (h0 / h, w0 / w)
    mpp = image_mpp * 0.5 * (ds[0] + ds[1])
    return LevelChoice(best, ds, mpp, upsampling=image_mpp > target_mpp * (1 + _MPP_RTOL))


def patch_boxes(
    centers_px: np.ndarray, downsample: tuple[float, float], side_level0: float
) -> tuple[np.ndarray, tuple[int, int]]:
    """Integer crop boxes on a level around level-0 pixel centres.

    The source window is ``round(side_level0 / d)`` level pixels on each axis, and its top-left corner is
    ``floor(c / d - size / 2 + 0.5)``: the window whose centre is nearest to the spot centre.

    Returns
    -------
    boxes
        ``(n, 2)`` int64 top-left ``(y0, x0)`` in level pixels.
    size
        ``(height, width)`` of every window in level pixels.
    """
    dy, dx = downsample
    sy = max(1, int(np.floor(side_level0 / dy + 0.5)))
    sx = max(1, int(np.floor(side_level0 / dx + 0.5)))
    cx = centers_px[:, 0] / dx
    cy = centers_px[:, 1] / dy
    x0 = np.floor(cx - sx / 2 + 0.5).astype(np.int64)
    y0 = np.floor(cy - sy / 2 + 0.5).astype(np.int64)
    return np.column_stack([y0, x0]), (sy, sx)


def fraction_inside(boxes: np.ndarray, size: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Fraction of each box's area inside an image of ``shape`` = (height, width)."""
    sy, sx = size
    h, w = shape
    iy = np.clip(boxes[:, 0] + sy, 0, h) - np.clip(boxes[:, 0], 0, h)
    ix = np.clip(boxes[:, 1] + sx, 0, w) - np.clip(boxes[:, 1], 0, w)
    return (iy * ix) / float(sy * sx)


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Insert a 0 bit between the bits of 32-bit ints (for Morton codes)."""
    v = v.astype(np.uint64) & 0xFFFFFFFF
    v = (v | (v << 16)) & 0x0000FFFF0000FFFF
    v = (v | (v << 8)) & 0x00FF00FF00FF00FF
    v = (v | (v << 4)) & 0x0F0F0F0F0F0F0F0F
    v = (v | (v << 2)) & 0x3333333333333333
    return (v | (v << 1)) & 0x5555555555555555


def spatial_order(boxes: np.ndarray, cell: float) -> np.ndarray:
    """Permutation visiting ``(n, 2)`` (y, x) window corners in Morton (Z) order of ``cell``-px cells.

    Consecutive windows are neighbours at every scale, so a bounded cache of decoded tiles serves each tile
    about once whatever the order of the spots in the table; ties keep the given order (stable).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 2)
    if not len(b):
        return np.zeros(0, dtype=np.int64)
    q = np.floor((b - b.min(axis=0)) / max(float(cell), 1.0)).astype(np.int64)
    code = (_spread_bits(q[:, 0]) << np.uint64(1)) | _spread_bits(q[:, 1])
    return np.argsort(code, kind="stable")
