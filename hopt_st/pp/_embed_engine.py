"""The inference loop behind :func:`hopt_st.pp.embed`.

uint8 batches are read by a background thread (which drives the source's own parallel
``iter_batches``) while the device computes; they cross to the device as uint8 (pinned memory,
non-blocking copy on CUDA) and are normalised there by the encoder. Inference runs under
``torch.inference_mode`` and autocast (bf16 on CUDA by default, fp32 on CPU). With a checkpoint
directory each finished batch is written atomically, so a killed run restarts where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_BATCH_FILE = re.compile(r"^emb_(\d{9})\.npz$")
MANIFEST = "manifest.json"


def select_device(device=None) -> torch.device:
    """``None``/``"auto"`` -> CUDA if available, then MPS, then CPU; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def select_dtype(dtype, device: torch.device) -> torch.dtype:
    """Compute precision: explicit value, else bf16 on CUDA, fp16 on MPS, fp32 on CPU."""
    if dtype is None:
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"dtype={dtype} is not a floating compute precision (float32, bfloat16, float16)."
            )
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(set(_DTYPES))}.")
    return _DTYPES[key]


class ArrayPatches:
    """In-memory patches ``(n, P, P, 3)`` uint8 with the :class:`~hopt_st.pp.Patches` batch interface."""

    def __init__(self, array: np.ndarray, mpp: float | None = None, barcodes=None):
        array = np.asarray(array)
        if (
            array.dtype != np.uint8
            or array.ndim != 4
            or array.shape[-1] != 3
            or array.shape[1] != array.shape[2]
        ):
            raise ValueError(f"patch array must be uint8 (n, P, P, 3); got {array.dtype} {array.shape}.")
        self.array = array
        self.patch_size = int(array.shape[1])
        self.mpp = mpp
        self.barcodes = np.asarray(barcodes if barcodes is not None else np.arange(len(array)).astype(str))

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        return self.array[i]

    def iter_batches(self, batch_size, *, indices=None, num_workers=None):
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        for s in range(0, len(idx), batch_size):
            b = idx[s : s + batch_size].astype(np.int64)
            yield b, self.array[b]


class _Prefetcher:
    """Reads ``(idx, uint8 batch)`` in a background thread into a bounded queue of torch tensors."""

    _DONE = object()

    def __init__(self, source, batch_size, indices, num_workers, pin: bool, depth: int = 3):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._args = (source, batch_size, indices, num_workers, pin)
        self._thread = threading.Thread(target=self._run, name="hopt_st-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        source, batch_size, indices, num_workers, pin = self._args
        try:
            for idx, batch in source.iter_batches(batch_size, indices=indices, num_workers=num_workers):
                t = torch.from_numpy(np.ascontiguousarray(batch))
                if pin:
                    t = t.pin_memory()
                if not self._put((np.asarray(idx, dtype=np.int64), t)):
                    return
            self._put(self._DONE)
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
        self._thread.join(timeout=5)


class _Checkpoint:
    """Finished batches as ``emb_<first index>.npz`` (``idx``, ``emb``) plus a manifest with a fingerprint."""

    def __init__(self, directory, fingerprint: str, n: int, dim: int, info: dict):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / MANIFEST
        if manifest.exists():
            old = json.loads(manifest.read_text())
            if old.get("fingerprint") != fingerprint or old.get("n") != n or old.get("dim") != dim:
                raise ValueError(
                    f"checkpoint_dir {str(self.dir)!r} belongs to another run (model, weights, patch size, µm/px, "
                    f"precision or spots differ: it has {old.get('info')}, this run is {info}). Use a new "
                    "checkpoint_dir, or delete that one to start over."
                )
        else:
            _atomic_write(
                manifest, json.dumps({"fingerprint": fingerprint, "n": n, "dim": dim, "info": info}).encode()
            )
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)

    def load(self, out: np.ndarray, done: np.ndarray) -> int:
        n_files = 0
        for f in sorted(self.dir.iterdir()):
            if not _BATCH_FILE.match(f.name):
                continue
            with np.load(f) as z:
                idx, emb = z["idx"], z["emb"]
            if emb.shape != (len(idx), out.shape[1]) or (
                len(idx) and (idx.min() < 0 or idx.max() >= len(out))
            ):
                raise ValueError(
                    f"checkpoint file {str(f)!r} does not fit this run; delete the checkpoint_dir."
                )
            out[idx] = emb
            done[idx] = True
            n_files += 1
        return n_files

    def save(self, idx: np.ndarray, emb: np.ndarray) -> None:
        path = self.dir / f"emb_{int(idx[0]):09d}.npz"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, idx=idx, emb=emb)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_encoder(
    encoder: torch.nn.Module,
    source,
    *,
    dim: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    num_workers: int | None = None,
    checkpoint_dir=None,
    fingerprint: str = "",
    info: dict | None = None,
    compile: bool = False,
    progress: bool = True,
    desc: str = "embed",
) -> np.ndarray:
    """Embed every patch of ``source``; returns ``(len(source), dim)`` float32 in patch order."""
    n = len(source)
    out = np.zeros((n, dim), dtype=np.float32)
    done = np.zeros(n, dtype=bool)
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = _Checkpoint(checkpoint_dir, fingerprint, n, dim, info or {})
        n_files = ckpt.load(out, done)
        if n_files:
            logger.info("resuming from %s: %d of %d patches already embedded", checkpoint_dir, done.sum(), n)
    todo = np.flatnonzero(~done)
    if len(todo) == 0:
        return out

    model = encoder.to(device).eval()
    if compile:  # compiled once per encoder and reused by later calls
        compiled = getattr(encoder, "_hopt_compiled", None)
        if compiled is None:
            compiled = torch.compile(model)
            object.__setattr__(encoder, "_hopt_compiled", compiled)  # not a submodule: state_dict unchanged
        model = compiled
    use_cuda = device.type == "cuda"
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    reader = _Prefetcher(source, batch_size, todo, num_workers, pin=use_cuda)
    t0 = time.perf_counter()
    bar = tqdm(total=n, initial=int(done.sum()), unit="tile", desc=desc, disable=not progress, smoothing=0.1)
    n_new = 0
    pending: list = []  # CUDA: (idx, pinned host buffer, event) of batches whose copy back is in flight

    def finish(idx, emb):
        nonlocal n_new
        if emb.shape != (len(idx), dim):
            raise RuntimeError(f"encoder returned {emb.shape} for a batch of {len(idx)}; expected dim {dim}.")
        out[idx] = emb
        done[idx] = True
        if ckpt is not None:
            ckpt.save(idx, emb)
        n_new += len(idx)
        bar.update(len(idx))

    try:
        for idx, batch in reader:
            x = batch.to(device, non_blocking=use_cuda)
            n_real = x.shape[0]
            if compile and n_real < batch_size:  # keep one static shape: no recompilation for the last batch
                x = torch.cat([x, x.new_zeros((batch_size - n_real, *x.shape[1:]))])
            with torch.inference_mode(), autocast:
                y = model(x)[:n_real]
            if use_cuda:
                # copy back asynchronously; collect the previous batch while this one computes
                host = torch.empty(tuple(y.shape), dtype=torch.float32, pin_memory=True)
                host.copy_(y.float(), non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                pending.append((idx, host, event))
                if len(pending) > 1:
                    pidx, phost, pev = pending.pop(0)
                    pev.synchronize()
                    finish(pidx, phost.numpy().copy())
            else:
                finish(idx, y.float().cpu().numpy())
        for pidx, phost, pev in pending:
            pev.synchronize()
            finish(pidx, phost.numpy().copy())
    finally:
        reader.close()
        bar.close()
    if not done.all():
        raise RuntimeError(f"{int((~done).sum())} patches were not embedded (the patch source ended early).")
    dt = time.perf_counter() - t0
    logger.info(
        "embedded %d patches in %.1f s (%.1f tiles/s) on %s, %s",
        n_new,
        dt,
        n_new / max(dt, 1e-9),
        device,
        dtype,
    )
    return out
