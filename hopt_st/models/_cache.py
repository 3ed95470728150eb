"""One encoder per (spec, weight file, device, dtype) and process: :func:`get_encoder`.

Building H-optimus-1 reads 4.5 GB and allocates as much; a process that embeds several slides should do
it once. The cache is keyed by the spec itself (specs are hashable plain data: a re-registered spec under
the same name is another key), the resolved weight file with its size and modification time (a replaced
file is loaded again), the device and the parameter dtype. Thread-safe: concurrent calls for the same key
build once, the others wait for it.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from .._docs import inject_docs
from ._encoder import Encoder, as_device, as_dtype, build_encoder, weights_file
from ._registry import DOC_BUILD_PARAMS, DOC_BUILD_RAISES, DOC_MODEL, get_spec
from ._spec import ModelSpec

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_ENCODERS: dict[tuple, Encoder] = {}
_BUILDING: dict[tuple, threading.Lock] = {}  # key -> lock held while that key's encoder is built
_STATS = {"builds": 0, "hits": 0}


def _file_id(path: Path | None) -> tuple[str, int, int] | None:
    if path is None:
        return None
    real = path.resolve()
    if not real.is_file():  # fails in build_encoder, with the reader's message
        return (str(real), -1, -1)
    st = real.stat()
    return (str(real), st.st_size, st.st_mtime_ns)


def _device_id(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


@inject_docs(model=DOC_MODEL, build_params=DOC_BUILD_PARAMS, build_raises=DOC_BUILD_RAISES)
def get_encoder(
    model: str | ModelSpec = "h-optimus-1",
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Encoder:
    """The encoder of a model, built once per process and reused (see :func:`create` for a fresh one).

    The returned module is shared by every caller asking for the same spec, weight file, device and dtype:
    treat it as read-only (do not move it, change its dtype or patch its methods).

    Parameters
    ----------
    model
        {model}
    {build_params}

    Returns
    -------
    Encoder
        In eval mode; ``weights_sha256`` is read from the Hugging Face cache or computed once per file.

    Raises
    ------
    {build_raises}
    """
    spec = get_spec(model)
    dev, dt = as_device(device), as_dtype(dtype)
    path = weights_file(spec, weights, pretrained, dev)  # a Hub model: looked up (or downloaded) here
    key = (spec, _file_id(path), _device_id(dev), dt)
    with _LOCK:
        encoder = _ENCODERS.get(key)
        if encoder is not None:  # cached
            _STATS["hits"] += 1
            return encoder
        building = _BUILDING.setdefault(key, threading.Lock())
    with building:
        with _LOCK:
            encoder = _ENCODERS.get(key)  # built by another thread while this one waited?
            if encoder is not None:  # yes
                _STATS["hits"] += 1
                return encoder
        try:
            encoder = build_encoder(spec, weights=path, pretrained=pretrained, device=dev, dtype=dt)
            with _LOCK:
                _ENCODERS[key] = encoder
                _STATS["builds"] += 1
        finally:
            with _LOCK:
                _BUILDING.pop(key, None)
    logger.debug("built encoder %s (weights %s, %s, %s)", spec.name, encoder.weights_source, dev, dt)
    return encoder


def clear_encoder_cache() -> None:
    """Forget every cached encoder (their memory is freed once no one else holds them) and reset the counts
    of :func:`encoder_cache_info`."""
    with _LOCK:
        _ENCODERS.clear()
        _STATS.update(builds=0, hits=0)


def encoder_cache_info() -> dict[str, int]:
    """Counts of the encoder cache since the last :func:`clear_encoder_cache`.

    Returns
    -------
    dict of str to int
        ``"builds"`` (encoders built by :func:`get_encoder`), ``"hits"`` (calls answered from the cache)
        and ``"size"`` (encoders held now).
    """
    with _LOCK:
        return {**_STATS, "size": len(_ENCODERS)}
