"""``pp.embed``: one foundation-model embedding per spot, stored where scanpy users look (``obsm``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from spatialdata import SpatialData

from .._constants import UNS_KEY
from .._docs import inject_docs
from .._patchset import ArrayPatches, Patches, read_patches
from ..io._elements import get_spot_table
from ..models import Encoder, ModelSpec, get_encoder, get_spec
from ._checkpoint import CheckpointStore
from ._device import select_device, select_dtype
from ._engine import run_encoder
from ._patches import patches

logger = logging.getLogger(__name__)

_MPP_TOL = 0.05


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


def _resolve_input(data, spec: ModelSpec, table_name, image_key) -> Patches:
    """The patch source of ``data`` (patches are cut at the model's input size and µm/px from a SpatialData)."""
    if isinstance(data, SpatialData):
        return patches(
            data, table_name=table_name, image_key=image_key, patch_size=spec.input_size, target_mpp=spec.mpp
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
        "pp.embed takes a SpatialData, a Patches object (hopt_st.pp.patches), a HEST patch .h5 path or a uint8 "
        f"(n, P, P, 3) array; got {type(data).__name__}."
    )


def _check_geometry(source: Patches, spec: ModelSpec) -> None:
    """Warn when the patches are not what the model was trained on (size, µm/px)."""
    if spec.arch == "handcrafted":
        return
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
    data: SpatialData | Patches | str | os.PathLike | np.ndarray,
    model: str | ModelSpec | Encoder = "h-optimus-1",
    *,
    table_name: str | None = None,
    image_key: str | None = None,
    key_added: str | None = None,
    weights: str | os.PathLike | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    num_workers: int | None = None,
    overwrite: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    compile: bool = False,
    progress: bool = True,
) -> np.ndarray | None:
    """Embed every spot's H&E patch with a foundation model.

    Parameters
    ----------
    data
        A SpatialData (patches are cut with :func:`hopt_st.pp.patches` at the model's input size and
        µm/px), a :class:`~hopt_st.pp.Patches` object, a HEST patch ``.h5`` file, or a uint8
        ``(n, P, P, 3)`` array.
    model
        Registry name (see :func:`hopt_st.models.list_models`), ``"timm:<arch>"``, a spec, or an encoder built
        with :func:`hopt_st.models.create` (e.g. with random weights).
    table_name
        {table_name}
    image_key
        {image_key}
    key_added
        ``obsm`` key; default ``"X_<model>"``.
    weights
        Local weight file; default: the spec's Hugging Face repository (token from ``HF_TOKEN``).
    batch_size
        Default 128 on CUDA, 32 on CPU/MPS (64 for ``handcrafted``).
    device
        ``None``/``"auto"``: CUDA, then MPS, then CPU.
    dtype
        Compute precision under autocast; default bf16 on CUDA, fp16 on MPS, fp32 on CPU.
    num_workers
        Reader threads passed to :meth:`Patches.iter_batches`.
    overwrite
        {overwrite}
    checkpoint_dir
        Persist finished batches there; a rerun (e.g. after a crash) recomputes only missing batches.
        A directory written by a different model / weights / patch geometry / precision / spot set is refused.
    compile
        Wrap the encoder in ``torch.compile`` (worth it for long GPU runs).
    progress
        {progress}

    Returns
    -------
    For a SpatialData ``None``, and sets:

    ``table.obsm[key_added]``
        float32 ``(n_spots, dim)`` embeddings, in table row order.
    ``table.uns["hopt_st"]["embeddings"][key_added]``
        Provenance: model, dim, weights sha256 and file, µm/px, patch size, precision, device, versions.

    Otherwise the ``(n_patches, dim)`` float32 array.
    """
    dev = select_device(device)
    cdtype = select_dtype(dtype, dev)
    spec, encoder = _resolve_model(model, weights)
    key = key_added or f"X_{spec.name}"
    table = None
    if isinstance(data, SpatialData):
        table, _ = get_spot_table(data, table_name)
        if key in table.obsm and not overwrite:
            raise ValueError(
                f"table.obsm[{key!r}] already exists: pass overwrite=True to replace it, or key_added= another name."
            )
    source = _resolve_input(data, spec, table_name, image_key)
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
    emb = run_encoder(
        encoder,
        source,
        dim=spec.dim,
        batch_size=bs,
        device=dev,
        dtype=cdtype,
        num_workers=num_workers,
        checkpoint=ckpt,
        compile=compile,
        progress=progress,
        desc=f"embed {spec.name}",
    )
    if table is None:
        return emb
    if len(emb) != table.n_obs or not np.array_equal(source.barcodes, table.obs_names.to_numpy().astype(str)):
        raise RuntimeError("patch order differs from the table's rows (barcodes do not match obs_names).")
    table.obsm[key] = emb
    _write_provenance(table, key, spec, encoder, info, dev)
    logger.info("wrote table.obsm[%r] (%d x %d) with %s", key, *emb.shape, spec.name)
    return None
