"""``pp.embed``: one foundation-model embedding per spot, stored where scanpy users look (``obsm``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

_MPP_TOL = 0.05


def _default_batch_size(spec, device: torch.device) -> int:
    if spec.arch == "handcrafted":
        return 64
    if device.type == "cuda":
        return 128
    return 32


def _weights_id(encoder) -> str:
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


def _geometry_id(source) -> str | None:
    """Hash of where the patches come from (spot centres, window size, source image and crop boxes), so a
    checkpoint of spots placed elsewhere (same ids, other tissue) is not reused."""
    centers = getattr(source, "centers", None)
    if centers is None:
        return None
    h = hashlib.sha256(np.ascontiguousarray(np.asarray(centers, dtype=np.float64)).tobytes())
    h.update(repr(float(getattr(source, "patch_size_src", 0.0))).encode())
    reader = getattr(source, "_reader", None)
    if reader is not None:
        h.update(f"{reader.name}|{reader.height}x{reader.width}".encode())
    for attr in ("_boxes", "_size"):
        v = getattr(source, attr, None)
        if v is not None:
            h.update(np.ascontiguousarray(np.asarray(v, dtype=np.int64)).tobytes())
    return h.hexdigest()


def _as_source(data, spec, table_name, image_key):
    """Return ``(patches, sdata_or_None)``."""
    from spatialdata import SpatialData

    from ._embed_engine import ArrayPatches

    if isinstance(data, SpatialData):
        from ._patches import patches

        return patches(
            data, table_name=table_name, image_key=image_key, patch_size=spec.input_size, target_mpp=spec.mpp
        ), data
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.suffix.lower() not in (".h5", ".hdf5"):
            raise ValueError(f"pp.embed: {str(path)!r} is not a HEST patch file (.h5).")
        from ..io import read_patches

        return read_patches(path), None
    if isinstance(data, np.ndarray):
        return ArrayPatches(data), None
    if hasattr(data, "iter_batches") and hasattr(data, "__len__"):
        return data, None
    raise TypeError(
        "pp.embed takes a SpatialData, a Patches object (hopt_st.pp.patches), a HEST patch .h5 path or a uint8 "
        f"(n, P, P, 3) array; got {type(data).__name__}."
    )


def embed(
    data,
    model="h-optimus-1",
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
):
    """Embed every spot's H&E patch with a foundation model.

    Parameters
    ----------
    data : SpatialData, Patches, str or path-like
        A SpatialData (patches are cropped with :func:`hopt_st.pp.patches` at the model's input size and
        µm/px), a :class:`~hopt_st.pp.Patches` object, a HEST patch ``.h5`` file, or a uint8
        ``(n, P, P, 3)`` array.
    model : str, ModelSpec or Encoder
        Registry name (see :func:`hopt_st.models.list_models`), ``"timm:<arch>"``, or an encoder built with
        :func:`hopt_st.models.create` (e.g. with random weights).
    table_name, image_key : str, optional
        Which table / image of the SpatialData (defaults as in :func:`hopt_st.pp.patches`).
    key_added : str, optional
        ``obsm`` key; default ``"X_<model>"``.
    weights : str or path-like, optional
        Local weight file; default: the spec's Hugging Face repository (token from ``HF_TOKEN``).
    batch_size : int, optional
        Default 128 on CUDA, 32 on CPU/MPS (64 for ``handcrafted``).
    device : str or torch.device, optional
        ``None``/``"auto"``: CUDA, then MPS, then CPU.
    dtype : str or torch.dtype, optional
        Compute precision under autocast; default bf16 on CUDA, fp16 on MPS, fp32 on CPU.
    num_workers : int, optional
        Reader threads passed to ``Patches.iter_batches``.
    overwrite : bool
        Replace an existing ``obsm[key_added]``.
    checkpoint_dir : str or path-like, optional
        Persist finished batches there; a rerun (e.g. after a crash) recomputes only missing batches.
        A directory written by a different model / weights / patch geometry / precision / spot set is refused.
    compile : bool
        Wrap the encoder in ``torch.compile`` (worth it for long GPU runs).
    progress : bool
        Show a tqdm progress bar (tiles/s).

    Returns
    -------
    None or numpy.ndarray
        ``None`` for a SpatialData (writes ``table.obsm[key_added]`` float32 and provenance in
        ``table.uns["hopt_st"]["embeddings"][key_added]``); otherwise the ``(n_patches, dim)`` float32 array.
    """
    from spatialdata import SpatialData

    from .. import __version__
    from ..io._elements import get_spot_table
    from ..models import create, get_spec
    from ..models._encoder import Encoder
    from ._embed_engine import run_encoder, select_device, select_dtype

    dev = select_device(device)
    cdtype = select_dtype(dtype, dev)
    if isinstance(model, Encoder):
        encoder, spec = model, model.spec
        if weights is not None:
            raise ValueError("pp.embed: pass weights= to models.create, not together with a built encoder.")
    elif isinstance(model, torch.nn.Module):
        raise TypeError("pp.embed: model must be a registry name or an encoder from hopt_st.models.create().")
    else:
        spec, encoder = get_spec(model), None
    key = key_added or f"X_{spec.name}"

    table = None
    if isinstance(data, SpatialData):
        table, _ = get_spot_table(data, table_name)
        if key in table.obsm and not overwrite:
            raise KeyError(
                f"table.obsm[{key!r}] already exists: pass overwrite=True to replace it, or key_added= another name."
            )
    source, sdata = _as_source(data, spec, table_name, image_key)
    mpp = getattr(source, "mpp", None)
    psize = int(getattr(source, "patch_size", spec.input_size))
    if spec.arch != "handcrafted":
        if psize != spec.input_size:
            logger.warning(
                "patches are %d px but %s expects %d px: they are resized", psize, spec.name, spec.input_size
            )
        if mpp is not None and abs(mpp / spec.mpp - 1) > _MPP_TOL:
            logger.warning(
                "patches are at %.3g µm/px but %s was trained at %.3g µm/px", mpp, spec.name, spec.mpp
            )

    if encoder is None:
        encoder = create(spec, weights=weights, pretrained=True, device="cpu")
    bs = int(batch_size or _default_batch_size(spec, dev))
    if bs < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    weights_id = _weights_id(encoder)
    barcodes = getattr(source, "barcodes", None)
    info = {
        "model": spec.name,
        "weights_sha256": weights_id,
        "patch_size": psize,
        "mpp": None if mpp is None else float(mpp),
        "dtype": str(cdtype).removeprefix("torch."),
        "n": len(source),
    }
    fp_obj = dict(
        info,
        spec=[
            spec.dim,
            spec.timm_name,
            repr(spec.timm_kwargs),
            spec.pooling,
            spec.mean,
            spec.std,
            spec.input_size,
        ],
        barcodes=None
        if barcodes is None
        else hashlib.sha256("\n".join(map(str, barcodes)).encode()).hexdigest(),
        geometry=_geometry_id(source),
    )
    fingerprint = hashlib.sha256(json.dumps(fp_obj, sort_keys=True, default=str).encode()).hexdigest()
    emb = run_encoder(
        encoder,
        source,
        dim=spec.dim,
        batch_size=bs,
        device=dev,
        dtype=cdtype,
        num_workers=num_workers,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        info=info,
        compile=compile,
        progress=progress,
        desc=f"embed {spec.name}",
    )
    if sdata is None:
        return emb

    if len(emb) != table.n_obs:
        raise RuntimeError(
            f"{len(emb)} patches for {table.n_obs} table rows: pp.patches must give one per row."
        )
    if barcodes is not None and not np.array_equal(
        np.asarray(barcodes).astype(str), table.obs_names.to_numpy().astype(str)
    ):
        raise RuntimeError("patch order differs from the table's rows (barcodes do not match obs_names).")
    table.obsm[key] = emb
    hopt = table.uns.setdefault("hopt_st", {})
    emb_uns = hopt.setdefault("embeddings", {})
    import timm

    emb_uns[key] = {
        "model": spec.name,
        "dim": int(spec.dim),
        "weights_sha256": weights_id,
        "weights_file": Path(encoder.weights_source).name
        if encoder.weights_sha256
        else encoder.weights_source,
        "hf_repo": spec.hf_repo or "",
        "mpp": float(mpp) if mpp is not None else float(spec.mpp),
        "patch_size": psize,
        "dtype": info["dtype"],
        "device": str(dev),
        "hopt_st_version": str(__version__),
        "torch_version": str(torch.__version__),
        "timm_version": str(timm.__version__),
    }
    logger.info("wrote table.obsm[%r] (%d x %d) with %s", key, *emb.shape, spec.name)
    return None
