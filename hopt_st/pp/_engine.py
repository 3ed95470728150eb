"""The inference loop behind :func:`hopt_st.pp.embed`.

uint8 batches are read while the device computes, in the order that is cheapest to read (Morton order of the
windows for patches cut from an image; results go back to table order by index): by worker processes (a
``torch.utils.data.DataLoader`` over the picklable patch source, pinned memory on CUDA), by threads (the
source's own ``iter_batches``, driven by a background thread), or, on the CPU, in the computing thread itself
(reading costs a few % of a ViT's CPU time there, and a background reader would contend with torch's
intra-op threads for the cores and with the forward pass for the GIL). Reader threads/processes and torch's
intra-op threads are sized together from the cores available, and the choice is logged. Batches cross to the
device as uint8 (non-blocking copy from pinned memory on CUDA) and are normalised there by the encoder.
Inference runs under ``torch.inference_mode`` and autocast (bf16 on CUDA by default, fp32 on CPU). With a
:class:`~hopt_st.pp._checkpoint.CheckpointStore` each finished batch is persisted, so a killed run restarts
where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time

import numpy as np
import torch

from .._patchset import ArrayPatches
from .._progress import tqdm
from ._checkpoint import CheckpointStore

logger = logging.getLogger(__name__)


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

    def __iter__(self):  # items until the end marker
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


WORKERS = ("auto", "threads", "processes")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def plan_readers(source, device: torch.device, num_workers: int | None, workers: str) -> tuple[str, int, int]:
    """How to read: ``(kind, n_readers, torch_threads)``; kind is ``"processes"``, ``"threads"`` or ``"inline"``.

    On an accelerator the CPU only reads, so readers take all cores but one (worker processes by default:
    decoding and resizing then run free of the GIL); on the CPU the model needs the cores, so by default the
    computing thread reads between batches. torch's intra-op threads are capped so that they and the readers
    together do not exceed the cores.
    """
    if workers not in WORKERS:
        raise ValueError(f"workers must be one of {WORKERS}, got {workers!r}.")
    if num_workers is not None and (isinstance(num_workers, bool) or int(num_workers) < 0):
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}.")
    cores = available_cores()
    accelerator = device.type != "cpu"
    can_fork_out = hasattr(source, "dataloader")
    if workers == "processes" and not can_fork_out:
        raise ValueError(f"workers='processes' needs a Patches source; got {type(source).__name__}.")
    if num_workers is None:
        n = min(16, max(1, cores - 1)) if accelerator or workers != "auto" else 0
    else:
        n = int(num_workers)
    if workers == "auto":
        cheap = isinstance(source, ArrayPatches)  # patches already in memory: nothing to decode
        workers = "processes" if accelerator and can_fork_out and not cheap else "threads"
    if n == 0 or (workers == "threads" and n == 1 and not accelerator):
        kind, n_busy = "inline", 0
    else:
        kind, n_busy = workers, n
    torch_threads = max(1, min(torch.get_num_threads(), cores - n_busy))
    return kind, n, torch_threads


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


def _inline_batches(source, batch_size: int, indices: np.ndarray):
    for idx, batch in source.iter_batches(batch_size, indices=indices, num_workers=0):
        yield np.asarray(idx, dtype=np.int64), torch.from_numpy(np.ascontiguousarray(batch))


def _loader_batches(loader):
    for idx, batch in loader:
        yield idx.numpy(), batch


def _prepare_model(encoder: torch.nn.Module, device: torch.device, compile: bool) -> torch.nn.Module:
    model = encoder.to(device).eval()
    if compile:  # compiled once per encoder and reused by later calls
        compiled = getattr(encoder, "_hopt_compiled", None)
        if compiled is None:
            compiled = torch.compile(model)
            object.__setattr__(encoder, "_hopt_compiled", compiled)  # not a submodule: state_dict unchanged
        model = compiled
    return model


class _Results:
    """The output array, which rows are done, the checkpoint and the progress bar."""

    def __init__(self, n: int, dim: int, ckpt: CheckpointStore | None, bar, what: str = "the encoder"):
        self.what = what
        self.out = np.zeros((n, dim), dtype=np.float32)
        self.done = np.zeros(n, dtype=bool)
        self.ckpt, self.bar, self.n_new = ckpt, bar, 0
        if ckpt is not None and ckpt.load(self.out, self.done):
            logger.info("resuming from %s: %d of %d patches already embedded", ckpt.dir, self.done.sum(), n)

    def finish(self, idx: np.ndarray, emb: np.ndarray) -> None:
        if emb.shape != (len(idx), self.out.shape[1]):
            raise RuntimeError(
                f"encoder returned {emb.shape} for a batch of {len(idx)}; expected dim {self.out.shape[1]}."
            )
        if not np.isfinite(emb).all():
            bad = int((~np.isfinite(emb)).any(axis=1).sum())
            raise ValueError(
                f"{self.what} returned NaN/inf embeddings for {bad} of the {len(idx)} patches of the batch "
                f"starting at patch {int(idx[0])}: the weights are probably corrupt (download them again) or "
                "the precision overflows (try dtype='float32'). Nothing of this batch was kept."
            )
        self.out[idx] = emb
        self.done[idx] = True
        if self.ckpt is not None:
            self.ckpt.save(idx, emb)
        self.n_new += len(idx)
        if self.bar is not None:
            self.bar.update(len(idx))


def _forward_all(model, reader, res: _Results, *, device, dtype, batch_size: int, pad: bool) -> None:
    """Run every batch of ``reader`` through ``model``; on CUDA the copy back overlaps the next batch."""
    use_cuda = device.type == "cuda"
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    pending: list = []  # CUDA: (idx, pinned host buffer, event) of batches whose copy back is in flight
    for idx, batch in reader:
        x = batch.to(device, non_blocking=use_cuda)
        n_real = x.shape[0]
        if pad and n_real < batch_size:  # one static shape for torch.compile: no recompilation at the end
            x = torch.cat([x, x.new_zeros((batch_size - n_real, *x.shape[1:]))])
        with torch.inference_mode(), autocast:
            y = model(x)[:n_real]
        if not use_cuda:
            res.finish(idx, y.float().cpu().numpy())
            continue
        host = torch.empty(tuple(y.shape), dtype=torch.float32, pin_memory=True)
        host.copy_(y.float(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        pending.append((idx, host, event))
        if len(pending) > 1:
            pidx, phost, pev = pending.pop(0)
            pev.synchronize()
            res.finish(pidx, phost.numpy().copy())
    for pidx, phost, pev in pending:
        pev.synchronize()
        res.finish(pidx, phost.numpy().copy())


def _describe(encoder) -> str:
    """'model NAME (weights FILE)' for messages."""
    spec = getattr(encoder, "spec", None)
    name = getattr(spec, "name", type(encoder).__name__)
    return f"model {name!r} (weights {getattr(encoder, 'weights_source', 'unknown')!s})"


def run_encoder(
    encoder: torch.nn.Module,
    source,
    *,
    dim: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    num_workers: int | None = None,
    workers: str = "auto",
    checkpoint: CheckpointStore | None = None,
    compile: bool = False,
    progress: bool = True,
    desc: str = "embed",
) -> np.ndarray:
    """Embed every patch of ``source``; returns ``(len(source), dim)`` float32 in patch order."""
    n = len(source)
    bar = tqdm(total=n, unit="tile", desc=desc, disable=not progress, smoothing=0.1)
    try:
        res = _Results(n, dim, checkpoint, bar, _describe(encoder))
        bar.update(int(res.done.sum()))
        todo = np.flatnonzero(~res.done)
        if len(todo) == 0:
            return res.out
        model = _prepare_model(encoder, device, compile)
        kind, n_readers, n_threads = plan_readers(source, device, num_workers, workers)
        read_order = getattr(source, "read_order", None)
        todo = read_order(todo) if read_order is not None else todo
        logger.info(
            "reading %s; torch intra-op threads %d (%d cores)",
            {"inline": "in the computing thread", "threads": f"with {n_readers} threads"}.get(
                kind, f"with {n_readers} worker processes"
            ),
            n_threads,
            available_cores(),
        )
        pin = device.type == "cuda"
        prefetcher = loader = None
        if kind == "processes":
            loader = source.dataloader(
                batch_size, indices=todo, num_workers=n_readers, pin_memory=pin, persistent_workers=False
            )
            reader = _loader_batches(loader)
        elif kind == "threads":
            reader = prefetcher = _Prefetcher(source, batch_size, todo, n_readers, pin=pin)
        else:
            reader = _inline_batches(source, batch_size, todo)
        t0 = time.perf_counter()
        try:
            with _torch_threads(n_threads):
                _forward_all(
                    model, reader, res, device=device, dtype=dtype, batch_size=batch_size, pad=compile
                )
        finally:
            if prefetcher is not None:
                prefetcher.close()
            del reader, loader  # worker processes end with their iterator
    finally:
        bar.close()
    if not res.done.all():
        raise RuntimeError(
            f"{int((~res.done).sum())} patches were not embedded (the patch source ended early)."
        )
    dt = time.perf_counter() - t0
    logger.info(
        "embedded %d patches in %.1f s (%.1f tiles/s) on %s, %s",
        res.n_new,
        dt,
        res.n_new / max(dt, 1e-9),
        device,
        dtype,
    )
    return res.out
