"""Where and in which precision encoders run: parsing ``device=`` and ``dtype=``."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def select_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA if available, then MPS, then CPU; otherwise ``torch.device(device)``, which
    must exist on this machine (``ValueError`` otherwise, before any work starts)."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device={device!r} is not a device name ({e}); use 'cpu', 'cuda', 'cuda:1', 'mps' or None (auto)."
        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(
                f"device={device!r} but no CUDA GPU is usable here (torch {torch.__version__}, CUDA "
                f"{torch.version.cuda or 'not built in'}): use device='cpu', or None to pick the best available."
            )
        if dev.index is not None and dev.index >= n:
            raise ValueError(
                f"device={device!r} but this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})."
            )
    elif dev.type == "mps" and not _mps_available():
        raise ValueError(f"device={device!r} but MPS (Apple GPU) is not available: use device='cpu' or None.")
    return dev


def select_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Compute precision: explicit value, else bf16 on CUDA, fp16 on MPS, fp32 on CPU."""
    if dtype is None:
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"dtype={dtype} is not a floating compute precision (float32, bfloat16, float16)."
            )
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a str or torch.dtype, got {type(dtype).__name__}.")
    key = dtype.lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(set(_DTYPES))}.")
    return _DTYPES[key]
