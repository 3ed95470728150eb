"""Writing SpatialData stores safely: valid names, whole stores and in-place element rewrites, all atomic.

spatialdata's own in-place update (``delete_element_from_disk`` then ``write_element``) loses the element
when the write fails (an invalid key, a full disk). Here the new element is written and read back in a
scratch store beside the old one, then swapped in by renames, and the store's consolidated metadata is
replaced in one ``os.replace``: on any failure the store on disk is exactly what it was.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from spatialdata import SpatialData

from .._atomic import (
    atomic_dir,
    atomic_write_bytes,
    check_overwrite,
    fsync_tree,
    mark_ours,
    remove,
    temp_sibling,
)

logger = logging.getLogger(__name__)

#: the rule spatialdata (and so every SpatialData .zarr store) applies to element names and table keys
NAME_RULE = (
    "names of elements and of table keys (obsm, obs columns, layers, uns, ...) may contain only letters, "
    "digits, '_', '-' and '.', must not be empty, '.' or '..', and must not start with '__'"
)


def valid_name(name: str) -> bool:
    """Whether ``name`` is a valid SpatialData element name / table key (see :data:`NAME_RULE`)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not name.startswith("__")
        and all(c.isalnum() or c in "_-." for c in name)
    )


def sanitize_name(name: str) -> str:
    """``name`` with every character that a SpatialData store does not allow replaced by ``_``."""
    out = "".join(c if c.isalnum() or c in "_-." else "_" for c in str(name))
    out = "_" + out.lstrip("_") if out.startswith("__") else out
    return out if valid_name(out) else f"key{out}"  # "", "." and ".."


def check_name(name, what: str, existing=()) -> str:
    """Refuse a key that cannot be written to a SpatialData store, before any work starts.

    Parameters
    ----------
    name
        The key (e.g. ``key_added``).
    what
        The argument it came from, for the message (the CLI passes its flag).
    existing
        Keys already present: a different key equal to one of them up to case is refused too (stores are
        case-insensitive on some file systems, and spatialdata refuses such pairs).

    Returns
    -------
    str
        ``name``.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}.")
    label = f"{what} {name!r}" if what.startswith("--") else f"{what}={name!r}"
    if not valid_name(name):
        raise ValueError(f"{label} is not a valid key: {NAME_RULE}. Use e.g. {sanitize_name(name)!r}.")
    clash = [k for k in existing if k != name and str(k).lower() == name.lower()]
    if clash:
        raise ValueError(
            f"{label} differs only in case from the existing key {clash[0]!r}, which a SpatialData store "
            "cannot hold side by side: choose another name, or that exact key with overwrite=True."
        )
    return name


def _store_format(store: Path) -> tuple[list, str | None]:
    """spatialdata container formats for writing into ``store``, and its consolidated-metadata file."""
    if (store / "zarr.json").is_file():
        return [], "zarr.json"
    if (store / ".zgroup").is_file():
        from spatialdata._io.format import SpatialDataContainerFormatV01

        return [SpatialDataContainerFormatV01()], ".zmetadata" if (store / ".zmetadata").is_file() else None
    raise ValueError(f"{str(store)!r} is not a SpatialData .zarr store (no zarr.json or .zgroup).")


def _merged_metadata(store: Path, scratch: Path, meta_file: str | None, prefix: str) -> bytes | None:
    """The store's consolidated metadata with the entries of element ``prefix`` taken from ``scratch``."""
    if meta_file is None:
        return None
    old = json.loads((store / meta_file).read_bytes())
    new = json.loads((scratch / meta_file).read_bytes())

    def entries(doc):
        return doc["consolidated_metadata"]["metadata"] if meta_file == "zarr.json" else doc["metadata"]

    try:
        old_entries, new_entries = entries(old), entries(new)
    except (KeyError, TypeError):  # not consolidated: nothing to update
        return None
    mine = (prefix, prefix + "/")
    merged = {k: v for k, v in old_entries.items() if not (k == prefix or k.startswith(mine[1]))}
    merged.update({k: v for k, v in new_entries.items() if k == prefix or k.startswith(mine[1])})
    if meta_file == "zarr.json":
        old["consolidated_metadata"]["metadata"] = merged
    else:
        old["metadata"] = merged
    return json.dumps(old, indent=2).encode()


def _scratch_dir(store: Path) -> Path:
    """A scratch name on the store's file system: beside the store, else inside it."""
    beside = temp_sibling(store)
    if os.stat(store.parent).st_dev == os.stat(store).st_dev:
        return beside
    return store / beside.name


def _consolidate(path: Path) -> None:
    """Consolidate the metadata of a store written with ``update_sdata_path=False`` (spatialdata consolidates
    only the store at ``sdata.path``)."""
    import zarr

    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    with warnings.catch_warnings():
        # parquet files (shapes, points) are no zarr nodes: zarr says so, harmlessly (as spatialdata does)
        warnings.filterwarnings("ignore", category=getattr(zarr.errors, "ZarrUserWarning", UserWarning))
        zarr.consolidate_metadata(group.store)
    group.store.close()


def _write_table_alone(name: str, table, path: Path, formats: list):
    """Write ``table`` as the only element of a new store at ``path``; return it as read back from there."""
    import spatialdata as sd

    with warnings.catch_warnings():
        # a table on its own "annotates an element not present" in the scratch store: expected, not a problem
        warnings.filterwarnings("ignore", message=".*which is not present in the SpatialData object.*")
        SpatialData(tables={name: table}).write(path, sdata_formats=formats or None, update_sdata_path=False)
        _consolidate(path)
        return sd.read_zarr(path).tables[name]


#: how long an in-place table rewrite waits for another process writing the same store
STORE_LOCK_TIMEOUT_S = 600.0


def store_lock(store: str | os.PathLike, timeout: float = STORE_LOCK_TIMEOUT_S):
    """The lock serialising in-place writes to ``store`` (a ``.<store>.hopt_st.lock`` file beside it, so the
    store's own files never change for it)."""
    from .._lock import FileLock

    store = Path(store)
    path = store.with_name(f".{store.name}.hopt_st.lock")
    return FileLock(
        path,
        timeout,
        lambda holder: (
            f"store {str(store)!r} is being written by {holder} (lock file {str(path)!r}; waited {timeout:g} s). "
            "Wait for that run to finish."
        ),
        cleanup=True,
    )


def _merge_uns(ours: dict, theirs: dict) -> dict:
    """``theirs`` updated with ``ours`` (nested dicts merged, ours wins where both have a value)."""
    out = dict(theirs)
    for k, v in ours.items():
        out[k] = _merge_uns(v, theirs[k]) if isinstance(v, dict) and isinstance(theirs.get(k), dict) else v
    return out


def _merge_from_disk(table, store: Path, name: str) -> None:
    """Add to ``table`` what another process wrote to the store's table ``name`` since ``table`` was read:
    ``obsm`` / ``layers`` / ``obsp`` / ``varm`` entries, ``obs`` columns and ``uns`` keys it lacks (its own
    entries win). Refused when the rows or genes on disk are no longer the table's."""
    import spatialdata as sd

    if not (store / "tables" / name).is_dir():
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*which is not present in the SpatialData object.*")
        disk = sd.read_zarr(store, selection=("tables",)).tables.get(name)
    if disk is None:
        return
    if not (disk.obs_names.equals(table.obs_names) and disk.var_names.equals(table.var_names)):
        raise ValueError(
            f"table {name!r} of {str(store)!r} was rewritten with other spots or genes since it was read: read "
            "the store again and redo the step."
        )
    for attr in ("obsm", "layers", "obsp", "varm"):
        mine, theirs = getattr(table, attr), getattr(disk, attr)
        for k in theirs.keys():
            if k not in mine:
                mine[k] = theirs[k]
                logger.info("kept %s[%r] that another process wrote to %s", attr, k, store)
    for col in disk.obs.columns:
        if col not in table.obs.columns:
            table.obs[col] = disk.obs[col].to_numpy()
    table.uns = _merge_uns(dict(table.uns), dict(disk.uns))


def write_table_in_place(sdata: SpatialData, name: str, *, merge: bool = True) -> None:
    """Rewrite table ``name`` of a backed SpatialData in its own store, atomically and safely among processes.

    The table is written to a scratch store beside the store, read back and checked, then swapped in by
    renaming (the old one is deleted only once the new one is in place) and the consolidated metadata is
    replaced in one rename. On any failure (an invalid key, a full disk) the store is left as it was.

    Concurrent writers never lose each other's work (issue 20, rule 3): the rewrite holds the store's lock
    (:func:`store_lock`), and with ``merge`` first re-reads the table on disk and keeps the entries another
    process added since ``sdata`` was read (e.g. two ``hopt-st embed`` runs of different models on one store).

    Parameters
    ----------
    sdata
        A SpatialData read from a ``.zarr`` store (``sdata.path``).
    name
        The table to rewrite.
    """
    from spatialdata._core.validation import ValidationError, validate_table_attr_keys

    if sdata.path is None:
        raise ValueError(
            "The SpatialData is not backed by a .zarr store: write it with sdata.write(path) first."
        )
    store = Path(sdata.path)
    table = sdata.tables[name]
    try:
        validate_table_attr_keys(table)
    except (ValidationError, ValueError) as e:
        raise ValueError(f"table {name!r} cannot be written to {str(store)!r}: {NAME_RULE}. {e}") from None
    with store_lock(store):
        if merge:
            _merge_from_disk(table, store, name)
        _write_table_locked(store, name, table)
    logger.info("rewrote table %r in %s", name, store)


def _write_table_locked(store: Path, name: str, table) -> None:
    """The rewrite of :func:`write_table_in_place`, under the store's lock."""
    formats, meta_file = _store_format(store)
    scratch = _scratch_dir(store)
    # swap the table, or the whole "tables" group when the store has none yet
    rel = f"tables/{name}" if (store / "tables").is_dir() else "tables"
    try:
        back = _write_table_alone(name, table, scratch, formats)  # read back: the new table must be complete
        if back.shape != table.shape or set(back.obsm) != set(table.obsm):
            raise OSError(f"table {name!r} written to {str(scratch)!r} does not read back as written.")
        fsync_tree(scratch)
        metadata = _merged_metadata(store, scratch, meta_file, rel)
        _swap_in(scratch / rel, store / rel, scratch, store / meta_file if metadata else None, metadata)
    finally:
        remove(scratch)


def _swap_in(new: Path, dest: Path, scratch: Path, meta_path: Path | None, metadata: bytes | None) -> None:
    """Renames ``new`` onto ``dest`` (the old one kept in ``scratch`` until the metadata is in), then the
    consolidated metadata; on failure everything is renamed back."""
    old = scratch / "old-element"
    had_old = dest.exists()
    if had_old:
        os.rename(dest, old)
    try:
        os.rename(new, dest)
    except BaseException:
        if had_old:
            os.rename(old, dest)
        raise
    try:
        if meta_path is not None:
            atomic_write_bytes(meta_path, metadata, what="consolidated metadata")
    except BaseException:
        os.rename(dest, scratch / "failed-element")
        if had_old:
            os.rename(old, dest)
        raise


def write_sdata(sdata: SpatialData, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a whole SpatialData to ``path`` atomically: a scratch store beside it, then one rename.

    An existing store is replaced only with ``overwrite=True``, and only once the new one is complete.

    Parameters
    ----------
    sdata
        The data.
    path
        Output ``.zarr`` folder.
    overwrite
        Replace an existing ``path``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = check_overwrite(path, overwrite, "store")
    if path.exists() and sdata.path is not None and Path(sdata.path).resolve() == path.resolve():
        raise ValueError(
            f"{str(path)!r} is the store this SpatialData was read from: update it in place instead."
        )
    with atomic_dir(path) as scratch:  # the old store is deleted only once the new one is in place
        sdata.write(scratch, update_sdata_path=False)
        _consolidate(scratch)
        mark_ours(scratch, "store")  # a store of ours: one that overwrite=True may replace (rule 1)
    return path
