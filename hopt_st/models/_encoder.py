"""The :class:`Encoder` module: uint8 RGB patches in, float32 embeddings out.

Scaling to ``[0, 1]``, resizing (only if the patch size differs from the model's) and mean/std
normalisation happen inside ``forward``, on the module's device, so only uint8 crosses the bus.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._handcrafted import HandcraftedEncoder
from ._weights import KEY_MAPS, check_keys, read_state_dict, resolve_weights, sha256_file

logger = logging.getLogger(__name__)


def _resolve_layers(kwargs: dict) -> dict:
    from timm.layers import SwiGLUPacked

    names = {"SwiGLUPacked": SwiGLUPacked, "SiLU": nn.SiLU, "GELU": nn.GELU}
    return {
        k: names.get(v, v) if isinstance(v, str) and k in ("mlp_layer", "act_layer") else v
        for k, v in kwargs.items()
    }


def build_backbone(spec) -> nn.Module:
    """The bare network of a spec with random weights, built on the current default device."""
    if spec.arch == "handcrafted":
        return HandcraftedEncoder()
    import timm

    return timm.create_model(spec.timm_name, pretrained=False, **_resolve_layers(spec.timm_kwargs))


class Encoder(nn.Module):
    """A patch encoder built from a :class:`~hopt_st.models.ModelSpec`.

    Attributes
    ----------
    spec : ModelSpec
    backbone : torch.nn.Module
    weights_sha256 : str or None
        sha256 of the weight file, ``None`` for random or weight-free encoders.
    weights_source : str
        Path of the weight file, ``"random"`` or ``"none"`` (handcrafted).
    """

    def __init__(self, spec, backbone: nn.Module, *, weights_sha256=None, weights_source="random"):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.weights_sha256 = weights_sha256
        self.weights_source = weights_source
        dev = next(iter(backbone.parameters()), torch.empty(0)).device
        self.register_buffer("mean", torch.tensor(spec.mean, device=dev).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, device=dev).view(1, 3, 1, 1), persistent=False)
        self._warned_resize = False

    @property
    def dim(self) -> int:
        return self.spec.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed uint8 RGB patches ``(B, H, W, 3)`` -> float32 ``(B, dim)``."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"encoder {self.spec.name!r} takes uint8 RGB patches (B, H, W, 3); got {x.dtype} {tuple(x.shape)}."
            )
        if self.spec.arch == "handcrafted":
            return self.backbone(x).float()
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
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
        x = (x - self.mean) / self.std
        if self.spec.pooling == "token":
            out = self.backbone(x)
        else:  # cls+mean
            tokens = self.backbone.forward_features(x)
            n_prefix = getattr(self.backbone, "num_prefix_tokens", 1)
            out = torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=-1)
        return out.float()


def build_encoder(spec, *, weights=None, pretrained=True, device=None) -> Encoder:
    """Build an :class:`Encoder` (see :func:`hopt_st.models.create`)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if spec.arch == "handcrafted":
        if weights is not None:
            raise ValueError("model 'handcrafted' has no weights: do not pass weights=.")
        with torch.device(device):
            backbone = HandcraftedEncoder()
        return Encoder(spec, backbone, weights_source="none").eval()

    if weights is None and not pretrained:
        with torch.device(device):
            backbone = build_backbone(spec)
        return Encoder(spec, backbone.eval(), weights_source="random").eval()
    if device.type == "meta":
        raise ValueError(
            f"device='meta' builds {spec.name!r} without memory, so it cannot hold weights: pass pretrained=False."
        )
    path = Path(weights) if weights is not None else resolve_weights(spec)
    sd = read_state_dict(path)
    if spec.key_map:
        sd = KEY_MAPS[spec.key_map](sd)
    with torch.device("meta"):
        backbone = build_backbone(spec)
    check_keys(backbone, sd, what=f"model {spec.name!r} from {str(path)!r}")
    backbone.load_state_dict(sd, strict=True, assign=True)
    if any(b.is_meta for b in backbone.buffers()):  # non-persistent buffers: build for real, then load
        backbone = build_backbone(spec)
        backbone.load_state_dict(sd, strict=True)
    backbone = backbone.float().to(device).eval()
    digest = sha256_file(path)
    logger.info("loaded %s weights from %s (sha256 %s)", spec.name, path, digest[:12])
    return Encoder(spec, backbone, weights_sha256=digest, weights_source=str(path)).eval()
