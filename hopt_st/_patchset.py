"""Patch sets: the :class:`Patches` sequence and HEST's patch ``.h5`` file format (reader and writer).

A leaf module: ``io`` (which reads patch files) and ``pp`` (which cuts patches from images) both build on it,
and it imports neither.

HEST's patch files
------------------
::

    img      (n, P, P, 3) uint8     the patches
    coords   (n, 2) int             top-left corner (x, y) of each patch in full-resolution (level-0) pixels
    barcode  (n, 1) bytes           spot barcode

For a spot centred at ``c`` (level-0 pixels, ``(x, y)`` as in ``adata.obsm["spatial"]``) and a patch covering
``patch_size_src`` level-0 pixels (a float: ``target_patch_size * target_pixel_size / wsi_pixel_size``), HEST
writes ``coords = int(c - patch_size_src // 2)`` (``HESTData.dump_patches`` in github.com/mahmoodlab/HEST
``src/hest/HESTData.py``; ``WSIPatcher.get_tile`` returns the "pixel x/y of top-left corner (before
rescaling)"). The centre is therefore ``coords + floor(patch_size_src / 2)`` (exact for integer centres,
otherwise up to 1 px below the true centre because of the truncation).

HEST's pinned patcher (``hestcore`` 1.0.4, ``WSIPatcher.to_h5``; 1.0.3 is identical) records on ``img``:

``patch_size_src``
    ``round(P * downsample)``: the side, in level-0 pixels, of the window read and resized to ``P``.
``patch_size_target``
    ``P``.
``downsample``
    target µm/px over the **slide's** µm/px (unrounded).
``pixel_size``
    the **slide's** level-0 µm/px (``src_pixel_size``), not the patches'.

so the patches' own µm/px is ``pixel_size * patch_size_src / patch_size_target`` (what the resized pixels hold)
and the unrounded level-0 side HEST offset the corners by is ``patch_size_target * downsample``. Older HEST files
(2024) carry no such attributes; :func:`read_patches` then assumes full-resolution 0.5 µm/px patches.

hopt_st writes the same ``img`` attributes with the same meaning; with ``hopt_st_fields`` it adds a ``centers``
dataset ((n, 2) float64, exact spot centres) and, on the file root, ``hopt_st_patch_mpp`` and
``hopt_st_patch_size_src`` (the unrounded values). HEST readers ignore what they do not know.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from ._atomic import atomic_path
from ._docs import entries, inject_docs
from ._errors import CorruptFileError
from ._h5 import ExternalDataError, open_h5

logger = logging.getLogger(__name__)

#: µm per pixel assumed for a patch file that records none (HEST-Benchmark patches are 0.5 µm/px)
HEST_PATCH_MPP = 0.5
#: attributes that, in HEST-style files, record the patch side in level-0 px
PATCH_SIZE_SRC_ATTRS = ("patch_size_src", "patch_size_level0")
#: bytes of a patch file besides its arrays (HDF5 headers, chunk index), for the free-space check
_H5_OVERHEAD = 1 << 16
#: the parameters that choose the batches of Patches.iter_batches and Patches.dataloader
_BATCH_PARAMS = entries(
    8,
    batch_size="Patches per batch.",
    indices="Which patches (int array, slice or boolean mask); all by default.",
)
#: patches hashed into the fingerprint of a patch file (evenly spaced), besides its size and mtime
_DIGEST_PATCHES = 8
#: exceptions h5py raises on a truncated or garbled file
_H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)


def default_workers() -> int:
    """Default number of reading threads: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


# ----------------------------------------------------------------------------------------------------------
# HEST's corner convention
# ----------------------------------------------------------------------------------------------------------
def hest_half(patch_size_src: float) -> float:
    """HEST's corner-to-centre offset ``patch_size_src // 2`` (level-0 px)."""
    if not np.isfinite(patch_size_src) or patch_size_src <= 0:
        raise ValueError(
            f"patch_size_src must be a positive number of level-0 pixels, got {patch_size_src!r}."
        )
    return float(np.floor(float(patch_size_src) / 2.0))


def hest_topleft(centers: np.ndarray, patch_size_src: float) -> np.ndarray:
    """``(n, 2)`` int64 top-left (x, y) corners exactly as HEST computes them from spot centres."""
    tl = np.asarray(centers, dtype=np.float64) - hest_half(patch_size_src)
    return np.trunc(tl).astype(np.int64)


def hest_centers(coords: np.ndarray, patch_size_src: float) -> np.ndarray:
    """``(n, 2)`` float64 spot centres implied by HEST ``coords`` (inverse of :func:`hest_topleft`)."""
    return np.asarray(coords, dtype=np.float64) + hest_half(patch_size_src)


def h5_attr(f: h5py.File, names: tuple[str, ...]):
    """The first of ``names`` found in the attributes of ``coords``, then ``img``, then the file; else ``None``."""
    for obj in (f.get("coords"), f.get("img"), f):
        if obj is None:
            continue
        for name in names:
            if name in obj.attrs:
                return obj.attrs[name]
    return None


def _scalar(value) -> float:
    return float(np.ravel(value)[0])


def recorded_patch_size_src(f: h5py.File, patch_size: int) -> float | None:
    """The unrounded patch side in level-0 px that a patch file records, the one HEST offsets its corners by:
    hopt_st's exact value, else ``patch_size * downsample`` (hestcore's ``patch_size_src`` attribute is rounded),
    else a recorded ``patch_size_src``; ``None`` when the file records none."""
    exact = h5_attr(f, ("hopt_st_patch_size_src",))
    if exact is not None:
        return _scalar(exact)
    down = h5_attr(f, ("downsample",))
    if down is not None:
        return patch_size * _scalar(down)
    src = h5_attr(f, PATCH_SIZE_SRC_ATTRS)
    return None if src is None else _scalar(src)


def recorded_mpp(f: h5py.File, patch_size: int) -> tuple[float | None, float | None]:
    """``(patch µm/px, slide µm/px)`` a patch file records, each ``None`` when unknown.

    hestcore's ``pixel_size`` is the slide's µm/px; the patches hold ``pixel_size * patch_size_src /
    patch_size_target`` µm/px. hopt_st's files record the patches' exact value too; hopt_st files written before
    hestcore's meaning was adopted (with ``level0_pixel_size``) stored the patches' µm/px as ``pixel_size``."""
    exact = h5_attr(f, ("hopt_st_patch_mpp",))
    slide = h5_attr(f, ("pixel_size",))
    legacy = h5_attr(f, ("level0_pixel_size",))
    if legacy is not None:  # older hopt_st file: pixel_size was the patches' µm/px
        return (None if slide is None else _scalar(slide)), _scalar(legacy)
    slide = None if slide is None else _scalar(slide)
    if exact is not None:
        return _scalar(exact), slide
    if slide is None:
        return None, None
    src = h5_attr(f, ("patch_size_src",))
    target = h5_attr(f, ("patch_size_target",))
    src = _scalar(src) if src is not None else recorded_patch_size_src(f, patch_size)
    target = _scalar(target) if target is not None else float(patch_size)
    if src is None:
        return None, slide
    return slide * src / target, slide


def decode_barcodes(raw) -> np.ndarray:
    """Barcodes of a patch file's ``barcode`` dataset ((N,) or (N, 1), bytes or str) as an array of str."""
    raw = np.asarray(raw)
    raw = raw.reshape(len(raw), -1)[:, 0]
    return np.array([b.decode() if isinstance(b, bytes) else str(b) for b in raw])


# ----------------------------------------------------------------------------------------------------------
# the Patches sequence
# ----------------------------------------------------------------------------------------------------------
class Patches:
    """A lazy, indexable sequence of uint8 ``(patch_size, patch_size, 3)`` RGB patches, one per spot.

    Nothing is read until patches are asked for. Works as a map-style ``torch.utils.data.Dataset``
    (``len`` and integer indexing), but :meth:`iter_batches` is much faster: it reads whole batches in
    parallel threads with bounded prefetch.

    Parameters
    ----------
    barcodes
        Spot ids, in patch order.
    centers
        ``(n, 2)`` (x, y) spot centres in full-resolution pixels, or ``None`` when unknown (e.g. an array of
        patches without coordinates).
    patch_size
        Side of every patch in pixels.
    mpp
        µm per patch pixel, or ``None`` when unknown.
    patch_size_src
        Side of every patch in full-resolution pixels, or ``None`` when unknown.

    Attributes
    ----------
    barcodes : numpy.ndarray of str
    centers : numpy.ndarray or None
    patch_size : int
    mpp : float or None
    patch_size_src : float or None
    """

    def __init__(
        self,
        barcodes,
        centers: np.ndarray | None,
        patch_size: int,
        mpp: float | None,
        patch_size_src: float | None,
    ):
        self.barcodes = np.asarray(barcodes).astype(str)
        self.centers = None if centers is None else np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        self.patch_size = int(patch_size)
        self.mpp = None if mpp is None else float(mpp)
        self.patch_size_src = None if patch_size_src is None else float(patch_size_src)
        if self.centers is not None and len(self.barcodes) != len(self.centers):
            raise ValueError(f"{len(self.barcodes)} barcodes but {len(self.centers)} centres.")

    # -- to be provided by subclasses ---------------------------------------------------------------
    def _read(self, idx: np.ndarray) -> np.ndarray:
        """``(len(idx), P, P, 3)`` uint8 patches for valid, non-negative indices ``idx``."""
        raise NotImplementedError

    def _source_id(self) -> str:
        """What the pixels come from (file, image element and crop boxes, ...), for :meth:`fingerprint`."""
        return type(self).__name__

    def _reading_in_processes(self, n_processes: int) -> None:
        """Called in each of ``n_processes`` reader processes before it reads (e.g. to split a cache budget)."""

    # -- identity -----------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 of what determines these patches: spots (ids, centres), size, µm/px and the pixel source.

        Two patch sets with the same fingerprint hold the same patches, so embeddings computed from one
        (e.g. a checkpoint) may be reused for the other.
        """
        h = hashlib.sha256()
        h.update("\n".join(self.barcodes.tolist()).encode())
        if self.centers is not None:
            h.update(np.ascontiguousarray(self.centers).tobytes())
        h.update(repr((self.patch_size, self.mpp, self.patch_size_src)).encode())
        h.update(self._source_id().encode())
        return h.hexdigest()

    # -- sequence interface -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.barcodes)

    def __repr__(self) -> str:  # one line: sizes and pixel scale
        mpp = "?" if self.mpp is None else f"{self.mpp:g}"
        src = "?" if self.patch_size_src is None else f"{self.patch_size_src:.1f}"
        return (
            f"{type(self).__name__}(n={len(self)}, patch_size={self.patch_size}, mpp={mpp}, "
            f"patch_size_src={src} full-res px)"
        )

    def _indices(self, key) -> np.ndarray:
        n = len(self)
        if isinstance(key, slice):
            return np.arange(n, dtype=np.int64)[key]
        idx = np.asarray(key)
        if idx.size == 0:
            return np.empty(0, dtype=np.int64)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {n} patches.")
            return np.flatnonzero(idx).astype(np.int64)
        if idx.dtype.kind not in "iu":
            raise IndexError(
                f"patches are indexed by int, slice, int array or boolean mask, not {idx.dtype}."
            )
        idx = idx.astype(np.int64).ravel()
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"patch index out of range for {n} patches.")
        return np.where(idx < 0, idx + n, idx)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._read(self._indices([int(key)]))[0]
        return self._read(self._indices(key))

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, batch in self.iter_batches(64):
            yield from batch

    def read_order(self, indices=None) -> np.ndarray:
        """The patches ``indices`` (all by default) in the order that is cheapest to read.

        Patches cut from an image come in Morton order of their windows, so that neighbouring spots share
        decoded tiles whatever the order of the table; other sources keep the given order. Readers that use it
        put results back by index (as :meth:`to_numpy` and :func:`hopt_st.pp.embed` do).
        """
        return self._indices(slice(None) if indices is None else indices)

    @inject_docs(batch_params=_BATCH_PARAMS)
    def iter_batches(
        self, batch_size: int = 64, *, indices=None, num_workers: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(idx, batch)`` in order: ``idx`` int64 ``(B,)``, ``batch`` uint8 ``(B, P, P, 3)``.

        Parameters
        ----------
        {batch_params}
        num_workers
            Reading threads; at most ``2 * num_workers`` batches are in flight (memory bounded).
            ``None``: ``min(8, cpu count)``; ``0`` or ``1``: read in the calling thread.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        idx = self._indices(slice(None) if indices is None else indices)
        chunks = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        nw = default_workers() if num_workers is None else int(num_workers)
        if nw <= 1 or len(chunks) <= 1:
            for c in chunks:
                yield c, self._read(c)
            return
        pool = ThreadPoolExecutor(max_workers=nw, thread_name_prefix="hopt_st-patches")
        pending: deque = deque()
        it = iter(chunks)
        try:
            for c in it:
                pending.append((c, pool.submit(self._read, c)))
                if len(pending) >= 2 * nw:
                    break
            while pending:
                c, fut = pending.popleft()
                batch = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self._read, nxt)))
                yield c, batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    @inject_docs(batch_params=_BATCH_PARAMS)
    def dataloader(
        self,
        batch_size: int = 64,
        *,
        indices=None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        multiprocessing_context=None,
        prefetch_factor: int = 2,
    ):
        """A ``torch.utils.data.DataLoader`` reading batches in worker processes: yields ``(idx, batch)``.

        ``idx`` is an int64 tensor ``(B,)`` of patch indices and ``batch`` a uint8 tensor ``(B, P, P, 3)``.
        Batches follow :meth:`read_order` (not the table order: put results back by ``idx``), and each worker
        reads a contiguous run of them, so a worker's tiles stay in its own cache. The patch source is pickled
        to the workers and reopens its files there, so every start method works (``"fork"``, ``"spawn"``,
        ``"forkserver"``); with ``persistent_workers`` (the default) the workers, their open files and caches
        live as long as the loader, across iterations.

        Parameters
        ----------
        {batch_params}
        num_workers
            Worker processes; ``None``: ``min(8, cpu count)``; ``0`` reads in the calling process.
        pin_memory
            Page-locked batches for fast copies to the GPU; default: when CUDA is available.
        persistent_workers
            Keep the workers between iterations of the loader.
        multiprocessing_context
            Start method (``"fork"``, ``"spawn"``, ``"forkserver"``); default: the platform's.
        prefetch_factor
            Batches each worker reads ahead.
        """
        import torch
        from torch.utils.data import DataLoader

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        idx = self.read_order(indices)
        chunks = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        nw = default_workers() if num_workers is None else int(num_workers)
        if nw < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        nw = min(nw, len(chunks))
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        return DataLoader(
            _BatchDataset(self, chunks, nw),
            batch_size=None,
            sampler=_worker_runs(len(chunks), nw),
            num_workers=nw,
            pin_memory=bool(pin_memory),
            persistent_workers=bool(persistent_workers) and nw > 0,
            multiprocessing_context=multiprocessing_context if nw > 0 else None,
            prefetch_factor=prefetch_factor if nw > 0 else None,
            worker_init_fn=_BatchDataset.worker_init if nw > 0 else None,
        )

    def to_numpy(self, *, num_workers: int | None = None) -> np.ndarray:
        """All patches as one ``(n, P, P, 3)`` uint8 array (read in :meth:`read_order`)."""
        out = np.empty((len(self), self.patch_size, self.patch_size, 3), dtype=np.uint8)
        for idx, batch in self.iter_batches(128, indices=self.read_order(), num_workers=num_workers):
            out[idx] = batch
        return out

    @property
    def coords(self) -> np.ndarray:
        """``(n, 2)`` int64 top-left (x, y) corners in full-resolution pixels, computed as HEST does
        (``int(center - patch_size_src // 2)``)."""
        if self.centers is None or self.patch_size_src is None:
            raise ValueError(f"{self!r} has no spot centres / patch_size_src, so it has no HEST coords.")
        return hest_topleft(self.centers, self.patch_size_src)

    def to_h5(
        self, path: str | os.PathLike, *, overwrite: bool = False, num_workers: int | None = None
    ) -> None:
        """Write the patches in HEST's patch .h5 format, see :func:`write_patches_h5`."""
        write_patches_h5(self, path, overwrite=overwrite, num_workers=num_workers)


def _worker_runs(n_batches: int, n_workers: int) -> list[int]:
    """Batch order for a DataLoader whose workers take items round-robin: worker ``w`` gets the ``w``-th
    contiguous run of batches (neighbouring batches share tiles, so they stay in one worker's cache)."""
    if n_workers <= 1:
        return list(range(n_batches))
    runs = np.array_split(np.arange(n_batches), n_workers)
    order = []
    for j in range(max(len(r) for r in runs)):
        order.extend(int(r[j]) for r in runs if j < len(r))
    return order


class _BatchDataset:
    """Map-style dataset of whole batches of a :class:`Patches` (item ``k``: ``(idx, patches)``); picklable."""

    def __init__(self, source: Patches, chunks: list[np.ndarray], n_workers: int):
        self.source, self.chunks, self.n_workers = source, chunks, n_workers

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.chunks[k]
        return c, self.source._read(c)

    @staticmethod
    def worker_init(worker_id: int) -> None:
        import torch

        info = torch.utils.data.get_worker_info()
        ds = info.dataset
        ds.source._reading_in_processes(ds.n_workers)


class ArrayPatches(Patches):
    """In-memory patches: a uint8 ``(n, P, P, 3)`` array as a :class:`Patches` sequence.

    Parameters
    ----------
    array
        The patches.
    mpp
        µm per patch pixel, if known.
    barcodes
        Spot ids; default ``"0"``, ``"1"``, ...
    centers
        ``(n, 2)`` spot centres in full-resolution pixels, if known.
    patch_size_src
        Patch side in full-resolution pixels, if known.
    """

    def __init__(
        self, array: np.ndarray, mpp: float | None = None, barcodes=None, centers=None, patch_size_src=None
    ):
        array = np.asarray(array)
        if (
            array.dtype != np.uint8
            or array.ndim != 4
            or array.shape[-1] != 3
            or array.shape[1] != array.shape[2]
        ):
            hint = (
                " It looks channels-first: transpose it to (n, P, P, 3), e.g. array.transpose(0, 2, 3, 1)."
                if array.ndim == 4 and array.shape[1] in (3, 4) and array.shape[2] == array.shape[3]
                else ""
            )
            raise ValueError(
                f"patch array must be uint8 (n, P, P, 3); got {array.dtype} {array.shape}.{hint}"
            )
        if barcodes is None:
            barcodes = np.arange(len(array)).astype(str)
        super().__init__(barcodes, centers, array.shape[1], mpp, patch_size_src)
        if len(self.barcodes) != len(array):
            raise ValueError(f"{len(self.barcodes)} barcodes for {len(array)} patches.")
        self.array = array

    def _read(self, idx: np.ndarray) -> np.ndarray:
        return self.array[idx]

    def _source_id(self) -> str:
        return "array:" + hashlib.sha256(np.ascontiguousarray(self.array).data).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# HEST patch files
# ----------------------------------------------------------------------------------------------------------
def write_patches_h5(
    patches: Patches,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    num_workers: int | None = None,
    hopt_st_fields: bool = True,
) -> Path:
    """Write ``patches`` to ``path`` in HEST's patch format (see the module docstring).

    Parameters
    ----------
    patches
        The patches; they need spot centres and ``patch_size_src`` (for HEST's ``coords``).
    path
        Output ``.h5`` file, written under a temporary name and renamed when complete.
    overwrite
        Replace an existing file.
    num_workers
        Reading threads (see :meth:`Patches.iter_batches`).
    hopt_st_fields
        Also write hopt_st's ``centers`` dataset and exact values (``hopt_st_patch_mpp``,
        ``hopt_st_patch_size_src`` on the file root); ``False`` writes what hestcore 1.0.4's patcher writes.

    Returns
    -------
    pathlib.Path
        ``path``, holding datasets ``img`` (with hestcore's attributes ``patch_size_src``, ``patch_size_target``,
        ``downsample`` and, when the patches' µm/px is known, ``pixel_size``: the slide's µm/px), ``coords``,
        ``barcode`` (and ``centers``).
    """
    n, p = len(patches), patches.patch_size
    coords = patches.coords
    encoded = [b.encode() for b in patches.barcodes]
    barcodes = np.array(encoded, dtype=f"S{max([1] + [len(b) for b in encoded])}")
    expected = n * p * p * 3 + n * (16 + 16 + barcodes.itemsize) + _H5_OVERHEAD
    # checked against the free space first (HDF5 handles a full disk badly), written under a temporary name,
    # fsynced and renamed: a failure leaves no partial file and an existing file untouched
    with atomic_path(path, overwrite=overwrite, what="patch file", expected_bytes=expected) as tmp:
        _write_h5(tmp, patches, coords, barcodes, hopt_st_fields, num_workers, final=Path(path))
    logger.info("Wrote %d patches to %s.", n, path)
    return Path(path)


def _write_h5(tmp: Path, patches: Patches, coords, barcodes, hopt_st_fields: bool, num_workers, final: Path):
    """The HDF5 writing of :func:`write_patches_h5`, into ``tmp``.

    A write error (a full disk) leaves HDF5 in a state where freeing a dataset object after its file was
    closed crashes the process (segfault): ``img`` is contiguous (no chunk cache holding unwritten data), and on
    any error every h5py object is released *before* the file is closed and the error is re-raised as a plain
    ``OSError`` that holds no reference to them.
    """
    n, p = len(patches), patches.patch_size
    src = float(patches.patch_size_src)
    # hestcore 1.0.4 WSIPatcher: downsample = dst / src µm/px, patch_size_src = round(P * downsample),
    # pixel_size = the slide's (src) µm/px
    img_attrs = {"patch_size_src": int(round(src)), "patch_size_target": p, "downsample": src / p}
    if patches.mpp is not None:
        img_attrs["pixel_size"] = float(patches.mpp) * p / src
    f = h5py.File(tmp, "w")
    failure = None
    try:
        img = f.create_dataset("img", shape=(n, p, p, 3), dtype=np.uint8)  # contiguous: no chunk cache
        img.attrs.update(img_attrs)
        f.create_dataset("coords", data=coords)
        f.create_dataset("barcode", data=barcodes.reshape(-1, 1))
        if hopt_st_fields:
            f.create_dataset("centers", data=patches.centers)
            f.attrs["hopt_st_patch_size_src"] = src
            if patches.mpp is not None:
                f.attrs["hopt_st_patch_mpp"] = float(patches.mpp)
        for idx, batch in patches.iter_batches(256, indices=patches.read_order(), num_workers=num_workers):
            o = np.argsort(idx)  # read in spatial order, written by index (h5py wants increasing indices)
            img[idx[o]] = batch[o]
    except Exception as e:  # noqa: BLE001 - re-raised below as an OSError naming the file
        failure = (type(e), str(e), getattr(e, "errno", None))
    if failure is not None:  # give HDF5 room to flush and close cleanly: the file is deleted anyway
        with contextlib.suppress(Exception):
            os.ftruncate(f.id.get_vfd_handle(), 0)
    img = None  # noqa: F841 - release the dataset while the file is open
    try:
        f.close()
    except Exception as e:  # noqa: BLE001 - flushing on close fails on a full disk too
        failure = failure or (type(e), str(e), getattr(e, "errno", None))
    f = None
    if failure is not None:
        kind, msg, code = failure
        if not issubclass(kind, OSError) and kind.__module__.split(".")[0] == "hopt_st":
            raise kind(msg)
        raise OSError(
            code,
            f"writing patch file {str(final)!r} failed ({kind.__name__}: {' '.join(msg.split())[:300]}); nothing "
            "was written there. Free some disk space or write it elsewhere",
        )


class _H5Patches(Patches):
    """Patches read lazily from a HEST patch .h5 file."""

    def __init__(self, path, img_key: str, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        self._img_key = img_key
        self._lock = threading.Lock()
        self._file: h5py.File | None = None
        self._pid = None

    def _source_id(self) -> str:
        """The file (path, size, mtime) and a digest of a few evenly spaced patches: a file replaced by
        another of the same size (or with its mtime preserved) is still told apart."""
        st = self.path.stat()
        h = hashlib.sha256()
        if len(self):
            sample = np.unique(
                np.linspace(0, len(self) - 1, min(len(self), _DIGEST_PATCHES)).astype(np.int64)
            )
            h.update(np.ascontiguousarray(self._read(sample)).data)
        return f"h5:{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{h.hexdigest()}"

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = open_h5(self.path)  # refuses data from outside the file (rule 4)
            self._pid = os.getpid()
        return self._file

    def _read(self, idx: np.ndarray) -> np.ndarray:
        if len(idx) == 0:
            return np.empty((0, self.patch_size, self.patch_size, 3), dtype=np.uint8)
        order = np.argsort(idx, kind="stable")
        uniq, inverse = np.unique(idx[order], return_inverse=True)
        with self._lock:
            try:
                ds = self._handle()[self._img_key]
                if len(uniq) == uniq[-1] - uniq[0] + 1:
                    data = ds[int(uniq[0]) : int(uniq[-1]) + 1]
                else:
                    data = ds[uniq]
            except ExternalDataError:
                raise
            except _H5_ERRORS as e:
                raise _corrupt_h5(self.path, e, f"reading patches {int(uniq[0])}..{int(uniq[-1])}") from None
        out = np.empty((len(idx), self.patch_size, self.patch_size, 3), dtype=np.uint8)
        out[order] = data[inverse]
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def read_patches(path: str | os.PathLike) -> Patches:
    """Open a HEST patch .h5 file (HEST's own or written by :meth:`Patches.to_h5`) as lazy :class:`Patches`.

    Parameters
    ----------
    path
        The .h5 file with datasets ``img`` (n, P, P, 3) uint8, ``coords`` (n, 2) top-left (x, y) in
        full-resolution pixels and ``barcode``.

    Returns
    -------
    Patches
        Same interface as :func:`hopt_st.pp.patches`' result; ``centers`` are HEST's
        ``coords + patch_size_src // 2`` (with the unrounded ``patch_size_target * downsample``) unless the file
        stores exact ``centers``; ``mpp`` is hestcore's ``pixel_size * patch_size_src / patch_size_target``
        (``pixel_size`` being the slide's µm/px, see the module docstring). A file recording no size attributes
        (HEST's 2024 files) is taken to be cut at full resolution at 0.5 µm/px (HEST-Benchmark's).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"patch file {str(path)!r} not found.")
    try:
        with open_h5(path) as f:  # refuses data from outside the file (rule 4)
            raw = _read_raw_fields(f)
    except ExternalDataError:
        raise
    except _H5_ERRORS as e:  # h5py's own errors name neither the file nor the fix
        raise _corrupt_h5(path, e, "reading it") from None
    return _check_patch_fields(raw, path)


def _corrupt_h5(path: Path, e: BaseException, doing: str) -> CorruptFileError:
    return CorruptFileError.from_error(
        path,
        e,
        what="patch file",
        fix=f"{doing} failed. Copy or download it again, or write it again with Patches.to_h5.",
    )


def _read_raw_fields(f: h5py.File) -> dict:
    """Everything :func:`read_patches` needs from an open file, unchecked (reads only, raises h5py's errors)."""
    raw: dict = {"keys": list(f.keys())}
    img_key = next((k for k in ("img", "imgs", "images") if k in f), None)
    if img_key is None or "coords" not in f:
        return raw
    ds = f[img_key]
    raw.update(img_key=img_key, shape=ds.shape, dtype=ds.dtype, coords=np.asarray(f["coords"][:]))
    if ds.ndim != 4:
        return raw
    if ds.shape[0]:
        ds[ds.shape[0] - 1]  # the last patch: a truncated file fails here, not at embedding time
    bkey = next((k for k in ("barcode", "barcodes") if k in f), None)
    raw["barcodes"] = None if bkey is None else decode_barcodes(f[bkey][:])
    raw["src"] = recorded_patch_size_src(f, ds.shape[1])
    raw["mpp"] = recorded_mpp(f, ds.shape[1])[0]
    raw["centers"] = np.asarray(f["centers"][:], dtype=np.float64) if "centers" in f else None
    return raw


def _check_patch_fields(raw: dict, path: Path) -> Patches:
    """The lazy patches of a file read by :func:`_read_raw_fields`, after checking what it holds."""
    if "img_key" not in raw:
        raise ValueError(
            f"{path} is not a HEST patch file: it needs datasets 'img' and 'coords' (it has {raw['keys']})."
        )
    img_key, shape, dtype = raw["img_key"], raw["shape"], raw["dtype"]
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or dtype != np.uint8:
        raise ValueError(
            f"{path}: dataset {img_key!r} has shape {shape} and dtype {dtype}; expected (n, P, P, 3) uint8."
        )
    n, p = shape[0], shape[1]
    coords = np.asarray(raw["coords"], dtype=np.float64)
    if (
        coords.ndim != 2
        or coords.shape[0] != n
        or coords.shape[1] < 2
        or not np.isfinite(coords[:, :2]).all()
    ):
        raise ValueError(
            f"patch file {str(path)!r}: 'coords' must hold {n} finite (x, y) rows, one per patch (it has shape "
            f"{coords.shape}). Write the file again."
        )
    coords = coords[:, :2]
    barcodes = raw["barcodes"]
    if barcodes is None:
        barcodes = np.array([str(i) for i in range(n)])
        logger.info("%s has no 'barcode' dataset; patches are named by row number.", path)
    if len(barcodes) != n:
        raise ValueError(f"patch file {str(path)!r} has {len(barcodes)} barcodes for {n} patches.")
    check_unique_barcodes(barcodes, f"patch file {str(path)!r}")
    src = raw["src"]
    if src is None:
        src = float(p)
        logger.info("%s records no patch_size_src/downsample; assuming patches at full resolution.", path)
    mpp = raw["mpp"]
    if mpp is None:
        mpp = HEST_PATCH_MPP
        logger.info("%s records no pixel size; assuming %g µm/px patches.", path, HEST_PATCH_MPP)
    if not (np.isfinite(src) and src > 0 and np.isfinite(mpp) and mpp > 0):
        raise ValueError(
            f"patch file {str(path)!r} records a patch side of {src!r} full-resolution px and {mpp!r} µm/px; "
            "both must be positive numbers. Write the file again."
        )
    centers = raw["centers"] if raw["centers"] is not None else hest_centers(coords, src)
    if centers.shape != (n, 2) or not np.isfinite(centers).all():
        raise ValueError(f"patch file {str(path)!r}: 'centers' must hold {n} finite (x, y) rows.")
    return _H5Patches(
        path, img_key, barcodes=barcodes, centers=centers, patch_size=p, mpp=mpp, patch_size_src=src
    )


def check_unique_barcodes(barcodes, where: str) -> None:
    """Refuse duplicate spot barcodes (a patch would be paired with another spot's counts).

    Parameters
    ----------
    barcodes
        The barcodes, in file order.
    where
        The file (or table) they come from, for the message.
    """
    values, counts = np.unique(np.asarray(barcodes).astype(str), return_counts=True)
    dup = values[counts > 1]
    if dup.size:
        raise ValueError(
            f"{where} has {dup.size} duplicate barcode(s) (e.g. {dup[:3].tolist()}): each spot must appear "
            "once, or patches and counts get paired with the wrong spot. Remove the duplicates, or make the "
            "barcodes unique (e.g. AnnData.obs_names_make_unique()) where both files agree on it."
        )
