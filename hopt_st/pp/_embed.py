"""``pp.embed``: one foundation-model embedding per spot, stored where scanpy users look (``obsm``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from anndata import AnnData
from spatialdata import SpatialData

from .._constants import UNS_KEY
from .._docs import inject_docs
from .._patchset import ArrayPatches, Patches, read_patches
from ..io._elements import get_spot_table
from ..io._store import check_name, sanitize_name
from ..models import Encoder, ModelSpec, get_encoder, get_spec
from ._checkpoint import CheckpointStore
from ._device import select_device, select_dtype
from ._engine import run_encoder
from ._patches import patches

logger = logging.getLogger(__name__)

_MPP_TOL = 0.05
#: patches smaller than the model's input by more than this factor are refused (an enlargement without detail)
_MAX_UPSAMPLING = 4.0
#: the handcrafted encoder's smallest patch (its texture filters span 16 px)
_HANDCRAFTED_MIN_PX = 16


def default_key(model_name: str) -> str:
    """The default ``obsm`` key of a model's embeddings: ``"X_<model>"``, made a valid SpatialData key
    (``"timm:vit_base"`` -> ``"X_timm_vit_base"``)."""
    return "X_" + sanitize_name(model_name)


def _default_batch_size(spec: ModelSpec, device: torch.device) -> int:
    if spec.arch == "handcrafted":
        return 64
    return 128 if device.type == "cuda" else 32


def _weights_id(encoder: Encoder) -> str:
    """sha256 of the weight file; for random weights a hash of names, shapes and leading values of the parameters."""
    if encoder.weights_sha256:
        return encoder.weights_sha256
    if encoder.spec.arch == "handcrafted":
        return "none"
    h = hashlib.sha256()
    for k, v in encoder.state_dict().items():  # names, shapes and the first values of each tensor: cheap
        h.update(f"{k}{tuple(v.shape)}".encode())
        h.update(v.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return "random-init:" + h.hexdigest()


def _resolve_model(model, weights) -> tuple[ModelSpec, Encoder | None]:
    """The spec, and the encoder when one was given already built."""
    if isinstance(model, Encoder):
        if weights is not None:
            raise ValueError("pp.embed: pass weights= to models.create, not together with a built encoder.")
        return model.spec, model
    if isinstance(model, torch.nn.Module):
        raise TypeError("pp.embed: model must be a registry name or an encoder from hopt_st.models.create().")
    return get_spec(model), None


def _resolve_input(data, spec: ModelSpec, slide: dict) -> Patches:
    """The patch source of ``data`` (from a SpatialData or AnnData: cut at the model's input size and, unless
    ``target_mpp`` is given, its µm/px; ``slide`` holds the arguments of :func:`hopt_st.pp.patches`)."""
    if isinstance(data, (SpatialData, AnnData)):
        target_mpp = spec.mpp if slide["target_mpp"] is None else slide["target_mpp"]
        return patches(data, **{**slide, "target_mpp": target_mpp}, patch_size=spec.input_size)
    given = [k for k, v in slide.items() if v is not None and k != "outside"]
    if given:
        raise ValueError(
            f"pp.embed: {given} apply to a SpatialData or AnnData (patches cut from a slide), not to ready-made "
            f"patches ({type(data).__name__})."
        )
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.suffix.lower() not in (".h5", ".hdf5"):
            raise ValueError(f"pp.embed: {str(path)!r} is not a HEST patch file (.h5).")
        return read_patches(path)
    if isinstance(data, np.ndarray):
        return ArrayPatches(data)
    if isinstance(data, Patches):
        return data
    raise TypeError(
        "pp.embed takes a SpatialData, an AnnData (scanpy's Visium layout), a Patches object (hopt_st.pp.patches), "
        f"a HEST patch .h5 path or a uint8 (n, P, P, 3) array; got {type(data).__name__}."
    )


def _describe_source(source: Patches) -> str:
    path = getattr(source, "path", None)
    return f"the patches of {str(path)!r}" if path is not None else "the patches"


def _copy(data):
    """A copy to write into (``copy=True``) that shares nothing mutable with ``data`` (:mod:`hopt_st._copying`)."""
    from .._copying import deep_copy

    if isinstance(data, AnnData | SpatialData):
        return deep_copy(data)
    raise TypeError(f"pp.embed: copy=True applies to a SpatialData or AnnData, not to {type(data).__name__}.")


def _check_geometry(source: Patches, spec: ModelSpec) -> None:
    """Refuse patches too small for the model; warn when they are not what it was trained on (size, µm/px)."""
    if len(source) == 0:
        raise ValueError(f"{_describe_source(source)}: there are no patches (0 spots) to embed.")
    if spec.arch == "handcrafted":
        if source.patch_size < _HANDCRAFTED_MIN_PX:
            raise ValueError(
                f"{_describe_source(source)} are {source.patch_size} px: the handcrafted encoder needs at least "
                f"{_HANDCRAFTED_MIN_PX} px. Cut larger patches (hopt_st.pp.patches(patch_size=...))."
            )
        return
    if source.patch_size * _MAX_UPSAMPLING < spec.input_size:
        raise ValueError(
            f"{_describe_source(source)} are {source.patch_size} px but {spec.name} takes {spec.input_size} px: "
            f"enlarging them {spec.input_size / source.patch_size:.0f}x gives the model no detail to see. Cut "
            f"{spec.input_size} px patches (hopt_st.pp.patches(patch_size={spec.input_size}), which pp.embed does "
            "for a SpatialData)."
        )
    if source.patch_size != spec.input_size:
        logger.warning(
            "patches are %d px but %s expects %d px: they are resized",
            source.patch_size,
            spec.name,
            spec.input_size,
        )
    if source.mpp is not None and abs(source.mpp / spec.mpp - 1) > _MPP_TOL:
        logger.warning(
            "patches are at %.3g µm/px but %s was trained at %.3g µm/px", source.mpp, spec.name, spec.mpp
        )


def spec_identity(spec: ModelSpec) -> list:
    """The fields of a spec that embeddings depend on (architecture, pooling, normalisation, input size)."""
    return [
        spec.dim,
        spec.timm_name,
        repr(spec.timm_kwargs),
        spec.pooling,
        spec.mean,
        spec.std,
        spec.input_size,
    ]


def _run_info(spec: ModelSpec, source: Patches, weights_id: str, cdtype: torch.dtype) -> tuple[dict, str]:
    """What the run is (shown when a checkpoint is refused) and its fingerprint (what the embeddings depend on)."""
    info = {
        "model": spec.name,
        "weights_sha256": weights_id,
        "patch_size": source.patch_size,
        "mpp": source.mpp,
        "dtype": str(cdtype).removeprefix("torch."),
        "n": len(source),
    }
    fp = dict(info, spec=spec_identity(spec), patches=source.fingerprint())
    return info, hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()


def _write_provenance(table, key: str, spec: ModelSpec, encoder: Encoder, info: dict, device) -> None:
    hopt = table.uns.setdefault(UNS_KEY, {})
    hopt.setdefault("embeddings", {})[key] = provenance(spec, encoder, info, device)


def provenance(spec: ModelSpec, encoder: Encoder, info: dict, device) -> dict:
    """What a set of embeddings was computed with (``info`` from :func:`_run_info`): model, weights, geometry,
    precision, device, versions."""
    import timm

    from .. import __version__

    return {
        "model": spec.name,
        "dim": int(spec.dim),
        "weights_sha256": info["weights_sha256"],
        "weights_file": Path(encoder.weights_source).name
        if encoder.weights_sha256
        else encoder.weights_source,
        "hf_repo": spec.hf_repo or "",
        "mpp": float(info["mpp"]) if info["mpp"] is not None else float(spec.mpp),
        "patch_size": int(info["patch_size"]),
        "dtype": info["dtype"],
        "device": str(device),
        "hopt_st_version": str(__version__),
        "torch_version": str(torch.__version__),
        "timm_version": str(timm.__version__),
    }


@inject_docs()
def embed(
    data: SpatialData | AnnData | Patches | str | os.PathLike | np.ndarray,
    model: str | ModelSpec | Encoder = "h-optimus-1",
    *,
    table_name: str | None = None,
    image_key: str | None = None,
    image: str | os.PathLike | np.ndarray | None = None,
    library_id: str | None = None,
    image_mpp: float | None = None,
    target_mpp: float | None = None,
    outside: Literal["raise", "drop", "keep"] = "raise",
    key_added: str | None = None,
    weights: str | os.PathLike | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    num_workers: int | None = None,
    workers: str = "auto",
    overwrite: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    compile: bool = False,
    progress: bool = True,
    copy: bool = False,
) -> SpatialData | AnnData | np.ndarray | None:
    """Embed every spot's H&E patch with a foundation model.

    Parameters
    ----------
    data
        A SpatialData, or Visium data as an AnnData in scanpy's layout (``sc.read_visium``,
        ``sq.read.visium``, an ``.h5ad`` with ``obsm["spatial"]`` and ``uns["spatial"][library_id]``; see
        :func:`hopt_st.io.from_anndata`): patches are cut with :func:`hopt_st.pp.patches` at the model's input
        size and µm/px. Or ready-made patches: a :class:`~hopt_st.pp.Patches` object, a HEST patch ``.h5``
        file, or a uint8 ``(n, P, P, 3)`` array.
    model
        Registry name (see :func:`hopt_st.models.list_models`), ``"timm:<arch>"``, a spec, or an encoder built
        with :func:`hopt_st.models.create` (e.g. with random weights).
    table_name
        {table_name}
    image_key
        {image_key}
    {anndata_image_params}
    image_mpp
        {image_mpp_anndata}
    target_mpp
        µm per patch pixel; default the model's own (0.5 for H-optimus-1). A value the model was not trained
        at is logged as a warning.
    outside
        Spots whose patch lies entirely outside the image: ``"raise"``, ``"drop"`` (their embedding rows are
        NaN) or ``"keep"`` (embedded patches of white glass), see :func:`hopt_st.pp.patches`.
    key_added
        ``obsm`` key; default ``"X_<model>"`` (characters a SpatialData store does not allow, such as the
        ``:`` of ``"timm:<arch>"``, become ``_``). An invalid key is refused before any work starts.
    weights
        Local weight file; default: the spec's Hugging Face repository (token from ``HF_TOKEN``).
    batch_size
        Default 128 on CUDA, 32 on CPU/MPS (64 for ``handcrafted``).
    device
        ``None``/``"auto"``: CUDA, then MPS, then CPU.
    dtype
        Compute precision under autocast; default bf16 on CUDA, fp16 on MPS, fp32 on CPU.
    num_workers
        Readers. Default: on CUDA/MPS all cores but one; on the CPU none (the computing thread reads between
        batches, since the model needs the cores). torch's intra-op threads are capped to the cores the readers
        leave free; the choice is logged.
    workers
        ``"processes"`` (a ``torch.utils.data.DataLoader``, see :meth:`Patches.dataloader`), ``"threads"``
        (:meth:`Patches.iter_batches`) or ``"auto"``: processes on CUDA/MPS unless the patches are an in-memory
        array, threads on the CPU.
    overwrite
        {overwrite}
    checkpoint_dir
        Persist finished batches there; a rerun (e.g. after a crash) recomputes only missing batches.
        A directory written by a different model / weights / patch geometry / precision / spot set is refused.
    compile
        Wrap the encoder in ``torch.compile`` (worth it for long GPU runs).
    progress
        {progress}
    copy
        {copy} (SpatialData: a new object sharing the image and shape elements, with copies of the tables.)

    Returns
    -------
    For a SpatialData or AnnData ``None`` (the copy when ``copy=True``), and sets (``table`` is the spot table
    of a SpatialData, or the AnnData itself):

    ``table.obsm[key_added]``
        float32 ``(n_spots, dim)`` embeddings, in table row order (NaN rows for spots dropped by
        ``outside="drop"``).
    ``table.uns["hopt_st"]["embeddings"][key_added]``
        Provenance: model, dim, weights sha256 and file, µm/px, patch size, precision, device, versions.
    ``table.obs["patch_fraction_inside"]``
        Fraction of each spot's patch inside the image.

    For patches, a ``.h5`` file or an array, the ``(n_patches, dim)`` float32 array.
    """
    dev = select_device(device)
    cdtype = select_dtype(dtype, dev)
    spec, encoder = _resolve_model(model, weights)
    key = default_key(spec.name) if key_added is None else check_name(key_added, "key_added")
    if copy:
        data = _copy(data)
    table = None
    if isinstance(data, SpatialData):
        table, _ = get_spot_table(data, table_name)
    elif isinstance(data, AnnData):
        table = data
    if table is not None:
        check_name(key, "key_added", existing=table.obsm.keys())
        if key in table.obsm and not overwrite:
            raise ValueError(
                f"obsm[{key!r}] already exists: pass overwrite=True to replace it, or key_added= another name."
            )
    if isinstance(data, AnnData) and table_name is not None:
        raise ValueError("pp.embed: table_name= applies to a SpatialData; an AnnData is its own table.")
    slide = {"image_mpp": image_mpp, "target_mpp": target_mpp, "outside": outside, "image_key": image_key}
    if isinstance(data, SpatialData):
        slide["table_name"] = table_name
    if image is not None or library_id is not None or isinstance(data, AnnData):
        slide.update(image=image, library_id=library_id)
    source = _resolve_input(data, spec, slide)
    _check_geometry(source, spec)
    if encoder is None:  # built once per process, then reused (on this device)
        encoder = get_encoder(spec, weights=weights, device=dev)
    bs = int(batch_size or _default_batch_size(spec, dev))
    if bs < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    info, fingerprint = _run_info(spec, source, _weights_id(encoder), cdtype)
    ckpt = (
        None
        if checkpoint_dir is None
        else CheckpointStore(checkpoint_dir, fingerprint, len(source), spec.dim, info)
    )
    try:
        emb = run_encoder(
            encoder,
            source,
            dim=spec.dim,
            batch_size=bs,
            device=dev,
            dtype=cdtype,
            num_workers=num_workers,
            workers=workers,
            checkpoint=ckpt,
            compile=compile,
            progress=progress,
            desc=f"embed {spec.name}",
        )
    finally:
        if ckpt is not None:
            ckpt.close()  # the directory's lock
    if table is None:
        return emb
    rows = table.obs_names.get_indexer(np.asarray(source.barcodes).astype(str))
    if len(emb) != len(rows) or (rows < 0).any() or len(np.unique(rows)) != len(rows):
        raise RuntimeError("patch order differs from the table's rows (barcodes do not match obs_names).")
    if len(rows) == table.n_obs and (rows == np.arange(table.n_obs)).all():
        full = emb
    else:  # outside="drop": spots without a patch get NaN
        full = np.full((table.n_obs, emb.shape[1]), np.nan, dtype=emb.dtype)
        full[rows] = emb
        logger.warning(
            "obsm[%r]: %d of %d spots have no patch (outside the image) and NaN embeddings; drop them before "
            "fitting (e.g. adata[adata.obs['patch_fraction_inside'] > 0]).",
            key,
            table.n_obs - len(rows),
            table.n_obs,
        )
    table.obsm[key] = full
    _write_provenance(table, key, spec, encoder, info, dev)
    if isinstance(data, AnnData) and isinstance(image, str | os.PathLike):  # the scan embedded, for the plots
        table.uns[UNS_KEY]["embeddings"][key]["image"] = str(Path(image).resolve())
    logger.info("wrote obsm[%r] (%d x %d) with %s", key, *full.shape, spec.name)
    return data if copy else None
