"""Write a small 3DHistech MIRAX (``.mrxs``) slide that OpenSlide opens, for the tests (private).

Only facts about the layout were taken, no code, from OpenSlide's reader ``src/openslide-vendor-mirax.c`` at
openslide/openslide v4.0.1 (commit fe79a9713bef2bfd64bbfefd15704060764b1274, the library openslide-bin 4.0.1
ships) and its format notes ``formats/mirax/index.md`` in openslide/openslide.github.io (commit
9ce8303106f388f140b248cd60a74c2418c146d7):

- ``name.mrxs`` (its content is not read) sits next to a folder ``name/`` holding ``Slidedat.ini``, the index
  named by ``[HIERARCHICAL] INDEXFILE`` and the data files listed in ``[DATAFILE]``.
- The slide is ``IMAGENUMBER_X x IMAGENUMBER_Y`` images of ``DIGITIZER_WIDTH x DIGITIZER_HEIGHT`` px at level 0.
  Each camera photo is cut into ``CameraImageDivisionsPerSide``² images; the photo's level-0 pixel position is
  a record of the ``VIMSLIDE_POSITION_BUFFER`` non-hierarchical item: 9 bytes, a flag byte (1: scanned) and
  x, y as little-endian int32, one per camera position in row-major order.
- Zoom level n+1 halves level n and packs 2 x 2 of its images into one image of the same size; a level's
  section (``HIER_0_VAL_n_SECTION``) gives ``IMAGE_CONCAT_FACTOR`` (the exponent of 2 added at that level,
  0 at level 0), ``MICROMETER_PER_PIXEL_X/Y`` (OpenSlide's ``openslide.mpp-x/-y`` come from level 0's),
  ``OVERLAP_X/Y``, ``IMAGE_FORMAT``, ``IMAGE_FILL_COLOR_BGR`` and the image size. ``HIER_0`` must be named
  ``Slide zoom level``.
- ``Index.dat`` is ``"01.02"`` + ``SLIDE_ID``, then little-endian int32: a pointer to the hierarchical table
  (one pointer per zoom level), a pointer to the non-hierarchical table (one per ``NONHIER_i_VAL_j``). Each
  pointer leads to a list head ``0, first page``; a page is ``n items, next page (0: last)`` and its items.
  A hierarchical item is ``image index (y * IMAGENUMBER_X + x, in level-0 image units), offset, length, file
  number``; a level-k image sits at x and y that are multiples of 2^k. A non-hierarchical item is ``0, 0,
  offset, length, file number``.
- A data file starts with ``"01.02"``, the ``SLIDE_ID``, its number in 3 digits and 256 bytes of padding.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

_VERSION = b"01.02"
_SLIDE_ID = "5a1de0c0ffee4b9f8d3a6e2b7c1f0a99"


def _halve(a: np.ndarray) -> np.ndarray:
    """2 x 2 mean, padding an odd side with white."""
    h, w = a.shape[:2]
    a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=255)
    return a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, 3).mean(axis=(1, 3))


def _jpeg(pixels: np.ndarray, size: int, quality: int) -> bytes:
    """One ``size`` x ``size`` JPEG image; parts past the level's edge are white (the fill colour)."""
    full = np.full((size, size, 3), 255, np.uint8)
    full[: pixels.shape[0], : pixels.shape[1]] = np.clip(np.rint(pixels), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(full).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _index(hier: list[list[tuple[int, int, int]]], nonhier: list[tuple[int, int]]) -> bytes:
    """Index.dat: per zoom level its ``(image index, offset, length)`` items, per non-hierarchical value its
    ``(offset, length)``; every item is in data file 0."""
    out = bytearray(_VERSION + _SLIDE_ID.encode())
    roots = len(out)
    out += bytes(8)  # the two table pointers, filled in at the end

    def put(*values: int) -> int:
        at = len(out)
        out.extend(struct.pack(f"<{len(values)}i", *values))
        return at

    def chain(items: list[tuple[int, ...]]) -> int:  # a list head pointing at one page with all the items
        page = put(len(items), 0, *(v for item in items for v in item))
        return put(0, page)

    heads = [chain([(i, offset, length, 0) for i, offset, length in level]) for level in hier]
    nonhier_heads = [chain([(0, 0, offset, length, 0)]) for offset, length in nonhier]
    struct.pack_into("<2i", out, roots, put(*heads), put(*nonhier_heads))
    return bytes(out)


def write_mirax(
    path: str | Path,
    image: np.ndarray,
    *,
    mpp: float = 0.25,
    levels: int = 3,
    tile: int = 256,
    divisions: int = 2,
    quality: int = 90,
    scanned: np.ndarray | None = None,
) -> Path:
    """Write ``image`` as a MIRAX slide: ``path`` (``.mrxs``) and the folder of the same name.

    Parameters
    ----------
    path
        The ``.mrxs`` file to write; its folder (``path`` without the suffix) must not exist.
    image
        ``(h, w, 3)`` uint8 RGB; ``h`` and ``w`` multiples of ``tile * divisions``.
    mpp
        µm per level-0 pixel, written as ``MICROMETER_PER_PIXEL_X`` / ``_Y`` (doubled at each level).
    levels
        Zoom levels; level k is the image downsampled by 2^k (2 x 2 means), stored as JPEG images.
    tile
        Side of every stored image in pixels.
    divisions
        Images per camera photo side (``CameraImageDivisionsPerSide``); one position record per photo.
    quality
        JPEG quality of the stored images.
    scanned
        ``(h, w) // (tile * divisions)`` booleans, one per camera photo in row-major order: ``False`` leaves the
        photo out (flag 0 in its position record, no level-0 image, no image at a level where every photo it
        packs is left out), as a scanner does off the tissue. Default: every photo is taken.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    if path.suffix != ".mrxs":
        raise ValueError(f"{path}: a MIRAX slide's name ends in .mrxs")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (h, w, 3) uint8, not {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    if h % (tile * divisions) or w % (tile * divisions):
        raise ValueError(f"image sides {h} x {w} must be multiples of tile * divisions = {tile * divisions}")
    nx, ny, photo = w // tile, h // tile, tile * divisions
    scanned = np.ones((h // photo, w // photo), bool) if scanned is None else np.asarray(scanned, bool)
    if scanned.shape != (h // photo, w // photo):
        raise ValueError(f"scanned must have one value per photo, shape {(h // photo, w // photo)}")
    folder = path.with_suffix("")
    folder.mkdir()

    data = bytearray(_VERSION + _SLIDE_ID.encode() + b"000" + bytes(256))
    hier = []
    pixels = image.astype(np.float64)
    imaged = scanned.repeat(divisions, 0).repeat(divisions, 1)  # per level-0 image: was its photo taken
    pixels[~imaged.repeat(tile, 0).repeat(tile, 1)] = 255  # the fill colour where no photo was taken
    for k in range(levels):
        step = 2**k  # level-0 images per side of one level-k image
        if k:
            pixels = _halve(pixels)
        items = []
        for y in range(0, ny, step):
            for x in range(0, nx, step):
                if not imaged[y : y + step, x : x + step].any():  # no photo taken in it
                    continue
                r, c = y // step * tile, x // step * tile
                jpeg = _jpeg(pixels[r : r + tile, c : c + tile], tile, quality)
                items.append((y * nx + x, len(data), len(jpeg)))
                data += jpeg
        hier.append(items)
    positions = b"".join(
        struct.pack("<Bii", int(scanned[py, px]), px * photo, py * photo)
        for py in range(ny // divisions)
        for px in range(nx // divisions)
    )
    nonhier = [(len(data), len(positions))]
    data += positions

    sections = "".join(
        f"\n[LAYER_0_LEVEL_{k}_SECTION]\nIMAGE_FORMAT=JPEG\nIMAGE_FILL_COLOR_BGR=16777215\n"
        f"DIGITIZER_WIDTH={tile}\nDIGITIZER_HEIGHT={tile}\nIMAGE_CONCAT_FACTOR={int(k > 0)}\n"
        f"OVERLAP_X=0\nOVERLAP_Y=0\nMICROMETER_PER_PIXEL_X={mpp * 2**k!r}\nMICROMETER_PER_PIXEL_Y={mpp * 2**k!r}\n"
        for k in range(levels)
    )
    zoom = "".join(
        f"HIER_0_VAL_{k}=ZoomLevel_{k}\nHIER_0_VAL_{k}_SECTION=LAYER_0_LEVEL_{k}_SECTION\n"
        for k in range(levels)
    )
    (folder / "Slidedat.ini").write_text(
        f"[GENERAL]\nSLIDE_ID={_SLIDE_ID}\nCURRENT_SLIDE_VERSION=1.9\nIMAGENUMBER_X={nx}\nIMAGENUMBER_Y={ny}\n"
        f"OBJECTIVE_MAGNIFICATION=40\nCameraImageDivisionsPerSide={divisions}\n"
        f"\n[HIERARCHICAL]\nINDEXFILE=Index.dat\nHIER_COUNT=1\nHIER_0_NAME=Slide zoom level\n"
        f"HIER_0_COUNT={levels}\n{zoom}NONHIER_COUNT=1\nNONHIER_0_NAME=VIMSLIDE_POSITION_BUFFER\n"
        f"NONHIER_0_COUNT=1\nNONHIER_0_VAL_0=default\n"
        f"\n[DATAFILE]\nFILE_COUNT=1\nFILE_0=Data0000.dat\n{sections}"
    )
    (folder / "Index.dat").write_bytes(_index(hier, nonhier))
    (folder / "Data0000.dat").write_bytes(bytes(data))
    path.write_bytes(b"")  # OpenSlide only checks that it exists
    return path
