"""Finding, reading and checking encoder weights.

Sources, in order: an explicit local file; else the spec's Hugging Face repository through
``huggingface_hub`` (local cache first when ``HF_HUB_OFFLINE`` is set; token from ``HF_TOKEN``, never
logged). Files are read by ``timm.models.load_state_dict``: safetensors, or ``torch.load(weights_only=True)``
for ``.bin``/``.pth``/``.pt`` (never unrestricted pickle). Keys must match the architecture exactly.
A file's sha256 is computed at most once per process, and never for a file of the Hugging Face cache,
whose blob is named by it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .._errors import CorruptFileError

if TYPE_CHECKING:  # pragma: no cover
    from ._spec import ModelSpec

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")
_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HF_REPO_DIR = re.compile(r"(models|datasets|spaces)--.+")
_MAX_LINKS = 8
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> sha256
_DIGEST_LOCK = threading.Lock()


class WeightsUnavailableError(FileNotFoundError):
    """The weights of a model cannot be found locally nor downloaded (gated, absent, offline)."""


class KeyMismatchError(RuntimeError):
    """A checkpoint's keys (or shapes) do not match the architecture exactly."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (reads the whole file: see :func:`weights_sha256`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hf_blob_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a file of the Hugging Face cache, known from its blob's name without reading the file.

    In the cache, ``<repo folder>/snapshots/<revision>/<file>`` links to ``<repo folder>/blobs/<etag>``, and
    the etag of a Git LFS file (every weight file) is the sha256 of its content: 64 hex digits. Small files
    kept in git are named by their git sha1 (40 hex digits) and are not trusted. The link chain is followed
    one step at a time, so a blob that itself links into the shared Xet store (named by the Xet hash, not
    the sha256) is still recognised by its per-repository name.

    Parameters
    ----------
    path
        A file, possibly a link into the cache.

    Returns
    -------
    str or None
        The sha256, or ``None`` when the file is not an LFS blob of a Hugging Face cache.
    """
    p = Path(path).absolute()
    for _ in range(_MAX_LINKS):
        p = p.parent.resolve() / p.name  # real folder names; the file's own name kept
        if (
            p.parent.name == "blobs"
            and _HF_REPO_DIR.fullmatch(p.parent.parent.name)
            and _SHA256.fullmatch(p.name)
        ):
            return p.name
        if not p.is_symlink():
            return None
        p = p.parent / os.readlink(p)
    return None


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weight file, computed at most once per file version and process.

    Known without reading: a file of the Hugging Face cache (see :func:`hf_blob_sha256`) or a file already
    hashed in this process with the same resolved path, size and modification time.

    Parameters
    ----------
    path
        The file to fingerprint.

    Returns
    -------
    str
        Hex sha256.
    """
    real = Path(path).resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    with _DIGEST_LOCK:
        digest = _DIGESTS.get(key)
    if digest is None:
        digest = hf_blob_sha256(path) or sha256_file(real)
        with _DIGEST_LOCK:
            _DIGESTS[key] = digest
    return digest


def file_version(path: str | os.PathLike) -> tuple[str, int, int]:
    """``(resolved path, size, mtime_ns)``: the version of a file that a remembered digest belongs to."""
    real = Path(path).resolve()
    st = real.stat()
    return (str(real), st.st_size, st.st_mtime_ns)


def remember_sha256(version: tuple[str, int, int], digest: str) -> None:
    """Tell :func:`weights_sha256` the digest of a file version computed by another process (e.g. the one
    that sends work to this one), so this process does not read the file again. Ignored when the file here
    is another version (other size or modification time)."""
    try:
        here = file_version(version[0])
    except OSError:
        return
    if here == tuple(version) and _SHA256.fullmatch(str(digest)):
        with _DIGEST_LOCK:
            _DIGESTS[here] = str(digest)


def _access_help(spec: ModelSpec, reason: str) -> str:
    repo = spec.hf_repo
    files = " or ".join(spec.hf_filenames)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    if spec.gated:
        how = (
            f"How to get them: open https://huggingface.co/{repo}, log in and accept the terms (gated model); "
            "create a read token at https://huggingface.co/settings/tokens and `export HF_TOKEN=<token>`"
            + (" and unset HF_HUB_OFFLINE to allow downloading. " if offline else ". ")
        )
    else:
        how = f"How to get them: https://huggingface.co/{repo} is public (no login or token needed): " + (
            "unset HF_HUB_OFFLINE to let hopt_st download them. "
            if offline
            else "hopt_st downloads them when the Hub can be reached. "
        )
    return (
        f"Weights of model {spec.name!r} are not available: {reason}\n"
        + how
        + f"Or download {files} yourself (e.g. `hf download {repo}` on a machine with internet, then copy the "
        "Hugging Face cache ~/.cache/huggingface/hub, or HF_HOME, to this machine) and pass its path: "
        f"hopt_st.models.create({spec.name!r}, weights='/path/to/{spec.hf_filenames[0]}') or "
        "pp.embed(..., weights='/path/to/file'). pretrained=False builds the architecture with random weights."
    )


def resolve_weights(spec: ModelSpec) -> Path:
    """Local path of a spec's weights: from the Hugging Face cache, or downloaded from the Hub.

    Parameters
    ----------
    spec
        The spec; its ``hf_filenames`` are tried in order in its ``hf_repo``.

    Returns
    -------
    pathlib.Path
        The file (in the Hugging Face cache).

    Raises
    ------
    WeightsUnavailableError
        No repository, a gated or absent one, no network: the message says how to get the weights.
    """
    if not spec.hf_repo:
        raise WeightsUnavailableError(
            f"model {spec.name!r} has no Hugging Face repository in its spec: pass weights='/path/to/file' "
            "(.safetensors, or .bin/.pth loadable with torch.load(weights_only=True)), or pretrained=False."
        )
    import huggingface_hub as hf
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    token = os.environ.get("HF_TOKEN") or None
    if not offline:
        unreachable = _hub_unreachable()
        if unreachable:  # no ~50 s of retries: the cache, else say so now
            for filename in spec.hf_filenames:
                try:
                    path = hf.hf_hub_download(spec.hf_repo, filename, token=token, local_files_only=True)
                except (LocalEntryNotFoundError, EntryNotFoundError, OSError):
                    continue
                logger.info("weights of %s: %s (the Hub is unreachable: from the cache)", spec.name, path)
                return Path(path)
            raise WeightsUnavailableError(
                f"Weights of model {spec.name!r} are not in the local Hugging Face cache, and the Hugging Face Hub "
                f"could not be reached (network failure: {unreachable}; HF_HUB_OFFLINE=1 skips this check). "
                + (
                    f"The model is gated: on a machine with internet, accept its terms at "
                    f"https://huggingface.co/{spec.hf_repo} and download it with HF_TOKEN set"
                    if spec.gated
                    else f"The model is public: on a machine with internet, download it "
                    f"(`hf download {spec.hf_repo}`)"
                )
                + ", then copy the Hugging Face cache (~/.cache/huggingface/hub, or HF_HOME) here, or pass the file "
                "with weights='/path/to/file'; pretrained=False builds the architecture with random weights."
            )
    reasons = []
    network: list[str] = []  # failures to reach the Hub (not "no such file")
    for filename in spec.hf_filenames:
        try:
            path = hf.hf_hub_download(spec.hf_repo, filename, token=token, local_files_only=offline)
            logger.info("weights of %s: %s", spec.name, path)
            return Path(path)
        except GatedRepoError:
            raise WeightsUnavailableError(
                _access_help(
                    spec,
                    f"https://huggingface.co/{spec.hf_repo} is gated and "
                    + (
                        "HF_TOKEN is not set."
                        if token is None
                        else "the token in HF_TOKEN has no access to it."
                    ),
                )
            ) from None
        except RepositoryNotFoundError:
            raise WeightsUnavailableError(
                _access_help(
                    spec,
                    f"repository {spec.hf_repo!r} was not found (or is gated/private and "
                    + ("HF_TOKEN is not set)." if token is None else "HF_TOKEN has no access)."),
                )
            ) from None
        except (LocalEntryNotFoundError, EntryNotFoundError) as e:
            reasons.append(f"{filename}: {type(e).__name__}")
            if not offline and _is_network_error(e):
                network.append(_scrub(f"{type(e.__cause__ or e).__name__}: {e.__cause__ or e}", token))
        except (HfHubHTTPError, OSError) as e:  # network down, proxy, ...
            reasons.append(f"{filename}: {type(e).__name__}: {_scrub(str(e), token)}")
            if not offline and _is_network_error(e):
                network.append(_scrub(f"{type(e).__name__}: {e}", token))
    if network:
        raise WeightsUnavailableError(
            f"Weights of model {spec.name!r}: the Hugging Face Hub could not be reached (network failure: "
            f"{' '.join(network[0].split())[:300]}). If the weights were downloaded before, set HF_HUB_OFFLINE=1 to "
            "use the local Hugging Face cache without the network; otherwise check the connection (or proxy) and "
            "try again, or pass a local file with weights='/path/to/file'."
        )
    where = (
        "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the Hub or in the cache"
    )
    raise WeightsUnavailableError(_access_help(spec, f"no weight file found {where} ({'; '.join(reasons)})."))


#: seconds to wait for a TCP connection to the Hub before calling it unreachable
HUB_PROBE_TIMEOUT = 3.0


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (a name that does not resolve, a refused or timed-out
    connection), or ``None`` when a TCP connection opens -- or a proxy is configured (it decides)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT):
            return None
    except OSError as e:
        return f"{host}:{port}: {type(e).__name__}: {e}"


def _is_network_error(e: BaseException) -> bool:
    """Whether a failure of ``hf_hub_download`` means the Hub could not be reached (not: no such file)."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    chain, cur = [], e
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    names = {type(x).__name__ for x in chain}
    if isinstance(e, LocalEntryNotFoundError) and e.__cause__ is not None:
        return True  # "cannot find the requested files in the local cache" after a failed request
    return any(isinstance(x, (ConnectionError, TimeoutError)) for x in chain) or bool(
        names
        & {"ConnectError", "ConnectTimeout", "ReadTimeout", "ProxyError", "NetworkError", "TransportError"}
    )


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{10,}", "hf_***", text)


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint with ``timm.models.load_state_dict`` (tensors only, never arbitrary objects).

    ``.safetensors`` files are read with safetensors, ``.bin``/``.pth``/``.pt`` with
    ``torch.load(weights_only=True)``. A checkpoint wrapping its tensors in a ``"state_dict"`` / ``"model"``
    entry is unwrapped and DDP / ``torch.compile`` key prefixes are removed (timm's ``clean_state_dict``).

    Parameters
    ----------
    path
        The weight file.

    Returns
    -------
    dict of str to torch.Tensor
        The state dict, on CPU.

    Raises
    ------
    WeightsUnavailableError
        The file does not exist.
    ValueError
        Unsupported extension; a corrupt file; a pickle that needs code to load; no flat dict of tensors.
    """
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"weights file {str(path)!r}: unsupported extension {suffix!r}; use .safetensors (or .bin/.pth/.pt)."
        )
    not_a_state_dict = f"weights file {str(path)!r} does not hold a flat dict of tensors (a state dict)."
    try:
        sd = load_state_dict(str(path), use_ema=False, device="cpu", weights_only=True)
    except AttributeError as e:  # timm cleans the keys of whatever it loaded: a list, a tensor, ...
        raise ValueError(not_a_state_dict) from e
    except Exception as e:  # corrupt file, or a pickle with code
        if suffix == ".safetensors":
            raise CorruptFileError(
                path,
                f"weights file {str(path)!r} is not a readable safetensors file ({e}); it may be truncated "
                "or corrupt: download it again, or pass another file with weights=<path>.",
            ) from e
        raise ValueError(
            f"weights file {str(path)!r} cannot be read with torch.load(weights_only=True) ({e}). "
            "hopt_st never unpickles arbitrary objects: convert it to .safetensors."
        ) from e
    if not _is_state_dict(sd):
        raise ValueError(not_a_state_dict)
    return sd


def convert_hf_dinov2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``transformers.Dinov2Model`` keys to timm ``VisionTransformer`` keys (fused qkv).

    ``embeddings.mask_token`` (only used for masked training) is dropped. Unknown keys are kept
    unchanged, so that exact matching reports them.

    Parameters
    ----------
    sd
        State dict of a ``Dinov2Model`` (keys optionally prefixed ``"dinov2."``).

    Returns
    -------
    dict of str to torch.Tensor
        The same tensors under timm's names (query, key and value concatenated into ``qkv``).
    """
    out: dict[str, torch.Tensor] = {}
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    layer = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    pat = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
    for k, v in sd.items():
        if k == "embeddings.mask_token":
            continue
        if k in simple:
            out[simple[k]] = v
            continue
        m = pat.match(k)
        if m is None:
            out[k] = v
            continue
        i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
        if mod.startswith("attention.attention.") and mod.split(".")[-1] in ("query", "key", "value"):
            qkv.setdefault((i, kind), {})[mod.split(".")[-1]] = v
        elif mod in ("layer_scale1", "layer_scale2") and kind == "lambda1":
            out[f"blocks.{i}.ls{mod[-1]}.gamma"] = v
        elif mod in layer:
            out[f"blocks.{i}.{layer[mod]}.{kind}"] = v
        else:
            out[k] = v
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            for p, v in parts.items():
                out[f"encoder.layer.{i}.attention.attention.{p}.{kind}"] = v
            continue
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


KEY_MAPS = {"hf_dinov2": convert_hf_dinov2}


def _summarise(keys: list[str], n: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_keys(model: torch.nn.Module, sd: dict[str, torch.Tensor], *, what: str) -> None:
    """Check that a state dict has exactly a model's keys and shapes.

    Parameters
    ----------
    model
        The module (may live on the meta device).
    sd
        The state dict to load.
    what
        What is loaded, for the message (e.g. ``"model 'uni' from '/path/w.bin'"``).

    Raises
    ------
    KeyMismatchError
        Naming the missing and unexpected keys (the first 8 of each), or the wrong shapes.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        msg = [f"weights for {what} do not match the architecture exactly:"]
        if missing:
            msg.append(f"{len(missing)} missing key(s): {_summarise(missing)}")
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected key(s): {_summarise(unexpected)}")
        msg.append(
            "Check that the file belongs to this model (see hopt_st.models.list_models()), or register a "
            "ModelSpec whose timm_name/timm_kwargs match the checkpoint."
        )
        raise KeyMismatchError("\n".join(msg))
    bad = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(sd[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise KeyMismatchError(f"weights for {what} have wrong shapes: " + "; ".join(bad[:8]))
