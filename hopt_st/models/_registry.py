"""The encoder registry: name -> :class:`ModelSpec`, and :func:`create` to build an encoder from one.

A :class:`ModelSpec` records how to build an encoder (timm architecture and keyword arguments), where its
weights live (Hugging Face repo), how to feed it (input size, µm/px, mean/std) and how to pool its tokens,
with the source of each number in ``sources``. The built-in specs are in :mod:`._builtin`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pandas as pd

from .._constants import PATCH_SIZE
from .._docs import inject_docs
from ._builtin import BUILTIN
from ._spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ._encoder import Encoder

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in BUILTIN}
_LOCK = threading.RLock()

# Texts of the parameters that create() and get_encoder() share.
DOC_MODEL = 'Registry name, ``"timm:<arch>"`` (any timm architecture) or a :class:`ModelSpec`.'
DOC_WEIGHTS = (
    "A local weight file (``.safetensors``; ``.bin``/``.pth``/``.pt`` via ``torch.load(weights_only=True)``). "
    "``None`` with ``pretrained=True`` downloads (or reads from the local Hugging Face cache) the spec's "
    "``hf_repo`` using ``HF_TOKEN``; ``HF_HUB_OFFLINE=1`` only uses the cache."
)
DOC_PRETRAINED = "``False`` builds the architecture with random weights (no file needed)."
DOC_DEVICE = 'Where to put the module; ``"meta"`` builds without allocating memory. Default CPU.'
DOC_DTYPE = (
    "Parameter precision (``torch.float32``, ``torch.bfloat16``, ``torch.float16`` or their names); "
    "``None`` keeps float32 (use autocast for mixed precision)."
)
#: The numpydoc entries of ``weights``, ``pretrained``, ``device`` and ``dtype`` (4-space indented).
DOC_BUILD_PARAMS = "\n    ".join(
    f"{name}\n        {text}"
    for name, text in (
        ("weights", DOC_WEIGHTS),
        ("pretrained", DOC_PRETRAINED),
        ("device", DOC_DEVICE),
        ("dtype", DOC_DTYPE),
    )
)
#: The numpydoc "Raises" entries of building an encoder with weights.
DOC_BUILD_RAISES = """WeightsUnavailableError
        The weights are neither local nor downloadable (the message says how to get them).
    KeyMismatchError
        The weight file does not match the architecture exactly."""


@inject_docs()
def register(spec: ModelSpec, *, overwrite: bool = False) -> ModelSpec:
    """Add a :class:`ModelSpec` to the registry.

    Parameters
    ----------
    spec
        The spec; its ``name`` becomes the registry key.
    overwrite
        {overwrite}

    Returns
    -------
    ModelSpec
        ``spec``.

    Raises
    ------
    TypeError
        ``spec`` is no :class:`ModelSpec`.
    ValueError
        The name is taken (and ``overwrite`` is false), or starts with the reserved ``"timm:"``.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register() takes a ModelSpec, got {type(spec).__name__}.")
    if spec.name.startswith("timm:"):
        raise ValueError(f"{spec.name!r}: names starting with 'timm:' are reserved for any timm model.")
    with _LOCK:
        if spec.name in _REGISTRY and not overwrite:
            raise ValueError(f"model {spec.name!r} is already registered: pass overwrite=True to replace it.")
        _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> ModelSpec:
    """Remove a model from the registry.

    Parameters
    ----------
    name
        Registry name.

    Returns
    -------
    ModelSpec
        The removed spec.

    Raises
    ------
    TypeError
        ``name`` is no str.
    KeyError
        No model of that name is registered.
    """
    if not isinstance(name, str):
        raise TypeError(f"unregister() takes a registry name (str), got {type(name).__name__}.")
    with _LOCK:
        if name not in _REGISTRY:
            raise KeyError(f"model {name!r} is not in the registry.")
        return _REGISTRY.pop(name)


@contextmanager
@inject_docs()
def registered(*specs: ModelSpec, overwrite: bool = False) -> Iterator[tuple[ModelSpec, ...]]:
    """Register ``specs`` for the duration of a ``with`` block, then restore the registry as it was.

    Parameters
    ----------
    *specs
        The specs to register.
    overwrite
        {overwrite} The replaced entries come back on exit.

    Yields
    ------
    tuple of ModelSpec
        ``specs``.

    Raises
    ------
    TypeError, ValueError
        As :func:`register`; the specs registered before the failing one are removed again.
    """
    previous: dict[str, ModelSpec | None] = {}
    try:
        for spec in specs:
            before = _REGISTRY.get(spec.name) if isinstance(spec, ModelSpec) else None
            register(spec, overwrite=overwrite)
            previous.setdefault(spec.name, before)
        yield specs
    finally:
        with _LOCK:
            for name, before in previous.items():
                if before is None:
                    _REGISTRY.pop(name, None)
                else:
                    _REGISTRY[name] = before


@functools.lru_cache(maxsize=64)  # timm.list_models() and a meta build take seconds; specs are frozen data
def _timm_spec(name: str) -> ModelSpec:
    import timm
    import torch

    arch = name.split(":", 1)[1]
    if not arch or arch not in timm.list_models():
        raise KeyError(
            f"model {name!r}: {arch!r} is not a timm architecture (see timm.list_models()); e.g. 'timm:vit_small_patch14_reg4_dinov2'."
        )
    with torch.device("meta"):
        m = timm.create_model(arch, pretrained=False, num_classes=0)
    cfg = getattr(m, "pretrained_cfg", {}) or {}
    native = int(cfg.get("input_size", (3, 224, 224))[-1])
    kwargs, size = dict(num_classes=0), native
    if native != PATCH_SIZE:
        # the patch geometry of every pathology model here: 224 px at 0.5 µm/px (112 µm of tissue), not the
        # network's pretraining size (dinov2: 518 px = 259 µm); ViTs take img_size= and their position
        # embeddings are resampled when pretrained weights are loaded
        try:
            with torch.device("meta"):
                timm.create_model(arch, pretrained=False, num_classes=0, img_size=PATCH_SIZE)
            kwargs, size = dict(num_classes=0, img_size=PATCH_SIZE), PATCH_SIZE
        except TypeError:  # no img_size: the network's own size
            pass
    geometry = f"{size} px patches at 0.5 µm/px ({size * 0.5:g} µm of tissue)" + (
        f"; timm's pretrained_cfg size is {native} px (position embeddings resampled)"
        if size != native
        else ""
    )
    logger.info("%s: %s", name, geometry)
    return ModelSpec(
        name=name,
        dim=int(m.num_features),
        input_size=int(size),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        timm_name=arch,
        timm_kwargs=kwargs,
        hf_repo=cfg.get("hf_hub_id") or None,
        precision="bfloat16",
        notes=f"Generic timm model; µm/px 0.5 assumed (set your own with models.register); {geometry}.",
        sources={
            "mean": "timm pretrained_cfg",
            "input_size": "hopt_st's 224 px patch when the network takes img_size=, else timm pretrained_cfg",
            "dim": "timm num_features",
        },
    )


def get_spec(name: str | ModelSpec) -> ModelSpec:
    """Look up a :class:`ModelSpec`.

    Parameters
    ----------
    name
        Registry name, or ``"timm:<arch>"`` for any timm architecture (its spec is made on demand from
        timm's ``pretrained_cfg``). A :class:`ModelSpec` is returned as is.

    Returns
    -------
    ModelSpec
        The spec.

    Raises
    ------
    TypeError
        ``name`` is neither a str nor a :class:`ModelSpec`.
    KeyError
        Unknown name, or ``"timm:<arch>"`` of an architecture that timm does not know.
    """
    if isinstance(name, ModelSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"model must be a registry name (str), got {type(name).__name__}.")
    spec = _REGISTRY.get(name)
    if spec is not None:
        return spec
    if name.startswith("timm:"):
        return _timm_spec(name)
    raise KeyError(
        f"model {name!r} is not in the registry; known models: {sorted(_REGISTRY)} "
        "(or 'timm:<architecture>', or add one with hopt_st.models.register); `hopt-st models` lists them."
    )


def registered_names() -> list[str]:
    """Names of the registered models, in registration order (``timm:<arch>`` entries are not listed)."""
    return list(_REGISTRY)


def list_models() -> pd.DataFrame:
    """All registered encoders.

    Returns
    -------
    pandas.DataFrame
        One row per spec, indexed by name, one column per :class:`ModelSpec` field (``sources`` last).
        ``timm:<arch>`` entries are built on demand and not listed.
    """
    rows = []
    for spec in list(_REGISTRY.values()):
        row = dataclasses.asdict(spec)
        row["timm_kwargs"] = repr(row["timm_kwargs"]) if row["timm_kwargs"] else ""
        row["hf_filenames"] = ", ".join(row["hf_filenames"])
        row["sources"] = "; ".join(f"{k}: {v}" for k, v in spec.sources.items())
        rows.append(row)
    df = pd.DataFrame(rows).set_index("name")
    return df[[c for c in df.columns if c != "sources"] + ["sources"]]


@inject_docs(model=DOC_MODEL, build_params=DOC_BUILD_PARAMS, build_raises=DOC_BUILD_RAISES)
def create(
    name: str | ModelSpec = "h-optimus-1",
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    *,
    dtype: str | torch.dtype | None = None,
) -> Encoder:
    """Build a new encoder: a ``torch.nn.Module`` mapping uint8 ``(B, H, W, 3)`` to float32 ``(B, dim)``.

    Every call builds (and loads) a fresh module; :func:`get_encoder` reuses one per process.

    Parameters
    ----------
    name
        {model}
    {build_params}

    Returns
    -------
    Encoder
        With ``.spec`` and ``.weights_sha256`` (``None`` for random weights), in eval mode.

    Raises
    ------
    {build_raises}
    """
    from ._encoder import build_encoder

    spec = get_spec(name)
    return build_encoder(spec, weights=weights, pretrained=pretrained, device=device, dtype=dtype)
