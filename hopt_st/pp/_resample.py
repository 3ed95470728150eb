"""Resampling of a spot window to the patch size: Pillow's antialiased bilinear (triangle) filter.

One filter for every ratio: ``PIL.Image.resize(..., Image.Resampling.BILINEAR)`` with no ``reducing_gap``.
Output pixel ``j`` is centred at ``(j + 0.5) * s`` source pixels (``s = n_in / n_out``) and averages the source
pixels within ``max(s, 1)`` of that centre with triangle (tent) weights. When reducing (``s > 1``) this is an
antialiasing low-pass over about ``2 s`` source pixels; when enlarging it is ordinary bilinear interpolation
between pixel centres (``align_corners=False``); at 1:1 the window is returned as it is. It is the filter of
``torch.nn.functional.interpolate(mode="bilinear", antialias=True)`` and of the encoders' own on-device resize
(equal to within 1 grey level: Pillow rounds to uint8 between its horizontal and vertical passes).

Why Pillow (measured on 2 shared cores, ``benchmarks/patches.py`` and the resize study in the project notes):

* it is the reference itself: :func:`resize` calls ``Image.resize(BILINEAR)``, and Pillow's uint8 resampling is
  fixed-point integer C code, the same on every platform, so patches, their embeddings and checkpoints agree
  across machines;
* cutting patches does not import torch (2.5 s and ~0.7 GB RSS per process, which matters with one reader
  per process) and runs no intra-op thread pool inside reader threads;
* it releases the GIL, so reader threads run in parallel;
* at 527 -> 224 px (a 0.2125 µm/px slide read at 0.5 µm/px) it costs ~1.5 ms per window. End to end from a
  JPEG-tiled TIFF that is ~240 tiles per CPU-second, against ~330 with torch's uint8 antialiased kernel (1.4x
  faster, within 1 grey level, but not the reference and platform-dependent) and ~28 with the exact-area
  matrix products used before (which matched ``cv2.INTER_AREA``, not ``PIL.Image.BOX`` as they claimed).

Resizing on the GPU was considered and not done: the source-resolution window (527 px) is 5.5x the bytes of the
224 px patch to copy to the device, the uint8 patches must exist on the host anyway (``Patches.to_numpy``,
``to_h5``), and decoding the JPEG tiles, not resizing, dominates the CPU time per tile.
"""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

#: the one resampling filter of patches
FILTER = Image.Resampling.BILINEAR
#: windows up to this many pixels keep a reusable buffer in each reading thread (about 4 bytes per pixel
#: for the Pillow image, 3 for the numpy copy): a 527 px window (0.2125 µm/px read at 0.5 µm/px) takes 1.9 MB
_REUSE_MAX_PIXELS = 1024 * 1024

_local = threading.local()


def _window_image(crop: np.ndarray) -> Image.Image:
    """A Pillow image holding ``crop``'s pixels, reusing this thread's image (and contiguous copy) of that size.

    Reuse is what makes cutting a window from an image held in memory no slower than a plain
    ``Image.fromarray(crop)``: a fresh image is allocated and zero-filled, and a non-contiguous view is first
    copied to a fresh array, both on cold memory for every window. The pixels loaded are the same, so the
    resize is the same to the bit (checked in ``tests/test_patches.py``).
    """
    h, w = crop.shape[:2]
    if h * w > _REUSE_MAX_PIXELS:
        return Image.fromarray(np.ascontiguousarray(crop))
    cached = getattr(_local, "window", None)
    if cached is None or cached[0].shape != crop.shape:
        cached = (np.empty(crop.shape, dtype=np.uint8), Image.new("RGB", (w, h), None))
        _local.window = cached
    buf, img = cached
    if not crop.flags.c_contiguous:
        np.copyto(buf, crop)
        crop = buf
    img.frombytes(crop)
    return img


def resize(crop: np.ndarray, size: int) -> np.ndarray:
    """Resample a uint8 ``(h, w, 3)`` window to ``(size, size, 3)`` uint8 with :data:`FILTER`.

    A window already of that size is returned as it is (no copy); the result of a resize may be read-only.
    """
    h, w = crop.shape[:2]
    if h == size and w == size:
        return crop
    return np.asarray(_window_image(crop).resize((size, size), FILTER))
