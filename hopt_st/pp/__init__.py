"""Preprocessing: tissue and pseudo-spot grids on whole slides, spot-centred patches at true physical size,
and foundation-model embeddings.

``embed`` and ``embed_cohort`` load on first use (``lazy_loader``), so cutting patches does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader as lazy

from .._patchset import Patches
from ._grid import tile_grid
from ._patches import patches
from ._tissue import detect_tissue

__all__ = [
    "Patches",
    "aggregate_squares",
    "detect_tissue",
    "embed",
    "embed_cohort",
    "embed_tokens",
    "patches",
    "tile_grid",
    "token_features",
]
__getattr__, _, _ = lazy.attach(
    __name__,
    submod_attrs={
        "_embed": ["embed"],
        "_cohort": ["embed_cohort"],
        "_tokens": ["embed_tokens", "token_features"],
        "_aggregate": ["aggregate_squares"],
    },
)


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from ._aggregate import aggregate_squares
    from ._cohort import embed_cohort
    from ._embed import embed
    from ._tokens import embed_tokens, token_features
