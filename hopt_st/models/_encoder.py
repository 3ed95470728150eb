"""The :class:`Encoder` module: uint8 RGB patches in, float32 embeddings out; and how one is built.

Scaling to ``[0, 1]``, resizing (only if the patch size differs from the model's) and mean/std
normalisation happen inside ``forward``, on the module's device, so only uint8 crosses the bus.
Backbones are made by ``timm.create_model`` with the spec's normalisation as timm's ``pretrained_cfg``
(``backbone.pretrained_cfg["mean"]`` etc.), and weights are read by ``timm.models.load_state_dict``
and loaded only after an exact key check.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._handcrafted import HandcraftedEncoder
from ._spec import ModelSpec
from ._weights import KEY_MAPS, check_keys, read_state_dict, resolve_weights, weights_sha256

logger = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _resolve_layers(kwargs: dict) -> dict:
    """``timm_kwargs`` with the layer classes named by string (``mlp_layer``, ``act_layer``) resolved."""
    from timm.layers import SwiGLUPacked

    names = {"SwiGLUPacked": SwiGLUPacked, "SiLU": nn.SiLU, "GELU": nn.GELU}
    return {
        k: names.get(v, v) if isinstance(v, str) and k in ("mlp_layer", "act_layer") else v
        for k, v in kwargs.items()
    }


def _pretrained_cfg(spec: ModelSpec) -> dict:
    """How the spec feeds its model, as a timm ``pretrained_cfg`` overlay."""
    s = spec.input_size
    return dict(
        mean=spec.mean,
        std=spec.std,
        input_size=(3, s, s),
        interpolation="bilinear",
        crop_pct=1.0,
        license=spec.license or None,
    )


def build_backbone(spec: ModelSpec) -> nn.Module:
    """The bare network of a spec with random weights, built on the current default device."""
    if spec.arch == "handcrafted":
        return HandcraftedEncoder()
    import timm

    return timm.create_model(
        spec.timm_name,
        pretrained=False,
        pretrained_cfg_overlay=_pretrained_cfg(spec),
        **_resolve_layers(spec.timm_kwargs),
    )


class Encoder(nn.Module):
    """A patch encoder built from a :class:`~hopt_st.models.ModelSpec`.

    Parameters
    ----------
    spec
        The spec it was built from (its ``dim`` is the embedding size).
    backbone
        The network.
    weights_sha256
        sha256 of the weight file, ``None`` for random or weight-free encoders.
    weights_source
        Path of the weight file, ``"random"`` or ``"none"`` (handcrafted).

    Attributes
    ----------
    spec
        The spec.
    backbone
        The network (a timm model carrying the spec's normalisation in ``pretrained_cfg``).
    weights_sha256
        sha256 of the weight file, or ``None``.
    weights_source
        Path of the weight file, ``"random"`` or ``"none"``.
    """

    spec: ModelSpec
    backbone: nn.Module
    weights_sha256: str | None
    weights_source: str

    def __init__(
        self,
        spec: ModelSpec,
        backbone: nn.Module,
        *,
        weights_sha256: str | None = None,
        weights_source: str = "random",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.weights_sha256 = weights_sha256
        self.weights_source = weights_source
        dev = next(iter(backbone.parameters()), torch.empty(0)).device
        self.register_buffer("mean", torch.tensor(spec.mean, device=dev).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, device=dev).view(1, 3, 1, 1), persistent=False)
        self._warned_resize = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed patches.

        Parameters
        ----------
        x
            uint8 RGB patches ``(B, H, W, 3)``, ideally ``spec.input_size`` px wide (else resized, with a
            warning once).

        Returns
        -------
        torch.Tensor
            float32 ``(B, spec.dim)``.

        Raises
        ------
        ValueError
            ``x`` is not a uint8 ``(B, H, W, 3)`` tensor.
        """
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"encoder {self.spec.name!r} takes uint8 RGB patches (B, H, W, 3); got {x.dtype} {tuple(x.shape)}."
            )
        if self.spec.arch == "handcrafted":
            return self.backbone(x).float()
        x = self._normalise(x)
        if self.spec.pooling == "token":
            out = self.backbone(x)
        else:  # cls+mean
            tokens = self.backbone.forward_features(x)
            n_prefix = getattr(self.backbone, "num_prefix_tokens", 1)
            out = torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=-1)
        return out.float()

    @property
    def token_patch(self) -> int:
        """Side, in input pixels, of one patch token (14 for H-optimus-1; 14 for the handcrafted statistics)."""
        if self.spec.arch == "handcrafted":
            return 14
        ps = getattr(getattr(self.backbone, "patch_embed", None), "patch_size", None)
        if ps is None:
            raise ValueError(f"model {self.spec.name!r} has no patch tokens (not a ViT): no token map.")
        return int(ps[0] if isinstance(ps, tuple | list) else ps)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class token and the grid of patch tokens of uint8 tiles ``(B, H, W, 3)``.

        Returns
        -------
        ``(cls, grid)``: float ``(B, C)`` and ``(B, g, g, C)`` with ``g = input_size // token_patch``. For
        ViTs ``C`` is the width of the last block (after its norm), ``cls`` the class token; for the
        handcrafted encoder the per-14 px statistics of :func:`~hopt_st.models._handcrafted.token_stats` and
        their tile mean as ``cls``.
        """
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"encoder {self.spec.name!r} takes uint8 RGB tiles (B, H, W, 3); got {tuple(x.shape)}."
            )
        if self.spec.arch == "handcrafted":
            from ._handcrafted import token_stats

            size = self.spec.input_size
            if x.shape[1:3] != (size, size):
                x = F.interpolate(
                    x.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear", antialias=True
                )
                x = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            grid = token_stats(x, self.backbone.stain_inv, self.token_patch)
            return grid.mean((1, 2)), grid
        feats = self.backbone.forward_features(self._normalise(x))
        n_prefix = getattr(self.backbone, "num_prefix_tokens", 1)
        g = self.spec.input_size // self.token_patch
        patch = feats[:, n_prefix:]
        if patch.shape[1] != g * g:
            raise ValueError(
                f"model {self.spec.name!r} returned {patch.shape[1]} patch tokens, expected {g}x{g}."
            )
        return feats[:, 0], patch.reshape(len(x), g, g, -1)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` -> normalised float ``(B, 3, S, S)`` in the backbone's dtype."""
        x = x.permute(0, 3, 1, 2)  # a channels-last view: CUDA convolutions take it as it is
        if x.device.type == "cpu":  # CPU kernels are ~3x faster on NCHW-contiguous data: convert in one pass
            x = torch.empty(x.shape, dtype=torch.float32).copy_(x)
        else:
            x = x.float()
        x = x.div_(255.0)  # a new tensor: normalised in place from here, in torchvision's order of operations
        size = self.spec.input_size
        if x.shape[-2:] != (size, size):
            if not self._warned_resize:
                logger.warning(
                    "encoder %s: resizing %s px patches to %d px (crop them at %d px instead)",
                    self.spec.name,
                    tuple(x.shape[-2:]),
                    size,
                    size,
                )
                self._warned_resize = True
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.sub_(self.mean).div_(self.std)
        return x.to(
            next(self.backbone.parameters()).dtype
        )  # a float16 / bfloat16 backbone takes its own dtype


def as_device(device: str | torch.device | None) -> torch.device:
    """``torch.device(device)``; ``None`` is the CPU. ``TypeError``/``ValueError`` for a bad value."""
    if device is None:  # the default: CPU
        return torch.device("cpu")
    if not isinstance(device, str | torch.device):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}.")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device!r} is not a torch device ({e}).") from None


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A floating parameter dtype from a ``torch.dtype`` or its name (``"bfloat16"``); ``None`` stays."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    elif not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or its name, got {type(dtype).__name__}.")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a floating precision (float32, bfloat16, float16).")
    return dtype


def weights_file(
    spec: ModelSpec, weights: str | os.PathLike | None, pretrained: bool, device: torch.device
) -> Path | None:
    """The weight file an encoder loads (found on the Hub if need be), or ``None`` for no weights."""
    if weights is not None and not isinstance(weights, str | os.PathLike):
        raise TypeError(f"weights must be a path (str or os.PathLike), got {type(weights).__name__}.")
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True or False, got {type(pretrained).__name__}.")
    if spec.arch == "handcrafted":
        if weights is not None:
            raise ValueError(f"model {spec.name!r} has no weights: do not pass weights=.")
        return None
    if weights is None and not pretrained:
        return None
    if device.type == "meta":
        raise ValueError(
            f"device='meta' builds {spec.name!r} without memory, so it cannot hold weights: pass pretrained=False."
        )
    return Path(weights) if weights is not None else resolve_weights(spec)


def _fit_pos_embed(backbone: nn.Module, sd: dict, spec: ModelSpec) -> dict:
    """A ViT checkpoint pretrained at another image size (e.g. dinov2 at 518 px) on this network's patch grid:
    its absolute position embeddings resampled with timm's own ``resample_abs_pos_embed``, as timm does when it
    loads such a checkpoint at another ``img_size``."""
    target = getattr(backbone, "pos_embed", None)
    given = sd.get("pos_embed")
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    if target is None or given is None or tuple(given.shape) == tuple(target.shape) or grid is None:
        return sd
    from timm.layers import resample_abs_pos_embed

    prefix = (
        0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 0))
    )
    logger.info(
        "%s: position embeddings %s resampled to the %s patch grid of %d px inputs.",
        spec.name,
        tuple(given.shape),
        tuple(grid),
        spec.input_size,
    )
    sd = dict(sd)
    sd["pos_embed"] = resample_abs_pos_embed(given.float(), new_size=list(grid), num_prefix_tokens=prefix).to(
        given.dtype
    )
    return sd


def _load_backbone(spec: ModelSpec, path: Path) -> nn.Module:
    """The spec's network with the weights of ``path``, on CPU, after an exact key and shape check."""
    sd = read_state_dict(path)
    if spec.key_map:
        sd = KEY_MAPS[spec.key_map](sd)
    with torch.device("meta"):  # no memory for the random weights that would be overwritten
        backbone = build_backbone(spec)
    sd = _fit_pos_embed(backbone, sd, spec)
    check_keys(backbone, sd, what=f"model {spec.name!r} from {str(path)!r}")
    backbone.load_state_dict(sd, strict=True, assign=True)
    if any(b.is_meta for b in backbone.buffers()):  # non-persistent buffers: build for real, then load
        backbone = build_backbone(spec)
        backbone.load_state_dict(sd, strict=True)
    return backbone.float()


def build_encoder(
    spec: ModelSpec,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Encoder:
    """Build a new :class:`Encoder` (see :func:`hopt_st.models.create`)."""
    device = as_device(device)
    dtype = as_dtype(dtype)
    path = weights_file(spec, weights, pretrained, device)
    if path is None:
        with torch.device(device):
            backbone = build_backbone(spec)
        digest, source = None, "none" if spec.arch == "handcrafted" else "random"
    else:
        backbone = _load_backbone(spec, path).to(device)
        digest, source = weights_sha256(path), str(path)
        logger.info("loaded %s weights from %s (sha256 %s)", spec.name, path, digest[:12])
    if dtype is not None and spec.arch != "handcrafted":  # handcrafted statistics stay float32
        backbone = backbone.to(dtype)
    return Encoder(spec, backbone.eval(), weights_sha256=digest, weights_source=source).eval()
