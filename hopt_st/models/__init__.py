"""Encoder registry: H-optimus-1 (default) and other pathology foundation models, as data.

- :class:`ModelSpec` describes an encoder; :func:`register`, :func:`unregister`, :func:`registered`,
  :func:`get_spec` and :func:`list_models` manage the registry.
- :func:`create` builds a fresh :class:`Encoder`; :func:`get_encoder` builds one per process and reuses it
  (:func:`clear_encoder_cache`, :func:`encoder_cache_info`).
- :func:`weights_status` and :func:`local_models` tell, without downloading, which weights are here.
"""

from ._cache import clear_encoder_cache, encoder_cache_info, get_encoder
from ._encoder import Encoder
from ._local import local_models, weights_status
from ._registry import create, get_spec, list_models, register, registered, unregister
from ._spec import ModelSpec
from ._weights import KeyMismatchError, WeightsUnavailableError

__all__ = [
    "Encoder",
    "KeyMismatchError",
    "ModelSpec",
    "WeightsUnavailableError",
    "clear_encoder_cache",
    "create",
    "encoder_cache_info",
    "get_encoder",
    "get_spec",
    "list_models",
    "local_models",
    "register",
    "registered",
    "unregister",
    "weights_status",
]
