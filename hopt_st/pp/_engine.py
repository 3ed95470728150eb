"""The inference loop behind :func:`hopt_st.pp.embed`.

uint8 batches are read by a background thread (which drives the source's own parallel ``iter_batches``)
while the device computes; they cross to the device as uint8 (pinned memory, non-blocking copy on CUDA) and
are normalised there by the encoder. Inference runs under ``torch.inference_mode`` and autocast (bf16 on CUDA
by default, fp32 on CPU). With a :class:`~hopt_st.pp._checkpoint.CheckpointStore` each finished batch is
persisted, so a killed run restarts where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

import numpy as np
import torch

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
        reader = _Prefetcher(source, batch_size, todo, num_workers, pin=device.type == "cuda")
        t0 = time.perf_counter()
        try:
            _forward_all(model, reader, res, device=device, dtype=dtype, batch_size=batch_size, pad=compile)
        finally:
            reader.close()
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
