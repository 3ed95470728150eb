"""The progress bar class: tqdm's notebook widget when ipywidgets is installed, its text bar otherwise.

``tqdm.auto`` picks the notebook bar in any Jupyter kernel and, without ipywidgets, warns (``TqdmWarning:
IProgress not found``) on every bar before falling back to text; choosing here says nothing and draws the same.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("ipywidgets") is not None:  # pragma: no cover - depends on the environment
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["tqdm"]
