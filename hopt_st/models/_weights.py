"""Finding, reading and checking encoder weights.

Sources, in order: an explicit local file; else the spec's Hugging Face repository through
``huggingface_hub`` (local cache first when ``HF_HUB_OFFLINE`` is set; token from ``HF_TOKEN``, never
logged). Files are read with safetensors, or ``torch.load(weights_only=True)`` for ``.bin``/``.pth``
(never unrestricted pickle). Keys must match the architecture exactly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")


class WeightsUnavailableError(FileNotFoundError):
    """The weights of a model cannot be found locally nor downloaded (gated, absent, offline)."""


class KeyMismatchError(RuntimeError):
    """A checkpoint's keys (or shapes) do not match the architecture exactly."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _access_help(spec, reason: str) -> str:
    repo = spec.hf_repo
    files = " or ".join(spec.hf_filenames)
    return (
        f"Weights of model {spec.name!r} are not available: {reason}\n"
        f"How to get them: open https://huggingface.co/{repo}, log in and accept the terms"
        f"{' (gated model)' if spec.gated else ''}; create a read token at https://huggingface.co/settings/tokens "
        "and `export HF_TOKEN=<token>` (unset HF_HUB_OFFLINE to allow downloading). "
        f"Or download {files} yourself (e.g. `hf download {repo}` on a machine with internet, then copy the "
        "Hugging Face cache ~/.cache/huggingface/hub, or HF_HOME, to this machine) and pass its path: "
        f"hopt_st.models.create({spec.name!r}, weights='/path/to/{spec.hf_filenames[0]}') or "
        "pp.embed(..., weights='/path/to/file'). pretrained=False builds the architecture with random weights."
    )


def resolve_weights(spec) -> Path:
    """Local path of the spec's weights: from the Hugging Face cache, or downloaded from the Hub."""
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
    reasons = []
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
        except (HfHubHTTPError, OSError) as e:  # network down, proxy, ...
            reasons.append(f"{filename}: {type(e).__name__}: {_scrub(str(e), token)}")
    where = (
        "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the Hub or in the cache"
    )
    raise WeightsUnavailableError(_access_help(spec, f"no weight file found {where} ({'; '.join(reasons)})."))


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{10,}", "hf_***", text)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint: ``.safetensors`` natively, ``.bin``/``.pth``/``.pt`` with ``torch.load(weights_only=True)``.

    A checkpoint wrapping its tensors in a single ``"state_dict"`` / ``"model"`` entry is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    elif suffix in (".bin", ".pth", ".pt"):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle with code, or corrupt
            raise ValueError(
                f"weights file {str(path)!r} cannot be read with torch.load(weights_only=True) ({e}). "
                "hopt_st never unpickles arbitrary objects: convert it to .safetensors."
            ) from e
    else:
        raise ValueError(
            f"weights file {str(path)!r}: unsupported extension {suffix!r}; use .safetensors (or .bin/.pth/.pt)."
        )
    if isinstance(sd, dict) and not all(isinstance(v, torch.Tensor) for v in sd.values()):
        for k in ("state_dict", "model"):
            if k in sd and isinstance(sd[k], dict):
                sd = sd[k]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"weights file {str(path)!r} does not hold a flat dict of tensors (a state dict).")
    return sd


def convert_hf_dinov2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``transformers.Dinov2Model`` keys to timm ``VisionTransformer`` keys (fused qkv).

    ``embeddings.mask_token`` (only used for masked training) is dropped. Unknown keys are kept
    unchanged, so that exact matching reports them.
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
    """Raise :class:`KeyMismatchError` unless ``sd`` has exactly the model's keys and shapes."""
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
