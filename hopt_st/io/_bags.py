"""Slides as bags of tile embeddings, read lazily: :class:`Bags` and the label table (:func:`read_labels`).

A bag is one slide's embedding file in HEST's layout (``embeddings``, ``coords``, ``barcodes`` = tile ids;
written by :func:`hopt_st.pp.embed_cohort` or :func:`hopt_st.io.write_embeddings`). :class:`Bags` holds only the
paths; each bag is read when it is asked for and dropped afterwards, so a cohort of 1,000 slides x 20,000 tiles
is never in memory at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .._h5 import open_h5
from ._cohort import model_folder
from ._embeddings import PROVENANCE_ATTR, SampleEmbeddings, read_embeddings, read_provenance

#: fields of an embedding file's provenance a MIL model depends on
BAG_PROVENANCE_FIELDS = ("model", "weights_sha256", "mpp", "patch_size")


def read_labels(labels: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """A label table: one row per slide, columns ``sample_id``, ``patient`` and one or more label columns.

    Parameters
    ----------
    labels
        A DataFrame or a CSV / TSV file. ``patient`` may be absent (each slide is then its own patient).

    Returns
    -------
    pandas.DataFrame
        ``sample_id`` and ``patient`` as str, the other columns as read.

    Raises
    ------
    ValueError
        No ``sample_id`` column, or a repeated ``sample_id``.
    """
    if isinstance(labels, pd.DataFrame):
        df, what = labels.copy(), "label table"
    else:
        path = Path(labels)
        if not path.is_file():
            raise FileNotFoundError(f"label table {str(path)!r} does not exist.")
        df = pd.read_csv(path, sep=None, engine="python", dtype={"sample_id": str, "patient": str})
        what = f"label table {str(path)!r}"
    if "sample_id" not in df.columns:
        raise ValueError(f"{what} needs a 'sample_id' column; it has {list(df.columns)}.")
    df["sample_id"] = df["sample_id"].astype(str).str.strip()
    dup = df["sample_id"][df["sample_id"].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"{what}: sample_id must be unique (one row per slide); repeated: {dup[:10]}.")
    if "patient" not in df.columns or df["patient"].isna().all():
        df["patient"] = df["sample_id"]
    df["patient"] = [s if p is None or p != p else str(p) for s, p in zip(df["sample_id"], df["patient"])]
    return df.reset_index(drop=True)


class Bags(Sequence):
    """Slides as bags of tile embeddings, one embedding file each, read one at a time.

    Parameters
    ----------
    paths
        One HEST-layout ``.h5`` embedding file per slide.
    sample_ids
        Their names; default the file stems.
    patients
        Their patients (for patient-level splits); default the sample ids.

    Notes
    -----
    ``bags[i]`` reads file ``i`` (a :class:`~hopt_st.io.SampleEmbeddings`); ``bags[[i, j]]`` or
    ``bags.subset(idx)`` is another :class:`Bags` over those files, reading nothing. Every bag read is checked
    against the provenance of the first (model, weights, µm/px, patch size): bags of two encoders are refused.

    Examples
    --------
    >>> bags = Bags.from_cohort("embeddings/", "h-optimus-1", labels)  # doctest: +SKIP
    >>> bag = bags[0]  # doctest: +SKIP
    >>> bag.embeddings.shape  # doctest: +SKIP
    (18234, 1536)
    """

    def __init__(self, paths, sample_ids=None, patients=None):
        self.paths = [Path(p) for p in paths]
        n = len(self.paths)
        self.sample_ids = [p.stem for p in self.paths] if sample_ids is None else [str(s) for s in sample_ids]
        self.patients = list(self.sample_ids) if patients is None else [str(p) for p in patients]
        if len(self.sample_ids) != n or len(self.patients) != n:
            raise ValueError(
                f"{n} paths but {len(self.sample_ids)} sample_ids and {len(self.patients)} patients."
            )
        self._provenance: dict | None = None

    # -- constructors --
    @classmethod
    def from_cohort(cls, out_dir: str | os.PathLike, model, labels=None) -> Bags:
        """The bags :func:`hopt_st.pp.embed_cohort` wrote to ``<out_dir>/<model>/<sample_id>.h5``.

        Parameters
        ----------
        out_dir
            The ``out_dir`` given to ``embed_cohort``.
        model
            Model name (or :class:`~hopt_st.models.ModelSpec`).
        labels
            Label table (see :func:`read_labels`): which slides, in which order, with their patients.
            ``None``: every ``.h5`` in the folder, sorted.

        Raises
        ------
        FileNotFoundError
            The folder, or a labelled slide's file, does not exist.
        """
        folder = model_folder(out_dir, model)
        if labels is None:
            paths = sorted(folder.glob("*.h5"))
            return cls(paths)
        table = read_labels(labels)
        paths = [folder / f"{sid}.h5" for sid in table["sample_id"]]
        missing = [p.stem for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} labelled slides have no embedding file in {str(folder)!r}, e.g. {missing[:5]}: "
                "embed them (see status.csv of embed_cohort) or drop them from the label table."
            )
        return cls(paths, table["sample_id"], table["patient"])

    # -- sequence --
    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice | list | np.ndarray | range):
            return self.subset(np.arange(len(self))[i] if isinstance(i, slice | range) else i)
        bag = read_embeddings(self.paths[int(i)])
        self._check(bag.provenance, self.paths[int(i)])
        return bag

    def subset(self, idx) -> Bags:
        """The bags at positions ``idx`` (ints or a boolean mask), reading nothing."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        out = Bags(
            [self.paths[i] for i in idx], [self.sample_ids[i] for i in idx], [self.patients[i] for i in idx]
        )
        out._provenance = self._provenance
        return out

    def __repr__(self, /) -> str:
        return f"Bags({len(self)} slides, model {self.provenance.get('model', '?')!r})"

    # -- provenance --
    @property
    def provenance(self) -> dict:
        """The provenance of the first bag's file (model, weights, µm/px, patch size, ...); ``{}`` if none."""
        if self._provenance is None:
            self._provenance = read_provenance(self.paths[0]) if self.paths else {}
        return self._provenance

    def _check(self, found: dict, path: Path) -> None:
        ref = self.provenance
        diffs = [
            f"{k}: {ref[k]!r} vs {found[k]!r}"
            for k in BAG_PROVENANCE_FIELDS
            if k in ref and k in found and str(ref[k]) != str(found[k])
        ]
        if diffs:
            raise ValueError(
                f"bag {str(path)!r} was embedded differently from {str(self.paths[0])!r} ({'; '.join(diffs)}): "
                "a cohort's bags must come from one encoder, weights and patch geometry; re-embed it."
            )

    def arrays(self, i) -> np.ndarray:
        """Bag ``i``'s embeddings only, float32 ``(n_tiles, dim)`` (the file's other datasets are not read)."""
        path = self.paths[int(i)]
        try:
            with open_h5(path) as f:  # refuses data from outside the file (rule 4)
                emb = np.asarray(f["embeddings"][:], dtype=np.float32)
                raw = f.attrs.get(PROVENANCE_ATTR)
        except (OSError, KeyError) as e:
            raise ValueError(
                f"bag {str(path)!r} cannot be read as an embedding file ({e}); re-embed the slide."
            ) from e
        self._check({} if raw is None else json.loads(raw), path)
        return emb

    def iter(self):
        """The bags in order, one at a time (:class:`~hopt_st.io.SampleEmbeddings`)."""
        for i in range(len(self)):
            yield self[i]


class ArrayBags(Bags):
    """Bags held in memory (a list of ``(n_tiles, dim)`` arrays), for small experiments and tests.

    Parameters
    ----------
    arrays
        One array per slide.
    sample_ids
        Their names; default ``"0", "1", ...``.
    patients
        Their patients; default the sample ids.
    provenance
        What the embeddings were computed with (as an embedding file's).
    """

    def __init__(self, arrays, sample_ids=None, patients=None, provenance=None):
        arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
        ids = [str(i) for i in range(len(arrays))] if sample_ids is None else sample_ids
        super().__init__([Path(str(s)) for s in ids], ids, patients)
        self._arrays = arrays
        self._provenance = dict(provenance or {})

    def __getitem__(self, i):
        if isinstance(i, slice | list | np.ndarray | range):
            return self.subset(np.arange(len(self))[i] if isinstance(i, slice | range) else i)
        a = self._arrays[int(i)]
        return SampleEmbeddings(
            embeddings=a, barcodes=np.arange(len(a)).astype(str), provenance=dict(self._provenance)
        )

    def arrays(self, i) -> np.ndarray:
        return self._arrays[int(i)]

    def subset(self, idx) -> ArrayBags:
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return ArrayBags(
            [self._arrays[i] for i in idx],
            [self.sample_ids[i] for i in idx],
            [self.patients[i] for i in idx],
            self._provenance,
        )


def as_bags(bags) -> Bags:
    """A :class:`Bags` as is; a list of arrays as :class:`ArrayBags`."""
    if isinstance(bags, Bags):
        return bags
    if isinstance(bags, Sequence) and all(isinstance(b, np.ndarray) for b in bags):
        return ArrayBags(bags)
    raise TypeError(
        f"bags must be a hopt_st.io.Bags (e.g. Bags.from_cohort) or a list of (n_tiles, dim) arrays; got "
        f"{type(bags).__name__}."
    )
