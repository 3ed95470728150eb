"""Shared docstring fragments (squidpy/scanpy style): one text per parameter that many functions take.

Write ``{name}`` in a docstring and decorate the function with :func:`inject_docs`; the placeholders are
filled from :data:`DOCS` (plus any keyword given to the decorator)::

    @inject_docs()
    def f(sdata, table_name=None):
        '''...

        Parameters
        ----------
        sdata
            {sdata}
        table_name
            {table_name}
        '''

``{spot_params}`` stands for the whole ``sdata`` / ``table_name`` / ``image_key`` block and ``{save_dpi}``
for ``save`` / ``dpi``. Literal braces in such a docstring are written ``{{`` and ``}}``.
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
DOC_IMAGE = (
    'AnnData input only: the full-resolution H&E scan whose pixels are the units of ``obsm["spatial"]`` (a '
    "path, TIFFs read lazily, or an ``(height, width, 3)`` array). Default "
    '``uns["spatial"][library_id]["metadata"]["source_image_path"]``, else the hires image (patches '
    "upsampled, with a warning saying by how much)."
)
DOC_LIBRARY_ID = 'AnnData input only: the key of ``uns["spatial"]``, when it holds several libraries.'
DOC_IMAGE_MPP_ANNDATA = (
    DOC_IMAGE_MPP
    + ' For an AnnData: µm per full-resolution pixel (the units of ``obsm["spatial"]``); default '
    "``65 / spot_diameter_fullres``."
)
DOC_PROGRESS = "Show a tqdm progress bar."
DOC_KEY_ADDED = "Key under which the result is stored."
DOC_USE_REP = "Key of the embeddings in ``obsm``."
DOC_SAVE = "Write the figure there (format from the suffix)."
DOC_DPI = "Resolution when saving."
DOC_CMAP = "Matplotlib colour map."
DOC_PLOT_IMAGE_KEY = DOC_IMAGE_KEY + " A small pyramid level is drawn, never the full slide."
DOC_SHOW_IMAGE = "Draw the H&E under the spots (or tiles)."
DOC_MAX_IMAGE_SIZE = "Largest side, in pixels, of the image level drawn."


def entries(indent: int = 4, **texts: str) -> str:
    """Several numpydoc parameter entries as one fragment, placed at a docstring indent of ``indent`` spaces
    (4 for functions, 8 for methods)."""
    pad = " " * indent
    return f"\n{pad}".join(f"{name}\n{pad}    {text}" for name, text in texts.items())


#: every shared fragment, by placeholder name
DOCS: dict[str, str] = {
    "sdata": DOC_SDATA,
    "table_name": DOC_TABLE_NAME,
    "image_key": DOC_IMAGE_KEY,
    "image_mpp": DOC_IMAGE_MPP,
    "target_mpp": DOC_TARGET_MPP,
    "patch_size": DOC_PATCH_SIZE,
    "overwrite": DOC_OVERWRITE,
    "copy": DOC_COPY,
    "image": DOC_IMAGE,
    "library_id": DOC_LIBRARY_ID,
    "progress": DOC_PROGRESS,
    "key_added": DOC_KEY_ADDED,
    "use_rep": DOC_USE_REP,
    "save": DOC_SAVE,
    "dpi": DOC_DPI,
    "spot_params": entries(sdata=DOC_SDATA, table_name=DOC_TABLE_NAME, image_key=DOC_IMAGE_KEY),
    # the slide arguments of pp.patches / pp.embed that an AnnData input needs
    "anndata_image_params": entries(image=DOC_IMAGE, library_id=DOC_LIBRARY_ID),
    "image_mpp_anndata": DOC_IMAGE_MPP_ANNDATA,
    "save_dpi": entries(save=DOC_SAVE, dpi=DOC_DPI),
    "cmap": DOC_CMAP,
    # the H&E under a plot's spots
    "plot_image_params": entries(image_key=DOC_PLOT_IMAGE_KEY, show_image=DOC_SHOW_IMAGE, cmap=DOC_CMAP),
    "max_image_size": DOC_MAX_IMAGE_SIZE,
}


def inject_docs(**fragments: str) -> Callable[[F], F]:
    """Fill the ``{name}`` placeholders of the decorated function's docstring from :data:`DOCS` and ``fragments``.

    An unknown placeholder raises ``KeyError`` when the module is imported, so a typo cannot ship.
    """

    def decorate(func: F) -> F:
        if func.__doc__:
            func.__doc__ = func.__doc__.format_map({**DOCS, **fragments})
        return func

    return decorate
