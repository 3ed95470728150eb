""":class:`ModelSpec`: one patch encoder described as plain data (no torch, no timm)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

_ARCHS = ("timm", "handcrafted")
_POOLINGS = ("token", "cls+mean")


@dataclass(frozen=True)
class ModelSpec:
    """Description of one patch encoder.

    Specs are plain, frozen data: derive a variant with :func:`dataclasses.replace`. They are hashable
    (equal specs hash alike), so a spec can key a cache.

    Parameters
    ----------
    name
        Registry name (e.g. ``"h-optimus-1"``).
    dim
        Output embedding dimension.
    input_size
        Square input side in pixels the model was trained on.
    mpp
        µm per pixel of the training patches (0.5 µm/px is "20x").
    mean
        Per-channel (RGB) mean subtracted from ``[0, 1]`` inputs inside the encoder.
    std
        Per-channel (RGB) standard deviation the centred inputs are divided by.
    arch
        ``"timm"`` (built with ``timm.create_model(timm_name, **timm_kwargs)``) or ``"handcrafted"``.
    timm_name
        timm architecture name.
    timm_kwargs
        Keyword arguments for ``timm.create_model``. Layer classes are given by name
        (``"SwiGLUPacked"``, ``"SiLU"``, ``"GELU"``) and resolved when building.
    pooling
        ``"token"``: the model's own pooled output (CLS token for these models); ``"cls+mean"``: CLS token
        concatenated with the mean of the patch tokens (registers excluded).
    hf_repo
        Hugging Face repository of the weights.
    hf_filenames
        Candidate weight file names in the repository, tried in order.
    key_map
        Name of a state-dict key conversion applied before exact matching (``"hf_dinov2"`` for
        checkpoints saved by ``transformers.Dinov2Model``).
    n_params
        Parameter count stated by the model card (backbone only), for tests.
    n_params_rtol
        Relative tolerance on ``n_params`` (cards round, e.g. "1.1 B").
    precision
        Recommended inference precision on GPU.
    gated
        Whether the Hugging Face repository requires accepting terms.
    license
        Licence note.
    notes
        Free text (e.g. how the construction differs from the card when it is not plain timm).
    sources
        Field name -> where the number comes from (model card URL, config.json, paper).

    Raises
    ------
    TypeError
        A field of the wrong type.
    ValueError
        A field with a bad value (unknown ``arch`` or ``pooling``, non-positive size, ...).
    """

    name: str
    dim: int
    input_size: int = 224
    mpp: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    arch: str = "timm"
    timm_name: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    pooling: str = "token"
    hf_repo: str | None = None
    hf_filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    key_map: str | None = None
    n_params: float | None = None
    n_params_rtol: float = 0.05
    precision: str = "bfloat16"
    gated: bool = False
    license: str = ""
    notes: str = ""
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"ModelSpec name must be a str, got {type(self.name).__name__}.")
        if not self.name:
            raise ValueError("ModelSpec name must not be empty.")
        for attr, minimum in (("dim", 0), ("input_size", 1)):
            value = getattr(self, attr)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(
                    f"ModelSpec {self.name!r}: {attr} must be an int, got {type(value).__name__}."
                )
            if value < minimum:
                raise ValueError(f"ModelSpec {self.name!r}: {attr}={value} must be >= {minimum}.")
        if not isinstance(self.mpp, numbers.Real) or not self.mpp > 0:
            raise ValueError(f"ModelSpec {self.name!r}: mpp={self.mpp!r} must be a positive number (µm/px).")
        self._set("mean", self._rgb("mean"))
        self._set("std", self._rgb("std"))
        if self.arch not in _ARCHS:
            raise ValueError(f"ModelSpec {self.name!r}: arch={self.arch!r} must be 'timm' or 'handcrafted'.")
        if self.arch == "timm" and not self.timm_name:
            raise ValueError(f"ModelSpec {self.name!r}: arch='timm' needs timm_name.")
        if self.pooling not in _POOLINGS:
            raise ValueError(
                f"ModelSpec {self.name!r}: pooling={self.pooling!r} must be 'token' or 'cls+mean'."
            )
        for attr in ("timm_kwargs", "sources"):  # own copies: a variant made by replace() shares nothing
            if not isinstance(getattr(self, attr), Mapping):
                raise TypeError(f"ModelSpec {self.name!r}: {attr} must be a dict.")
            self._set(attr, dict(getattr(self, attr)))
        if isinstance(self.hf_filenames, str) or not all(isinstance(f, str) for f in self.hf_filenames):
            raise TypeError(f"ModelSpec {self.name!r}: hf_filenames must be a tuple of file names.")
        self._set("hf_filenames", tuple(self.hf_filenames))

    def __hash__(self) -> int:
        # the dict fields are not hashable: hash the fields that tell encoders apart (equal specs agree on them)
        return hash(
            (self.name, self.arch, self.timm_name, self.dim, self.input_size, self.pooling, self.mean)
        )

    def _set(self, attr: str, value: Any) -> None:
        object.__setattr__(self, attr, value)

    def _rgb(self, attr: str) -> tuple[float, float, float]:
        value = getattr(self, attr)
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise TypeError(f"ModelSpec {self.name!r}: {attr} must be a sequence of 3 numbers (RGB).")
        if len(value) != 3:
            raise ValueError(f"ModelSpec {self.name!r}: mean and std need 3 values (RGB).")
        return tuple(float(v) for v in value)
