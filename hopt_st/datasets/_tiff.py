"""A memory-bounded writer of tiled pyramidal BigTIFFs (synthetic whole-slide images for tests and demos).

The reader of such files is :func:`hopt_st.io._tiff.read_tiff_image`; this module only writes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

TileFn = Callable[[int, int, int, int], np.ndarray]


def _downsample2(a: np.ndarray) -> np.ndarray:
    """2x2 mean (odd trailing row/column dropped)."""
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    b = a[0:h:2, 0:w:2].astype(np.uint16)  # four strided views: much faster than a reshaped sum
    b += a[1:h:2, 0:w:2]
    b += a[0:h:2, 1:w:2]
    b += a[1:h:2, 1:w:2]
    b += 2
    b //= 4
    return b.astype(np.uint8)


def _level0_source(
    image: np.ndarray | None, shape: tuple[int, int] | None, tile_fn: TileFn | None
) -> tuple[int, int, TileFn]:
    """Height, width and a window reader of level 0, from either ``image`` or ``shape`` + ``tile_fn``."""
    if image is not None:
        if not isinstance(image, np.ndarray):
            raise TypeError(f"image must be a numpy array (y, x, 3) uint8; got {type(image).__name__}.")
        if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (y, x, 3) uint8; got {image.shape} {image.dtype}.")

        def from_array(y0: int, x0: int, h: int, w: int) -> np.ndarray:
            return image[y0 : y0 + h, x0 : x0 + w, :3]

        return image.shape[0], image.shape[1], from_array
    if shape is None or tile_fn is None:
        raise ValueError("write_pyramidal_tiff needs either image= or both shape= and tile_fn=.")
    if not callable(tile_fn):
        raise TypeError(
            f"tile_fn must be callable (y0, x0, h, w) -> (h, w, 3) uint8; got {type(tile_fn).__name__}."
        )
    height, width = (int(v) for v in shape)
    return height, width, tile_fn


def _level_shapes(height: int, width: int, n_levels: int | None, min_side: int) -> list[tuple[int, int]]:
    """(height, width) of each level, halving from level 0; by default until a side is below ``min_side``."""
    if n_levels is None:
        n_levels, side = 1, min(height, width)
        while side // 2 >= min_side:
            n_levels += 1
            side //= 2
    shapes = [(height, width)]
    for _ in range(1, n_levels):
        h, w = shapes[-1]
        shapes.append((h // 2, w // 2))
    if min(shapes[-1]) < 1:
        raise ValueError(f"n_levels = {n_levels} is too many for a {width} x {height} px image.")
    return shapes


class _Pyramid:
    """Tiles of every level, one band of ``tile`` rows at a time; each level is built from the one above.

    While level ``i`` is written, its 2x2 means fill a temporary memory-mapped file that is level ``i + 1``'s
    source, so memory stays bounded by a few bands whatever the slide size.
    """

    def __init__(self, path: Path, shapes: list[tuple[int, int]], tile: int, tile_fn: TileFn):
        self.shapes, self.tile, self.tile_fn = shapes, tile, tile_fn
        self.tmp = [path.with_name(f".{path.name}.level{i}.tmp") for i in range(len(shapes))]
        self.memmaps: list[np.memmap | None] = [None] * len(shapes)

    def _band(self, level: int, y0: int, h: int) -> np.ndarray:
        if level > 0:
            return np.asarray(self.memmaps[level][y0 : y0 + h])
        width = self.shapes[0][1]
        b = np.asarray(self.tile_fn(y0, 0, h, width))
        if b.shape != (h, width, 3) and b.shape[:2] == (h, width):
            b = b[..., :3]
        if b.shape != (h, width, 3):
            raise ValueError(f"tile_fn returned {b.shape}, expected {(h, width, 3)}.")
        return np.ascontiguousarray(b, dtype=np.uint8)

    def _next_level(self, level: int) -> np.memmap | None:
        if level + 1 >= len(self.shapes):
            return None
        nh, nw = self.shapes[level + 1]
        nxt = np.memmap(self.tmp[level + 1], dtype=np.uint8, mode="w+", shape=(nh, nw, 3))
        self.memmaps[level + 1] = nxt
        return nxt

    def _release(self, level: int) -> None:
        if self.memmaps[level] is not None:
            self.memmaps[level]._mmap.close()
            self.memmaps[level] = None
        self.tmp[level].unlink(missing_ok=True)

    def tiles(self, level: int) -> Iterator[np.ndarray]:
        """The ``(tile, tile, 3)`` tiles of ``level`` in row-major order, zero-padded at the edges."""
        tile = self.tile
        lh, lw = self.shapes[level]
        nxt = self._next_level(level)
        for y0 in range(0, lh, tile):
            h = min(tile, lh - y0)
            band = self._band(level, y0, h)
            if nxt is not None and h >= 2:
                small = _downsample2(band)
                ny0 = y0 // 2
                n = min(small.shape[0], nxt.shape[0] - ny0)
                nxt[ny0 : ny0 + n] = small[:n, : nxt.shape[1]]
            for x0 in range(0, lw, tile):
                t = np.zeros((tile, tile, 3), np.uint8)
                part = band[:, x0 : x0 + tile]
                t[: part.shape[0], : part.shape[1]] = part
                yield t
        if nxt is not None:
            nxt.flush()
        if level >= 1 and self.memmaps[level] is not None:
            self._release(level)

    def close(self) -> None:
        """Close and delete every temporary file left (also after an error)."""
        for level in range(len(self.shapes)):
            self._release(level)


def _page_options(
    level: int, shape: tuple[int, int], n_levels: int, tile: int, mpp: float | None, compression: str
) -> dict:
    """``tifffile.TiffWriter.write`` keywords of one level: tiles, compression, resolution, sub-IFDs."""
    opts: dict = dict(
        shape=(*shape, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression=compression
    )
    if compression == "jpeg":
        opts["compressionargs"] = {"level": 90}
    elif compression == "zlib":
        opts["compressionargs"] = {"level": 1}  # fast; still lossless
    if mpp:
        opts["resolution"] = (1e4 / mpp / 2**level, 1e4 / mpp / 2**level)
        opts["resolutionunit"] = "CENTIMETER"
    if level == 0:
        if n_levels > 1:
            opts["subifds"] = n_levels - 1
        if mpp:
            opts["metadata"] = {"mpp": float(mpp)}
    else:
        opts["subfiletype"] = 1
    return opts


def write_pyramidal_tiff(
    path: str | Path,
    image: np.ndarray | None = None,
    *,
    shape: tuple[int, int] | None = None,
    tile_fn: Callable[[int, int, int, int], np.ndarray] | None = None,
    mpp: float | None = None,
    tile: int = 256,
    n_levels: int | None = None,
    compression: str = "jpeg",
    min_side: int = 512,
) -> Path:
    """Write an RGB uint8 image as a tiled pyramidal BigTIFF (reduced levels as sub-IFDs), memory-bounded.

    The file is what whole-slide scanners and HEST-1k ship and what :func:`hopt_st.io.read_hest` reads
    lazily: level 0 as the first page, then each coarser level (2x2 means of the previous one) as a
    reduced-resolution sub-IFD (``subfiletype=1``), all tiled ``tile`` x ``tile`` px, photometric RGB.
    With ``mpp`` the pages carry the TIFF resolution (pixels per cm, halving per level) and level 0's
    description holds ``{"mpp": mpp}`` (tifffile's JSON metadata).

    Parameters
    ----------
    path
        Output file (overwritten). Temporary ``.<name>.level<i>.tmp`` files are written next to it while
        it is built and removed afterwards.
    image
        ``(y, x, 3)`` uint8 array, or ``None`` with ``shape`` and ``tile_fn``.
    shape
        ``(height, width)`` of level 0 when ``tile_fn`` is used.
    tile_fn
        ``tile_fn(y0, x0, h, w) -> (h, w, 3) uint8``: pixels of a level-0 window, called one band of
        ``tile`` rows at a time. Coarser levels are built from temporary memory-mapped files next to
        ``path``, so memory stays bounded by a few bands whatever the slide size.
    mpp
        µm per pixel of level 0, written as the TIFF resolution; ``None`` writes no resolution.
    tile
        Tile side in px (multiple of 16).
    n_levels
        Number of levels; default halves until a side is below ``min_side``.
    compression
        Tile compression: ``"jpeg"`` (quality 90) or ``"zlib"`` (lossless); other names go to tifffile as
        they are.
    min_side
        Smallest level side when ``n_levels`` is None.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    if tile % 16:
        raise ValueError(f"tile = {tile}: TIFF tiles must be a multiple of 16 px.")
    height, width, tile_fn = _level0_source(image, shape, tile_fn)
    shapes = _level_shapes(height, width, n_levels, min_side)
    pyramid = _Pyramid(path, shapes, tile, tile_fn)
    try:
        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            for level, lshape in enumerate(shapes):
                tw.write(
                    pyramid.tiles(level), **_page_options(level, lshape, len(shapes), tile, mpp, compression)
                )
    finally:
        pyramid.close()
    return path
