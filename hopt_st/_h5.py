"""Every HDF5 file hopt_st reads (.h5 patches, embeddings, counts; .h5ad) is opened here, self-contained or refused.

HDF5 can make a file's content come from elsewhere: a dataset with *external storage* keeps its bytes in other
files named in its header, an *external link* mounts an object of another file, a *virtual dataset* maps
regions of datasets of other files. A file shaped like a patch file could so make any readable file on the
machine (a private key, another user's data) the barcodes of an output embedding file. Input files never pull
in data from outside what the user named (issue 20, rule 4): :func:`open_h5` opens a file read-only and
refuses, naming the file, the object and where it points, any of the three that leaves the file (a virtual
dataset mapping the file itself, HDF5's ``"."``, is allowed).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py


class ExternalDataError(ValueError):
    """An HDF5 input whose content would be read from outside the file (external storage, external link or
    virtual dataset), refused: the message names the file, the object and its target."""


def _outside(name: str, obj, link) -> str | None:
    """Where object ``name`` would read from outside the file, or None."""
    if isinstance(link, h5py.ExternalLink):
        return f"external link {name!r} -> {link.filename}:{link.path}"
    if not isinstance(obj, h5py.Dataset):
        return None
    plist = obj.id.get_create_plist()
    if plist.get_external_count():
        files = [plist.get_external(i)[0].decode(errors="replace") for i in range(plist.get_external_count())]
        return f"dataset {name!r} with external storage in {files}"
    if obj.is_virtual:
        sources = sorted({vs.file_name for vs in obj.virtual_sources()} - {"."})
        if sources:
            return f"virtual dataset {name!r} mapping {sources}"
    return None


def check_self_contained(f: h5py.File, path: str | os.PathLike | None = None) -> None:
    """Refuse (:class:`ExternalDataError`) an open HDF5 file any of whose objects reads from another file."""
    path = Path(path if path is not None else f.filename)
    found: list[str] = []

    def visit(name: str, link) -> None:
        obj = None
        if isinstance(link, h5py.HardLink):
            obj = f.get(name)
        where = _outside(name, obj, link)
        if where is not None:
            found.append(where)

    f.visititems_links(visit)  # every link once, external ones not followed
    if found:
        raise ExternalDataError(
            f"HDF5 file {str(path)!r} pulls in data from outside itself ({'; '.join(found[:3])}"
            f"{'; ...' if len(found) > 3 else ''}): hopt_st reads only what the file itself holds. Write a "
            "self-contained copy (e.g. `h5repack` or h5py, copying the data) and use that."
        )


def open_h5(path: str | os.PathLike) -> h5py.File:
    """``h5py.File(path, "r")`` once :func:`check_self_contained` passed (the file is closed on refusal).

    Raises
    ------
    ExternalDataError
        External storage, external links or virtual datasets pointing outside the file.
    OSError
        From h5py, for a file that is not HDF5 or cannot be opened (callers turn it into their own message).
    """
    f = h5py.File(path, "r")
    try:
        check_self_contained(f, path)
    except BaseException:
        f.close()
        raise
    return f


def check_h5_file(path: str | os.PathLike) -> None:
    """Open ``path`` just to check it is self-contained (for readers that open it themselves, e.g. anndata's)."""
    with h5py.File(path, "r") as f:
        check_self_contained(f, path)
