"""Encoder registry: H-optimus-1 (default) and other pathology foundation models, as data."""

from ._encoder import Encoder
from ._registry import ModelSpec, create, get_spec, list_models, register
from ._weights import KeyMismatchError, WeightsUnavailableError

__all__ = [
    "Encoder",
    "KeyMismatchError",
    "ModelSpec",
    "WeightsUnavailableError",
    "create",
    "get_spec",
    "list_models",
    "register",
]
