"""Where embeddings come from, and the check that a regressor is applied to embeddings of the same kind.

:func:`hopt_st.pp.embed` records, next to every ``obsm`` key it writes, the model, the sha256 of its weights,
the µm/px and the side of the patches (``uns["hopt_st"]["embeddings"][key]``). A regressor fit on such
embeddings keeps that record (``provenance_``); applying it to embeddings of another model, other weights or
another patch geometry gives numbers without meaning, so :func:`check_provenance` refuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from .._constants import UNS_KEY

logger = logging.getLogger(__name__)

#: what the embeddings depend on (keys of ``uns["hopt_st"]["embeddings"][key]``); ``projection_sha256`` is the
#: PCA of a token map (:func:`hopt_st.pp.token_features`), compared only when both records hold it
PROVENANCE_FIELDS = ("model", "weights_sha256", "mpp", "patch_size", "projection_sha256")
_MPP_RTOL = 1e-3


def _plain(v):
    """A JSON-able Python scalar (values read back from .zarr / .h5ad are numpy scalars or 0-d arrays)."""
    v = np.asarray(v).item() if isinstance(v, (np.ndarray, np.generic)) else v
    return v.decode() if isinstance(v, bytes) else v


def embedding_provenance(adata, use_rep: str) -> dict:
    """The provenance :func:`hopt_st.pp.embed` recorded for ``adata.obsm[use_rep]``.

    Parameters
    ----------
    adata
        The spots (an AnnData).
    use_rep
        The ``obsm`` key.

    Returns
    -------
    dict
        ``{"model", "weights_sha256", "mpp", "patch_size"}`` (those recorded), or ``{}`` when nothing is.
    """
    rec = adata.uns.get(UNS_KEY, {}).get("embeddings", {}).get(use_rep) if hasattr(adata, "uns") else None
    if not isinstance(rec, Mapping):
        return {}
    return {k: _plain(rec[k]) for k in PROVENANCE_FIELDS if k in rec}


def _normalised(field: str, v):
    """``v`` as compared: a float for ``mpp`` and ``patch_size``, a string otherwise (values read back from a file
    may be numpy scalars, bytes or the text of a number, e.g. HDF5 / JSON attributes give ``"224"`` for 224)."""
    v = _plain(v)
    if field in ("mpp", "patch_size"):
        try:
            return float(v)
        except (TypeError, ValueError):
            pass  # not a number: compared as text
    return str(v)


def provenance_differences(expected: Mapping, found: Mapping, fields=PROVENANCE_FIELDS) -> list[str]:
    """``"field: expected (fit) vs found (given)"`` for every one of ``fields`` both records hold and on which
    they differ, the values normalised first (:func:`_normalised`): ``mpp`` within a relative 1e-3, the others
    equal."""
    out = []
    for k in fields:
        if k not in expected or k not in found:
            continue
        a, b = _plain(expected[k]), _plain(found[k])
        na, nb = _normalised(k, a), _normalised(k, b)
        if k == "mpp" and isinstance(na, float) and isinstance(nb, float):
            same = np.isclose(na, nb, rtol=_MPP_RTOL, atol=0)
        else:
            same = na == nb
        if not same:
            out.append(f"{k}: {a!r} (fit) vs {b!r} (given)")
    return out


def check_provenance(expected: Mapping | None, found: Mapping | None, *, what: str) -> None:
    """Refuse embeddings that do not come from the model, weights, µm/px and patch size of a fitted regressor.

    Parameters
    ----------
    expected
        The regressor's record (``regressor.provenance_``); nothing is checked when empty.
    found
        The record of the embeddings given (:func:`embedding_provenance`); when empty the check cannot be
        made and a warning is logged.
    what
        Which embeddings, for the message (e.g. ``"obsm['X_uni']"``).

    Raises
    ------
    ValueError
        A field differs; the message lists them and says how to override (``check_provenance=False``).
    """
    if not expected:
        return
    if not found:  # nothing recorded
        logger.warning(
            "%s records no provenance (model, weights, µm/px, patch size): cannot check that it matches the "
            "regressor's (%s).",
            what,
            dict(expected),
        )
        return
    diffs = provenance_differences(expected, found)
    if diffs:
        raise ValueError(
            f"{what} does not come from what the regressor was fit on ({'; '.join(diffs)}): its predictions "
            "would be meaningless. Embed with the same model, weights, µm/px and patch size (pp.embed records "
            "them), or pass check_provenance=False if you know they are equivalent."
        )
