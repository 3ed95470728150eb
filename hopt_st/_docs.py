"""Shared docstring fragments (squidpy/scanpy style): one text per parameter that many functions take.

Use :func:`inject_docs` on a function whose docstring contains ``{name}`` placeholders::

    @inject_docs(table_name=DOC_TABLE_NAME)
    def f(sdata, table_name=None):
        '''...

        Parameters
        ----------
        table_name
            {table_name}
        '''
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

DOC_SDATA = "SpatialData with an H&E image, a shapes element of spots and a table annotating it."
DOC_TABLE_NAME = 'Spot table; ``None`` picks the only table (or the one named ``"table"``).'
DOC_IMAGE_KEY = "Image element; ``None`` picks the largest image that holds tissue pixels."
DOC_IMAGE_MPP = (
    "µm per pixel of the image's full-resolution level (level 0); ``None`` reads "
    '``table.uns["hopt_st"]["image_mpp"]`` as recorded by the readers. An explicit value always wins.'
)
DOC_TARGET_MPP = "µm per patch pixel (0.5 for H-optimus-1 and the HEST-Benchmark)."
DOC_PATCH_SIZE = "Side of the patches in pixels."
DOC_OVERWRITE = "Replace an existing entry (key, element or file) of the same name; otherwise refuse."
DOC_COPY = "Return a modified copy instead of writing in place."
DOC_PROGRESS = "Show a tqdm progress bar."
DOC_KEY_ADDED = "Key under which the result is stored."
DOC_USE_REP = "Key of the embeddings in ``obsm``."
DOC_SAVE = "Write the figure there (format from the suffix)."
DOC_DPI = "Resolution when saving."


def inject_docs(**fragments: str) -> Callable[[F], F]:
    """Fill ``{name}`` placeholders of the decorated function's docstring with ``fragments``."""

    def decorate(func: F) -> F:
        if func.__doc__:
            func.__doc__ = func.__doc__.format(**fragments)
        return func

    return decorate
