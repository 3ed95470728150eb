"""Check what every reader promises of a count table: raw counts (non-negative integers), at least one spot,
unique barcodes; and read AnnData files with errors that name the file."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from anndata import AnnData
from scipy import sparse

from .._errors import CorruptFileError
from .._h5 import ExternalDataError, check_h5_file, open_h5
from .._patchset import check_unique_barcodes

logger = logging.getLogger(__name__)

_SAMPLE = 200_000  # values looked at when checking a file's counts


def non_count_values(x, sample: int | None = None) -> np.ndarray:
    """The values of a (sparse) matrix that are not counts: negative, non-integer, NaN or inf.

    Parameters
    ----------
    x
        Dense or sparse matrix (only stored values of a sparse one are looked at).
    sample
        Look at the first ``sample`` stored values only (a cheap check of large matrices); all when ``None``.

    Returns
    -------
    The offending values (empty when ``x`` holds counts).
    """
    v = np.asarray(x.data) if sparse.issparse(x) else np.asarray(x).ravel()
    if np.issubdtype(v.dtype, np.integer) or v.dtype == bool:
        return v[v < 0] if np.issubdtype(v.dtype, np.signedinteger) else v[:0]
    if sample is not None and v.size > sample:
        v = v[:sample]
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(v) | (v < 0) | (v != np.round(v))
    return v[bad]


def ensure_raw_counts(adata: AnnData, path: str | Path, *, required: bool = True) -> bool:
    """Make ``adata.X`` raw counts, in place, or raise.

    When ``X`` is not integer-valued but ``layers["counts"]`` or ``adata.raw`` is, that is used instead
    (with a log message); otherwise a ``ValueError`` names the file, shows offending values and the fix.
    With ``required=False`` processed values are kept as they are (logged) and ``False`` is returned.
    """
    bad = non_count_values(adata.X, _SAMPLE)
    if bad.size == 0:
        return True
    for name in ("counts", "raw_counts"):
        if name in adata.layers and non_count_values(adata.layers[name], _SAMPLE).size == 0:
            logger.info("%s: X is not raw counts; using layers[%r].", path, name)
            adata.X = adata.layers[name]
            return True
    if (
        adata.raw is not None
        and adata.raw.shape == adata.shape
        and non_count_values(adata.raw.X, _SAMPLE).size == 0
    ):
        logger.info("%s: X is not raw counts; using adata.raw.X.", path)
        adata.X = adata.raw.X
        return True
    if not required:
        logger.info(
            "%s holds no raw counts (X: e.g. %s); its values are kept as they are: fit them with target='none'.",
            path,
            np.unique(bad)[:3].tolist(),
        )
        return False
    raise ValueError(
        f"{str(path)!r} does not hold raw counts: X has non-integer or negative values "
        f"(e.g. {np.unique(bad)[:5].tolist()}), and there is no integer layers['counts'] or adata.raw. "
        "hopt_st needs the raw UMI counts (it normalises itself): use the unnormalised matrix, e.g. the "
        "Space Ranger filtered_feature_bc_matrix.h5 or the HEST st/{id}.h5ad as downloaded."
    )


def check_spots(adata: AnnData, path: str | Path) -> None:
    """Refuse a table without spots or with duplicate barcodes (``obs_names``), naming the file."""
    if adata.n_obs == 0:
        raise ValueError(
            f"{str(path)!r} holds 0 spots: there is nothing to embed or predict. Check that it is the right "
            "file (e.g. the filtered matrix of a Space Ranger run with tissue on the slide)."
        )
    check_unique_barcodes(adata.obs_names, f"{str(path)!r}")


def read_h5ad(path: str | Path) -> AnnData:
    """``anndata.read_h5ad``, with a truncated or garbled file reported as :class:`CorruptFileError`."""
    import anndata as ad

    try:
        with warnings.catch_warnings():
            # duplicate obs/var names: check_spots refuses them with the file and the barcodes named
            warnings.filterwarnings("ignore", message=".* names are not unique", category=UserWarning)
            check_h5_file(path)  # refuses data from outside the file (rule 4)
            return ad.read_h5ad(path)
    except ExternalDataError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CorruptFileError.from_error(path, e, what="AnnData file") from None


def check_h5_readable(path: str | Path) -> None:
    """Read every dataset of an HDF5 file (a small one, e.g. counts) and raise :class:`CorruptFileError` if any
    part is unreadable."""
    import h5py

    def visit(_, obj):
        if isinstance(obj, h5py.Dataset):
            obj[()]

    try:
        with open_h5(path) as f:  # refuses data from outside the file (rule 4)
            f.visititems(visit)
    except ExternalDataError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CorruptFileError.from_error(path, e, what="HDF5 file") from None
