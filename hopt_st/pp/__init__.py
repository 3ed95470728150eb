"""Preprocessing: spot-centred patches at true physical size, and foundation-model embeddings.

``embed`` (which needs torch) is imported on first use, so cutting patches does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._patches import Patches, patches

if TYPE_CHECKING:  # pragma: no cover
    from ._embed import embed


def __getattr__(name: str):
    if name == "embed":
        from ._embed import embed

        globals()["embed"] = embed
        return embed
    raise AttributeError(f"module 'hopt_st.pp' has no attribute {name!r}")


__all__ = ["Patches", "embed", "patches"]
