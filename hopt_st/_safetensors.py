"""Reading the model files hopt_st writes: safetensors tensors plus a JSON document under the metadata key
``"hopt_st"`` (regressors, MIL models). One reader, so every such file is refused the same way when damaged."""

from __future__ import annotations

import json
from pathlib import Path

from ._errors import CorruptFileError


def read_model_file(path: str | Path, *, what: str, fix: str) -> tuple[dict, dict | None]:
    """The tensors (numpy) and the ``"hopt_st"`` metadata (``None`` when absent) of a safetensors file.

    Parameters
    ----------
    path
        The file.
    what
        How the file is named in messages, e.g. ``"regressor file"``.
    fix
        What the user can do when the file is damaged.

    Raises
    ------
    FileNotFoundError
        ``path`` is not a file.
    CorruptFileError
        A truncated or garbled file, or metadata that is not JSON.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get("hopt_st")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = None if raw is None else json.loads(raw)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for truncated/garbled files
        raise CorruptFileError.from_error(path, e, what=what, fix=fix) from None
    return tensors, meta
