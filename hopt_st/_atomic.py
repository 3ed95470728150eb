"""Atomic writes: a file or folder appears under its final name complete, or not at all.

Everything hopt_st writes goes through here: the data are written under a temporary name in the same folder
(so the final rename never crosses file systems), flushed to disk (``fsync``), then renamed over the final
name with ``os.replace``. Any failure (disk full, interrupted, invalid content) removes the temporary and
leaves what was there before exactly as it was. Temporary names start with a dot and end in ``.tmp``
(``.<name>.<random>.tmp``), so globbing for ``*.h5`` or ``*.csv`` never picks them up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

#: suffix of every temporary file or folder (a crash may leave one behind; they are safe to delete)
TMP_SUFFIX = ".tmp"


def temp_sibling(path: str | os.PathLike, tag: str = "") -> Path:
    """A fresh hidden name in the folder of ``path`` (same file system, so it can be renamed onto it)."""
    path = Path(path)
    return path.with_name(f".{path.name}{tag}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def tmp_pattern(path: Path) -> str:
    """Glob pattern of the temporary files :func:`atomic_path` creates for ``path``."""
    return f".{path.name}.*{TMP_SUFFIX}"


def remove_stale_tmp(path: Path) -> int:
    """Delete temporary files left for ``path`` by a writer that died; returns how many were removed."""
    n = 0
    for tmp in path.parent.glob(tmp_pattern(path)):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            n += 1
    return n


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file (or a folder's entries) to disk; a no-op where the platform cannot open folders."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except (IsADirectoryError, PermissionError):  # Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on folders
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file and folder under ``path`` (a folder written by a third-party writer)."""
    for root, _, files in os.walk(path):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(root)


def remove(path: str | os.PathLike, *, settle_s: float = 5.0) -> None:
    """Delete a file or folder if it exists (used on the way out of a failed write).

    After a failed write a third-party writer (zarr's asynchronous I/O) may still finish a few files in the
    folder; it is deleted again until it stays gone, for up to ``settle_s`` seconds.
    """
    p = Path(path)
    if not (p.is_dir() and not p.is_symlink()):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        return
    deadline = time.monotonic() + settle_s
    while True:
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            time.sleep(0.05)  # a straggling write would recreate it now
            if not p.exists():
                return
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


def check_free_space(path: str | os.PathLike, nbytes: int, what: str = "file") -> None:
    """Refuse (``OSError`` ENOSPC) to start a write of about ``nbytes`` where there is less room than that.

    Parameters
    ----------
    path
        The file to be written (its folder's file system is checked).
    nbytes
        Expected size of the file.
    what
        What is written, for the message.
    """
    folder = Path(path).parent
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise OSError(
            errno.ENOSPC,
            f"not enough disk space to write {what} {str(path)!r}: it needs about {nbytes / 2**20:.1f} MiB and "
            f"{str(folder)!r} has {free / 2**20:.1f} MiB free. Free some space or write it elsewhere",
            str(path),
        )


def check_overwrite(path: str | os.PathLike, overwrite: bool, what: str = "file") -> Path:
    """``path`` as a Path; ``FileExistsError`` when it exists and ``overwrite`` is false."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{what} {str(path)!r} already exists: pass overwrite=True to replace it.")
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {what} {str(path)!r}: folder {str(path.parent)!r} does not exist."
        )
    return path


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, overwrite: bool = True, what: str = "file", expected_bytes: int | None = None
) -> Iterator[Path]:
    """Context manager: write to the yielded temporary path; on success it replaces ``path`` atomically.

    Parameters
    ----------
    path
        Final file (or folder) name.
    overwrite
        Replace an existing ``path``; ``False`` raises ``FileExistsError`` before anything is written.
    what
        What is written, for messages.
    expected_bytes
        When given, the free space of the folder is checked first (``OSError`` ENOSPC).

    Yields
    ------
    pathlib.Path
        The temporary name (same folder, hidden). The caller writes (and closes) it inside the block; it is
        then flushed to disk and renamed onto ``path``. Whatever goes wrong inside the block, it is removed and
        ``path`` is left as it was.
    """
    path = check_overwrite(path, overwrite, what)
    if expected_bytes is not None:
        check_free_space(path, expected_bytes, what)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if tmp.is_dir():
            fsync_tree(tmp)
            replace_dir(tmp, path)
        else:
            fsync_path(tmp)
            os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        remove(tmp)
        raise


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes, *, overwrite: bool = True, what: str = "file"
) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, overwrite=overwrite, what=what, expected_bytes=len(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def replace_dir(new: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Put folder ``new`` at ``dest`` (same file system); an existing ``dest`` is only deleted once ``new`` is in.

    Two renames: ``dest`` is moved aside, ``new`` takes its name; if the second rename fails the first one is
    undone, so ``dest`` is never missing and never half-written.
    """
    new, dest = Path(new), Path(dest)
    if not dest.exists():
        os.rename(new, dest)
        return
    aside = temp_sibling(dest, ".old")
    os.rename(dest, aside)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    remove(aside)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder path next to ``path`` (not created); when the block ends without error, what
    was written there is flushed to disk and replaces ``path``.

    An existing ``path`` (folder or file) is first moved aside and deleted only once the new folder is in place
    (:func:`replace_dir`), so a failure at any point leaves either the old ``path`` or the new one, never a mix.
    On error the temporary folder is removed and ``path`` is left untouched.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, path)
        fsync_path(path.parent)
    finally:
        remove(tmp)


def path_inside(base: str | os.PathLike, *parts: str, what: str = "output") -> Path:
    """``base / parts...``, refused (``ValueError``, both paths named) when it would lie outside ``base``.

    Output paths derived from names a user gives (a model name, a sample id) stay inside the output folder the
    user named (issue 20, rule 4): ``"../../x"``, an absolute path or a name with a path separator that climbs
    out is refused, whatever exists on disk (symlinks inside ``base`` are resolved too).
    """
    base = Path(base)
    path = base.joinpath(*parts)
    root = _resolved(base)
    target = _resolved(path)
    if (
        any(not p or Path(p).is_absolute() for p in parts)
        or not target.is_relative_to(root)
        or target == root
    ):
        raise ValueError(
            f"the {what} path {str(path)!r}, made from {list(parts)!r}, would lie outside {str(base)!r} "
            f"({str(target)!r}): names that become folders must stay inside the output folder. Use a plain name "
            "(letters, digits, '_', '-', '.')."
        )
    return path


# ------------------------------------------------------------------------------------------------------------
# what an output may replace (issue 20, rule 1)
# ------------------------------------------------------------------------------------------------------------
#: file hopt_st leaves inside every whole store it writes (``--out`` of embed and predict, demo.zarr): the
#: store is then "ours", one that ``overwrite`` may replace
OUTPUT_MARKER = ".hopt_st_output"


def mark_ours(store: str | os.PathLike, writer: str) -> None:
    """Leave :data:`OUTPUT_MARKER` in a store being written (call it on the temporary store, before the rename)."""
    import json

    Path(store, OUTPUT_MARKER).write_text(json.dumps({"writer": "hopt_st", "what": writer}) + "\n")


def ours(path: str | os.PathLike) -> bool:
    """Whether ``path`` is something hopt_st wrote and may replace with ``overwrite``: a store holding
    :data:`OUTPUT_MARKER`, an .h5ad with hopt_st's ``uns["hopt_st"]``, a PNG drawn by matplotlib, a regressor or
    embedding file of hopt_st's. A folder the user owns (anything else) is never ours."""
    p = Path(path)
    if p.is_symlink():
        return False
    if p.is_dir():
        return (p / OUTPUT_MARKER).is_file()
    suffix = p.suffix.lower()
    try:
        if suffix == ".h5ad":
            import h5py

            with h5py.File(p, "r") as f:
                return "uns" in f and "hopt_st" in f["uns"]
        if suffix == ".png":
            from PIL import Image

            with Image.open(p) as im:
                return im.format == "PNG" and str(im.info.get("Software", "")).startswith("Matplotlib")
    except OSError:
        return False
    return False


def _resolved(path: str | os.PathLike) -> Path:
    """``path`` with symlinks resolved; a symlink loop (Python raises for it) is taken as it stands."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(path))


def _relation(out: Path, inp: Path) -> str | None:
    """How ``out`` and ``inp`` (both resolved) overlap: ``"is"``, ``"contains"``, ``"lies inside"`` or None."""
    if out == inp:
        return "is"
    if inp.is_relative_to(out):
        return "contains"
    if out.is_relative_to(inp):
        return "lies inside"
    return None


def check_output(
    out: str | os.PathLike,
    *,
    inputs=(),
    overwrite: bool,
    what: str = "--out",
    replaceable=ours,
) -> Path:
    """The one check before a command writes ``out``: ``overwrite`` replaces an output, never an input or a
    folder the user owns (issue 20, rule 1).

    Refused, with both paths named: ``out`` that is or contains one of ``inputs`` (``ValueError``, whatever
    ``overwrite`` says), an existing ``out`` without ``overwrite`` (``FileExistsError``), and, with
    ``overwrite``, an existing ``out`` that lies inside an input or that ``replaceable`` does not recognise as
    something this command writes (``FileExistsError``: delete it yourself or choose another name).

    Parameters
    ----------
    out
        The output file or folder.
    inputs
        Paths the command reads (None entries are skipped); symlinks are resolved.
    overwrite
        The user's ``--overwrite``.
    what
        How the output is named in messages (the flag).
    replaceable
        ``replaceable(path) -> bool``: whether an existing ``out`` is of ours (default :func:`ours`).

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    out = check_not_input(out, inputs=inputs, overwrite=overwrite, what=what)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{what} {str(out)!r} already exists: pass overwrite=True to replace it.")
        if not replaceable(out):
            kind = "folder" if out.is_dir() else "file"
            raise FileExistsError(
                f"{what} {str(out)!r} is a {kind} hopt_st did not write (no {OUTPUT_MARKER!r} marker of a store "
                "of ours, or not a file of ours): it is not replaced, even with overwrite=True. Delete it "
                f"yourself if you mean to, or choose another {what}."
            )
    return out


def check_not_input(
    out: str | os.PathLike, *, inputs=(), overwrite: bool = False, what: str = "--out"
) -> Path:
    """The part of :func:`check_output` about inputs: ``out`` that is or contains an input is refused
    (``ValueError``); an existing ``out`` inside an input is refused with ``overwrite`` (``FileExistsError``)."""
    out = Path(out)
    rout = _resolved(out)
    for inp in inputs:
        if inp is None:
            continue
        rel = _relation(rout, _resolved(inp))
        if rel in ("is", "contains"):
            raise ValueError(
                f"{what} {str(out)!r} {rel} the input {str(inp)!r}: an output never replaces an input. Choose "
                f"another {what}."
            )
        if rel == "lies inside" and out.exists() and overwrite:
            raise FileExistsError(
                f"{what} {str(out)!r} lies inside the input {str(inp)!r}: it is not replaced, even with "
                f"overwrite=True. Choose another {what}."
            )
    return out
