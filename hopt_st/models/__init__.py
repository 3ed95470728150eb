"""Encoder registry: H-optimus-1 (default) and other pathology foundation models, as data."""

from ._registry import ModelSpec, create, get_spec, list_models, register

__all__ = ["ModelSpec", "create", "get_spec", "list_models", "register"]
