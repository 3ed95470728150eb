"""Preprocessing: spot-centred patches at true physical size, and foundation-model embeddings."""

from ._embed import embed
from ._patches import Patches, patches

__all__ = ["Patches", "embed", "patches"]
