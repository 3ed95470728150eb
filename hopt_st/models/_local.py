"""Which models can run here without a download: weight-free ones and those in the Hugging Face cache."""

from __future__ import annotations

from ._registry import get_spec, registered_names
from ._spec import ModelSpec


def weights_status(name: str | ModelSpec) -> str:
    """Whether a model's weights are on this machine; never downloads nor contacts the Hub.

    Parameters
    ----------
    name
        Registry name, ``"timm:<arch>"`` or a :class:`ModelSpec`.

    Returns
    -------
    str
        ``"not needed"`` (weight-free, e.g. ``handcrafted``), ``"local"`` (one of the spec's
        ``hf_filenames`` is in the local Hugging Face cache) or ``"missing"`` (including a spec without a
        Hugging Face repository: its weights can only be passed as a file).
    """
    spec = get_spec(name)
    if spec.arch == "handcrafted":
        return "not needed"
    if not spec.hf_repo:
        return "missing"
    from huggingface_hub import try_to_load_from_cache

    for filename in spec.hf_filenames:
        if isinstance(try_to_load_from_cache(spec.hf_repo, filename), str):
            return "local"
    return "missing"


def local_models() -> list[str]:
    """Registered models usable offline: weight-free ones and those with weights in the local HF cache.

    Returns
    -------
    list of str
        Registry names, in registration order.
    """
    return [n for n in registered_names() if weights_status(n) in ("local", "not needed")]
