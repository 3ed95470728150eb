"""``pp.embed_cohort``: embed every sample of a cohort once, in this process or on a Dask cluster.

One idempotent task per sample reads the sample, cuts its patches, embeds them with an encoder built once per
process (:func:`hopt_st.models.get_encoder`) and writes ``<out_dir>/<model>/<sample_id>.h5`` atomically in
HEST's embedding-file layout (:func:`hopt_st.io.write_embeddings`), with a fingerprint of what it was computed
from. Without a client the tasks run here, one after the other; with a :class:`distributed.Client` they are
submitted to its cluster (``retries`` re-runs tasks that raised; Dask itself re-runs a task whose worker
died). A sample whose file already has the same fingerprint is skipped without reading it; a failing sample
is recorded in ``status.csv`` and the others go on. The scheduler is Dask's: there is none here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .._atomic import atomic_write_bytes, check_not_input
from .._docs import inject_docs
from .._patchset import Patches
from ..io._cohort import model_dirname, read_cohort, read_sample, sample_files
from ..io._embeddings import read_fingerprint, read_provenance, write_embeddings
from ..models import ModelSpec, get_encoder, get_spec
from ..models._encoder import weights_file
from ..models._weights import file_version, remember_sha256, weights_sha256
from ._device import select_device, select_dtype
from ._embed import _run_info, _weights_id, embed, provenance, spec_identity
from ._patches import patches
from ._slide_tiles import slide_tiles

logger = logging.getLogger(__name__)

#: columns of ``status.csv`` and of the table :func:`embed_cohort` returns
STATUS_COLUMNS = ["sample", "status", "n_spots", "seconds", "error"]
_FINGERPRINT_VERSION = 1
_OUTSIDE = "drop"  # spots whose patch lies entirely outside the image get no embedding (as in HEST's files)
_MAX_ERROR = 500


@dataclass(frozen=True)
class CohortModel:
    """The model of a run as every sample's task needs it (see :func:`cohort_model`): small, picklable."""

    spec: ModelSpec
    weights: str | None  # the resolved weight file, None for a model without weights
    weights_version: tuple | None  # (resolved path, size, mtime_ns) of that file
    weights_sha256: str  # "none" without weights
    dtype: str | None  # requested compute precision; None: the device's default

    def _fingerprint_payload(self, row: dict) -> dict:
        spec = self.spec
        return {
            "version": _FINGERPRINT_VERSION,
            "sample": {
                "sample_id": row["sample_id"],
                "kind": row["kind"],
                "image_mpp": row.get("image_mpp"),
                "files": sample_files(row),
            },
            "model": [spec.name, spec.arch, *spec_identity(spec)],
            "weights": self.weights_sha256,
            "geometry": {"patch_size": spec.input_size, "mpp": spec.mpp, "outside": _OUTSIDE, "fill": 255},
            "dtype": self.dtype or "auto",
        }

    def fingerprint(self, row: dict) -> str:
        """sha256 of what a sample's embeddings depend on: the sample's files (names, sizes, modification
        times), the model, its weights, the patch geometry and the requested precision. The one definition of
        an embedding file's identity, shared by :func:`embed_cohort` and :func:`hopt_st.bench.run`."""
        return _sha256(self._fingerprint_payload(row))

    def fingerprint_parts(self, row: dict) -> dict[str, str]:
        """A digest of each part of :meth:`fingerprint` (:data:`FINGERPRINT_PARTS`), recorded in the file's
        provenance so that a refusal can say which part differs."""
        payload = self._fingerprint_payload(row)
        return {name: _sha256([payload[k] for k in keys])[:16] for name, keys in FINGERPRINT_PARTS.items()}


#: the parts of an embedding file's fingerprint, as refusals name them, and the payload keys of each
FINGERPRINT_PARTS = {
    "source files": ("version", "sample"),
    "model": ("model",),
    "weights": ("weights",),
    "geometry": ("geometry", "dtype"),
}


def _sha256(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def other_fingerprint_message(path: Path, job: _Job) -> str:
    """Why an existing embedding file of ours is not this job's: which fingerprint parts differ (as recorded in
    its provenance), and how to replace it. The one refusal of :func:`embed_cohort` and
    :func:`hopt_st.bench.run`."""
    try:
        recorded = read_provenance(path).get("fingerprint_parts")
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, dict):
        differ = [name for name, digest in job.parts if recorded.get(name) != digest]
        what = f"other {', '.join(differ)}" if differ else "another fingerprint"
    else:
        what = "another fingerprint (the file does not record which part: model, weights, geometry or source files)"
    return (
        f"{str(path)!r} exists and was computed with {what} than this run: pass overwrite=True (--overwrite) "
        "to replace it, or write elsewhere."
    )


@dataclass(frozen=True)
class _Job:
    """Everything a task needs for one sample: small, picklable, no open files."""

    row: dict
    model: CohortModel
    device: str | None
    batch_size: int | None
    path: str
    fingerprint: str
    overwrite: bool
    parts: tuple = ()  # (name, digest) of the fingerprint's parts (CohortModel.fingerprint_parts)


# ----------------------------------------------------------------------------------------------------------
# identity
# ----------------------------------------------------------------------------------------------------------
def cohort_model(model: str | ModelSpec, weights=None, dtype=None) -> CohortModel:
    """The spec, the weight file (resolved here: found in the Hugging Face cache or downloaded), its version
    and sha256 (hashed at most once per file version and process), and the precision's name."""
    spec = get_spec(model)
    dtype_name = (
        None if dtype is None else str(select_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")
    )
    path = weights_file(spec, weights, True, torch.device("cpu"))
    if path is None:
        return CohortModel(spec, None, None, "none", dtype_name)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist.")
    return CohortModel(spec, str(path), file_version(path), weights_sha256(path), dtype_name)


def sample_job(
    row: dict,
    model: CohortModel,
    path: str | os.PathLike,
    *,
    device: str | None = None,
    batch_size: int | None = None,
    overwrite: bool = False,
) -> _Job:
    """The task of one cohort row (from :func:`hopt_st.io.read_cohort`) that writes ``path``; run it with
    :func:`embed_sample`."""
    return _Job(
        row,
        model,
        device,
        batch_size,
        str(path),
        model.fingerprint(row),
        overwrite,
        tuple(model.fingerprint_parts(row).items()),
    )


def _existing_fingerprint(path: Path) -> str | None:
    """The fingerprint of an existing output; ``""`` for a file that is not one of ours (or unreadable)."""
    if not path.exists():
        return None
    try:
        return read_fingerprint(path) or ""
    except (OSError, ValueError):
        return ""


# ----------------------------------------------------------------------------------------------------------
# the task
# ----------------------------------------------------------------------------------------------------------
def _row(sample: str, status: str, n_spots=None, seconds=None, error: str = "") -> dict:
    return {"sample": sample, "status": status, "n_spots": n_spots, "seconds": seconds, "error": error}


def _n_rows(path: Path) -> int | None:
    from .._h5 import open_h5

    try:
        with open_h5(path) as f:
            return int(f["embeddings"].shape[0])
    except (OSError, KeyError):
        return None


def embed_sample(job: _Job) -> dict:
    """Embed one sample and write its file (the task of :func:`embed_cohort`); returns its status row.

    Idempotent: when the file already holds this fingerprint (written by an earlier attempt whose worker died
    afterwards) nothing is computed. Errors propagate (the caller records them).
    """
    import dask

    # this process's own threads compute the sample's small dask graphs (spot transforms, image metadata);
    # on a Dask worker they would otherwise go back to the cluster as tasks of their own, 30x slower
    with dask.config.set(scheduler="threads"):
        return _embed_sample(job)


def _embed_sample(job: _Job) -> dict:
    t0 = time.perf_counter()
    sid, path, model = job.row["sample_id"], Path(job.path), job.model
    spec = model.spec
    existing = _existing_fingerprint(path)
    if existing == job.fingerprint and not job.overwrite:
        return _row(sid, "done", _n_rows(path), round(time.perf_counter() - t0, 3))
    if existing is not None and not job.overwrite:
        raise ValueError(other_fingerprint_message(path, job))
    data = read_sample(job.row)
    grid = (
        slide_tiles(data, spec.input_size, spec.mpp) if job.row["kind"] == "slide" else None
    )  # a bag of tiles
    source = (
        data
        if isinstance(data, Patches)
        else patches(data, table_name=grid, patch_size=spec.input_size, target_mpp=spec.mpp, outside=_OUTSIDE)
    )
    weights = model.weights
    if weights is not None and model.weights_version is not None:
        if Path(weights).is_file():
            remember_sha256(model.weights_version, model.weights_sha256)  # no re-hashing of a known file
        else:  # a Hub file resolved by the client but not visible here: resolve it on this worker
            weights = None
    dev = select_device(job.device)
    cdtype = select_dtype(model.dtype, dev)
    encoder = get_encoder(spec, weights=weights, device=dev)  # built once per process
    weights_id = _weights_id(encoder)
    if model.weights_sha256 != "none" and weights_id != model.weights_sha256:
        raise RuntimeError(
            f"the weights on this worker (sha256 {weights_id[:12]}) are not the ones the cohort was "
            f"fingerprinted with ({model.weights_sha256[:12]}): give every worker the same weights file."
        )
    emb = embed(source, encoder, device=dev, dtype=cdtype, batch_size=job.batch_size, progress=False)
    info, _ = _run_info(spec, source, weights_id, cdtype)
    prov = provenance(spec, encoder, info, dev)
    prov.update(
        sample_id=sid,
        patient=job.row.get("patient"),
        kind=job.row["kind"],
        source=job.row["source"],
        n_spots=len(source),
        seconds=round(time.perf_counter() - t0, 3),
        fingerprint_parts=dict(job.parts),
    )
    has_xy = source.centers is not None and source.patch_size_src is not None
    write_embeddings(
        path,
        emb,
        source.barcodes,
        coords=source.coords if has_xy else None,
        centers=source.centers,
        fingerprint=job.fingerprint,
        provenance=prov,
        overwrite=True,  # checked above; a file written meanwhile by a dead attempt of this task is ours
    )
    return _row(sid, "done", len(source), round(time.perf_counter() - t0, 3))


# ----------------------------------------------------------------------------------------------------------
# status.csv
# ----------------------------------------------------------------------------------------------------------
class _Status:
    """This run's rows, merged into the folder's status file (rows of other samples are kept) after each change."""

    def __init__(self, path: Path, order: list[str]):
        self.path, self.order = path, order
        self.rows: dict[str, dict] = {}
        self.previous = self._read()

    def _read(self) -> pd.DataFrame:
        """The rows in the status file now (another run into the same folder may have written some)."""
        if self.path.is_file():
            try:
                prev = pd.read_csv(self.path, dtype={"sample": str, "error": str}, keep_default_na=False)
                if set(STATUS_COLUMNS) <= set(prev.columns):
                    return prev[STATUS_COLUMNS]
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
                logger.warning("%s is unreadable; it is rewritten.", self.path)
        return pd.DataFrame(columns=STATUS_COLUMNS)

    def record(self, row: dict, write: bool = True) -> None:
        self.rows[row["sample"]] = row
        if write:
            self.write()

    def frame(self) -> pd.DataFrame:
        rows = [self.rows[s] for s in self.order if s in self.rows]
        df = pd.DataFrame(rows, columns=STATUS_COLUMNS)
        df["n_spots"] = df["n_spots"].astype("Int64")
        df["seconds"] = df["seconds"].astype(float)
        return df

    def write(self) -> None:
        """Under the status file's lock, re-read it and rewrite it with this run's rows: two runs into one
        folder never drop each other's rows (issue 20, rule 3)."""
        from .._lock import FileLock

        with FileLock(self.path.with_name(f".{self.path.name}.lock"), 600.0, cleanup=True):
            self.previous = self._read()
            current = self.frame()
            keep = self.previous[~self.previous["sample"].isin(current["sample"])]
            merged = pd.concat([keep, current], ignore_index=True) if len(keep) else current
            buf = io.StringIO()
            merged.to_csv(buf, index=False)
            atomic_write_bytes(self.path, buf.getvalue().encode())


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------------
class _Progress:
    """One bar over samples, with tiles/s of the samples computed in this run."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, unit="sample", desc=desc, disable=not enabled, smoothing=0.1)
        self.t0 = time.perf_counter()
        self.tiles = 0

    def update(self, row: dict) -> None:
        if row["status"] == "done" and row["n_spots"]:
            self.tiles += int(row["n_spots"])
            self.bar.set_postfix_str(f"{self.tiles / max(time.perf_counter() - self.t0, 1e-9):.1f} tiles/s")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _run_serial(jobs: list[_Job], retries: int, finish) -> None:
    for job in jobs:
        sid = job.row["sample_id"]
        for attempt in range(retries + 1):
            try:
                row = embed_sample(job)
                break
            except Exception as e:  # noqa: BLE001 - a failing sample is recorded; the others go on
                row = _row(sid, "failed", error=_one_line(e))
                logger.debug("sample %s, attempt %d failed", sid, attempt + 1, exc_info=True)
        finish(row)


def _run_dask(client, jobs: list[_Job], retries: int, finish) -> None:
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    futures = {
        client.submit(
            embed_sample, job, key=f"embed_cohort-{job.row['sample_id']}-{token}", retries=retries
        ): job
        for job in jobs
    }
    try:
        for fut in as_completed(futures, loop=client.loop):
            sid = futures[fut].row["sample_id"]
            try:
                row = fut.result()
            except Exception as e:  # noqa: BLE001 - including KilledWorker (a worker died on it too often)
                row = _row(sid, "failed", error=_one_line(e))
            fut.release()
            finish(row)
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:  # interrupted: do not leave work running on the cluster
            client.cancel(pending)


def _plan(table, cmodel: CohortModel, folder: Path, status: _Status, **job_args) -> list[_Job]:
    """The tasks of the samples to embed; samples whose file has this fingerprint are recorded as skipped, those
    whose file is another (without ``overwrite``) as failed."""
    jobs = []
    for row in table.to_dict("records"):
        sid = row["sample_id"]
        path = folder / f"{sid}.h5"
        if row.get("problem"):  # one bad sample never stops a cohort (rule 10): recorded, the others go on
            status.record(_row(sid, "failed", error=f"ValueError: {row['problem']}"), write=False)
            continue
        try:  # an output never replaces an input (rule 1): e.g. a patch file at <out_dir>/<model>/<sid>.h5
            check_not_input(
                path, inputs=[row.get(c) for c in ("source", "image", "counts")], what="output file"
            )
        except Exception as e:  # noqa: BLE001 - recorded, the others go on (rule 10)
            status.record(_row(sid, "failed", error=_one_line(e)), write=False)
            continue
        try:
            job = sample_job(row, cmodel, path, **job_args)
            existing = _existing_fingerprint(path)
        except Exception as e:  # noqa: BLE001 - e.g. a source whose files cannot be listed (ELOOP, EACCES)
            status.record(_row(sid, "failed", error=_one_line(e)), write=False)
            continue
        if existing == job.fingerprint and not job.overwrite:
            status.record(_row(sid, "skipped", _n_rows(path), 0.0), write=False)
        elif existing == "" and not job.overwrite:
            error = (
                f"{path} exists and is not a readable hopt_st embedding file: pass overwrite=True "
                "(--overwrite) to replace it."
            )
            status.record(_row(sid, "failed", error=error), write=False)
        elif existing is not None and not job.overwrite:
            status.record(_row(sid, "failed", error=other_fingerprint_message(path, job)), write=False)
        else:
            jobs.append(job)
    return jobs


def _check_client(client) -> None:
    from distributed import Client

    if not isinstance(client, Client):
        raise TypeError(
            f"client must be a distributed.Client (or None to run here), got {type(client).__name__}."
        )


def _select_shard(table: pd.DataFrame, shard) -> pd.DataFrame:
    """Shard ``i`` of ``n``: the samples at positions ``i, i + n, ...`` of the sorted sample ids."""
    if shard is None:
        return table
    try:
        i, n = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise TypeError(f"shard must be a pair (i, n) of ints, got {shard!r}.") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard=({i}, {n}): need n >= 1 and 0 <= i < n (shard i of n, counted from 0).")
    ids = sorted(table["sample_id"])
    mine = set(ids[i::n])
    return table[table["sample_id"].isin(mine)]


@inject_docs()
def embed_cohort(
    cohort: pd.DataFrame | str | os.PathLike,
    model: str | ModelSpec,
    out_dir: str | os.PathLike,
    *,
    client=None,
    weights: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    retries: int = 2,
    shard: tuple[int, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Embed every sample of a cohort once and write one HEST-layout embedding file per sample.

    Parameters
    ----------
    cohort
        Anything :func:`hopt_st.io.read_cohort` takes: a DataFrame or CSV (``sample_id``, ``source``, ...), a
        HEST-1k root or a HEST-Benchmark task folder.
    model
        Registry name or :class:`~hopt_st.models.ModelSpec` (a spec is sent to the workers as is, so it need
        not be registered there).
    out_dir
        Output folder: ``<out_dir>/<model>/<sample_id>.h5`` and ``<out_dir>/<model>/status.csv``.
    client
        A :class:`distributed.Client`: one task per sample on its cluster (e.g. a ``LocalCluster``, a
        ``dask_cuda.LocalCUDACluster`` with one worker per GPU, or a ``dask_jobqueue`` cluster). ``None``: run
        here, one sample after the other. A function returning a client is called only when some sample is
        to be embedded (no cluster is started when every sample is skipped); it may return ``None``.
    weights
        Local weight file; default: the spec's Hugging Face repository (looked up here, once).
    device
        Where the workers embed; ``None``: each worker's best device (CUDA, MPS, CPU).
    dtype
        Compute precision; ``None``: bf16 on CUDA, fp16 on MPS, fp32 on CPU.
    batch_size
        Patches per forward pass (default as :func:`hopt_st.pp.embed`).
    retries
        Extra attempts for a sample whose task raised (Dask also re-runs a task whose worker died, up to
        ``distributed.scheduler.allowed-failures`` times).
    shard
        ``(i, n)``: only the samples of shard ``i`` of ``n`` (positions ``i, i+n, ...`` of the sorted sample
        ids), e.g. one SLURM array task each, without any scheduler.
    overwrite
        Recompute samples whose file exists (with the same fingerprint, or another one); otherwise those with
        the same fingerprint are skipped and those with another are reported as failed.
    progress
        {progress}

    Returns
    -------
    pandas.DataFrame
        One row per sample of this run, in cohort order: ``sample``, ``status`` (``"done"``, ``"skipped"``
        or ``"failed"``), ``n_spots`` (embedded spots), ``seconds``, ``error``; ``attrs["status_path"]``.
        Writes, in ``<out_dir>/<model>/``:

        ``<sample_id>.h5``
            ``embeddings`` (n, dim) float32, ``barcodes`` (n, 1) bytes, ``coords`` (n, 2) int64 top-left patch
            corners in full-resolution pixels (HEST's embedding-file layout), ``centers`` (n, 2) spot centres,
            ``attrs["hopt_st_fingerprint"]`` and ``attrs["hopt_st_provenance"]`` (JSON). Spots whose patch lies
            entirely outside the image are left out.
        ``status.csv`` (``status.shard<i>of<n>.csv`` for a shard)
            The columns above, rewritten atomically after each sample (rows of samples not in this run kept).
    """
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries={retries!r} must be an int >= 0.")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ValueError(f"batch_size={batch_size!r} must be >= 1.")
    lazy_client = callable(client) and not hasattr(client, "submit")  # a factory: called only if work remains
    if client is not None and not lazy_client:
        _check_client(client)
    if device is not None and device != "auto":
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device={device!r} is not a torch device ({e}).") from None
    table = read_cohort(
        cohort, keep_bad=True
    )  # bad rows are recorded as failed and the others go on (rule 10)
    if len(table) and table["problem"].notna().all():
        read_cohort(cohort)  # no row can be embedded: refused now, every bad row named, before any work
    table = _select_shard(table, shard)
    cmodel = cohort_model(model, weights, dtype)
    spec = cmodel.spec
    folder = Path(out_dir) / model_dirname(spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    status_name = "status.csv" if shard is None else f"status.shard{int(shard[0])}of{int(shard[1])}.csv"
    status = _Status(folder / status_name, list(table["sample_id"]))

    jobs = _plan(table, cmodel, folder, status, device=device, batch_size=batch_size, overwrite=overwrite)
    status.write()
    if lazy_client:  # no cluster is started when every sample is skipped or refused
        client = client() if jobs else None
        if client is not None:
            _check_client(client)
    n_skipped = len(table) - len(jobs)
    logger.info(
        "embed_cohort %s: %d samples, %d to embed, %d already done or refused, %s",
        spec.name,
        len(table),
        len(jobs),
        n_skipped,
        "in this process"
        if client is None
        else f"on {len(client.scheduler_info().get('workers', {}))} workers",
    )
    bar = _Progress(len(table), f"embed-cohort {spec.name}", progress)
    for row in status.rows.values():
        bar.update(row)

    def finish(row: dict) -> None:
        status.record(row)
        bar.update(row)
        if row["status"] == "failed":
            logger.warning("sample %s failed: %s", row["sample"], row["error"])

    try:
        if client is None:
            with logging_redirect_tqdm() if progress else contextlib.nullcontext():
                _run_serial(jobs, retries, finish)
        else:
            _run_dask(client, jobs, retries, finish)
    finally:
        bar.close()
    df = status.frame()
    df.attrs["status_path"] = str(status.path)
    counts = df["status"].value_counts()
    logger.info(
        "embed_cohort %s: %d done, %d skipped, %d failed (%s)",
        spec.name,
        counts.get("done", 0),
        counts.get("skipped", 0),
        counts.get("failed", 0),
        status.path,
    )
    return df
