"""The encoder registry: every supported foundation model described as data.

A :class:`ModelSpec` records how to build an encoder (timm architecture and keyword arguments), where its
weights live (Hugging Face repo), how to feed it (input size, µm/px, mean/std) and how to pool its tokens,
with the source of each number in ``sources``. :func:`create` turns a spec into an :class:`Encoder`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

#: Names of timm layer classes that specs may reference (kept as strings so that specs stay plain data).
LAYER_NAMES = ("SwiGLUPacked", "SiLU", "GELU")


@dataclass(frozen=True)
class ModelSpec:
    """Description of one patch encoder.

    Parameters
    ----------
    name : str
        Registry name (e.g. ``"h-optimus-1"``).
    dim : int
        Output embedding dimension.
    input_size : int
        Square input side in pixels the model was trained on.
    mpp : float
        µm per pixel of the training patches (0.5 µm/px is "20x").
    mean, std : tuple of float
        Per-channel normalisation applied to ``[0, 1]`` RGB inputs (inside the encoder).
    arch : str
        ``"timm"`` (build ``timm.create_model(timm_name, **timm_kwargs)``) or ``"handcrafted"``.
    timm_name : str or None
        timm architecture name.
    timm_kwargs : dict
        Keyword arguments for ``timm.create_model``. Layer classes are given by name
        (``"SwiGLUPacked"``, ``"SiLU"``) and resolved when building.
    pooling : str
        ``"token"``: the model's own pooled output (CLS token for these models); ``"cls+mean"``: CLS token
        concatenated with the mean of the patch tokens (registers excluded).
    hf_repo : str or None
        Hugging Face repository of the weights.
    hf_filenames : tuple of str
        Candidate weight file names in the repository, tried in order.
    key_map : str or None
        Name of a state-dict key conversion applied before exact matching (``"hf_dinov2"`` for
        checkpoints saved by ``transformers.Dinov2Model``).
    n_params : float or None
        Parameter count stated by the model card (backbone only), for tests.
    n_params_rtol : float
        Relative tolerance on ``n_params`` (cards round, e.g. "1.1 B").
    precision : str
        Recommended inference precision on GPU.
    gated : bool
        Whether the Hugging Face repository requires accepting terms.
    license : str
        Licence note.
    notes : str
        Free text (e.g. how the construction differs from the card when it is not plain timm).
    sources : dict
        Field name -> where the number comes from (model card URL, config.json, paper).
    """

    name: str
    dim: int
    input_size: int = 224
    mpp: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    arch: str = "timm"
    timm_name: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    pooling: str = "token"
    hf_repo: str | None = None
    hf_filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    key_map: str | None = None
    n_params: float | None = None
    n_params_rtol: float = 0.05
    precision: str = "bfloat16"
    gated: bool = False
    license: str = ""
    notes: str = ""
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.pooling not in ("token", "cls+mean"):
            raise ValueError(
                f"ModelSpec {self.name!r}: pooling={self.pooling!r} must be 'token' or 'cls+mean'."
            )
        if self.arch not in ("timm", "handcrafted"):
            raise ValueError(f"ModelSpec {self.name!r}: arch={self.arch!r} must be 'timm' or 'handcrafted'.")
        if self.arch == "timm" and not self.timm_name:
            raise ValueError(f"ModelSpec {self.name!r}: arch='timm' needs timm_name.")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"ModelSpec {self.name!r}: mean and std need 3 values (RGB).")


_HOPT_CARD = "https://huggingface.co/bioptimus/H-optimus-1"
_HOPT0_CARD = "https://huggingface.co/bioptimus/H-optimus-0"

_BUILTIN: list[ModelSpec] = [
    ModelSpec(
        name="h-optimus-1",
        dim=1536,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        timm_name="vit_giant_patch14_reg4_dinov2",
        # timm's vit_giant_patch14_reg4_dinov2 defaults: embed_dim 1536, depth 40, heads 24,
        # mlp_ratio 2.66667 * 2 with SwiGLUPacked + SiLU (the ratio the card's config uses), 4 registers,
        # global_pool "token" (CLS).
        timm_kwargs=dict(img_size=224, init_values=1e-5, dynamic_img_size=False, num_classes=0),
        pooling="token",
        hf_repo="bioptimus/H-optimus-1",
        n_params=1.1e9,
        n_params_rtol=0.05,
        gated=True,
        license="CC-BY-NC-ND-4.0 (non-commercial); gated on the Hub",
        notes="Default encoder. ViT-g/14 with 4 registers; output = CLS token after the final norm.",
        sources={
            "timm_name": f"{_HOPT_CARD} (timm.create_model('hf-hub:bioptimus/H-optimus-1', init_values=1e-5, dynamic_img_size=False))",
            "timm_kwargs": f"{_HOPT_CARD} usage snippet + config.json (architecture, num_classes 0, global_pool token)",
            "dim": f"{_HOPT_CARD} config.json num_features 1536",
            "mean": f"{_HOPT_CARD} usage snippet transforms.Normalize",
            "std": f"{_HOPT_CARD} usage snippet transforms.Normalize",
            "input_size": f"{_HOPT_CARD} (224 x 224 input)",
            "mpp": f"{_HOPT_CARD} (trained on 0.5 µm/px tiles, '20x')",
            "n_params": f"{_HOPT_CARD} (≈1.1 B parameters)",
        },
    ),
    ModelSpec(
        name="h-optimus-0",
        dim=1536,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        timm_name="vit_giant_patch14_reg4_dinov2",
        timm_kwargs=dict(img_size=224, init_values=1e-5, dynamic_img_size=False, num_classes=0),
        hf_repo="bioptimus/H-optimus-0",
        n_params=1.13e9,
        gated=True,
        license="Apache-2.0; gated on the Hub",
        notes="Same architecture as H-optimus-1.",
        sources={
            "timm_name": f"{_HOPT0_CARD} config.json architecture",
            "dim": f"{_HOPT0_CARD} config.json num_features 1536",
            "mean": f"{_HOPT0_CARD} config.json pretrained_cfg.mean",
            "std": f"{_HOPT0_CARD} config.json pretrained_cfg.std",
            "input_size": f"{_HOPT0_CARD} config.json input_size [3, 224, 224]",
            "mpp": f"{_HOPT0_CARD} (0.5 µm/px)",
            "n_params": "https://huggingface.co/1aurent/vit_giant_patch14_reg4_224.h-optimus-v0 (Params: 1.13B)",
        },
    ),
    ModelSpec(
        name="h0-mini",
        dim=768,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        timm_name="vit_base_patch14_reg4_dinov2",
        timm_kwargs=dict(
            img_size=224,
            init_values=1e-5,
            dynamic_img_size=False,
            num_classes=0,
            mlp_layer="SwiGLUPacked",
            act_layer="SiLU",
            mlp_ratio=2.66667 * 2,
        ),
        pooling="token",
        hf_repo="bioptimus/H0-mini",
        n_params=86e6,
        n_params_rtol=0.05,
        gated=True,
        license="CC-BY-NC-ND-4.0; gated on the Hub",
        notes=(
            "ViT-B/14 distilled from H-optimus-0. Output = CLS token (768-d); the card also shows CLS ⊕ mean "
            "patch tokens (1536-d), available by registering a copy with pooling='cls+mean'. mlp_ratio 5.33 is "
            "inferred from the card's 86 M parameters with SwiGLUPacked (the card passes mlp_layer/act_layer) "
            "and was not checked against a downloaded config.json."
        ),
        sources={
            "timm_kwargs": "https://huggingface.co/bioptimus/H0-mini (timm.create_model(..., mlp_layer=SwiGLUPacked, act_layer=SiLU))",
            "dim": "https://huggingface.co/bioptimus/H0-mini (CLS token 768)",
            "mean": "https://huggingface.co/bioptimus/H0-mini (same normalisation as H-optimus-0)",
            "n_params": "https://arxiv.org/abs/2501.16239 (H0-mini, ViT-B 86 M)",
            "mpp": "https://huggingface.co/bioptimus/H0-mini (0.5 µm/px)",
        },
    ),
    ModelSpec(
        name="uni",
        dim=1024,
        timm_name="vit_large_patch16_224",
        timm_kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        hf_repo="MahmoodLab/UNI",
        hf_filenames=("pytorch_model.bin",),
        n_params=303e6,
        gated=True,
        license="CC-BY-NC-ND-4.0; gated on the Hub",
        precision="float16",
        sources={
            "timm_kwargs": "https://huggingface.co/MahmoodLab/UNI (timm.create_model('vit_large_patch16_224', img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True))",
            "dim": "https://huggingface.co/MahmoodLab/UNI (ViT-L/16, 1024-d)",
            "mean": "https://huggingface.co/MahmoodLab/UNI (ImageNet mean/std)",
            "n_params": "https://huggingface.co/MahmoodLab/UNI (ViT-L/16, 0.3 B); Chen et al. 2024 Nat Med",
            "mpp": "https://huggingface.co/MahmoodLab/UNI (20x, ~0.5 µm/px)",
        },
    ),
    ModelSpec(
        name="uni2-h",
        dim=1536,
        timm_name="vit_giant_patch14_224",
        timm_kwargs=dict(
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            num_classes=0,
            no_embed_class=True,
            mlp_layer="SwiGLUPacked",
            act_layer="SiLU",
            reg_tokens=8,
            dynamic_img_size=True,
        ),
        hf_repo="MahmoodLab/UNI2-h",
        hf_filenames=("pytorch_model.bin",),
        n_params=681e6,
        n_params_rtol=0.02,
        gated=True,
        license="CC-BY-NC-ND-4.0; gated on the Hub",
        sources={
            "timm_kwargs": "https://huggingface.co/MahmoodLab/UNI2-h (timm_kwargs in the usage snippet)",
            "dim": "https://huggingface.co/MahmoodLab/UNI2-h (1536-d)",
            "mean": "https://huggingface.co/MahmoodLab/UNI2-h (ImageNet mean/std)",
            "n_params": "https://huggingface.co/MahmoodLab/UNI2-h (ViT-H/14, 681 M parameters)",
            "mpp": "https://huggingface.co/MahmoodLab/UNI2-h (20x, ~0.5 µm/px)",
        },
    ),
    ModelSpec(
        name="virchow2",
        dim=2560,
        timm_name="vit_huge_patch14_224",
        timm_kwargs=dict(
            img_size=224,
            init_values=1e-5,
            num_classes=0,
            mlp_ratio=5.3375,
            global_pool="",
            reg_tokens=4,
            dynamic_img_size=True,
            mlp_layer="SwiGLUPacked",
            act_layer="SiLU",
        ),
        pooling="cls+mean",
        hf_repo="paige-ai/Virchow2",
        n_params=632e6,
        n_params_rtol=0.02,
        precision="float16",
        gated=True,
        license="CC-BY-NC-ND-4.0; gated on the Hub",
        notes="Embedding = CLS token ⊕ mean of the 256 patch tokens (4 registers excluded), 2 x 1280 = 2560.",
        sources={
            "timm_kwargs": "https://huggingface.co/paige-ai/Virchow2 config.json model_args + card (mlp_layer=SwiGLUPacked, act_layer=SiLU)",
            "dim": "https://huggingface.co/paige-ai/Virchow2 (concat class token and mean patch tokens, 2560)",
            "mean": "https://huggingface.co/paige-ai/Virchow2 config.json (ImageNet mean/std)",
            "n_params": "https://huggingface.co/paige-ai/Virchow2 (ViT-H/14, 632 M params)",
            "mpp": "https://huggingface.co/paige-ai/Virchow2 (trained on mixed magnifications, 0.5 µm/px = 20x used here)",
        },
    ),
    ModelSpec(
        name="prov-gigapath",
        dim=1536,
        timm_name="vit_giant_patch14_dinov2",
        timm_kwargs=dict(
            img_size=224,
            in_chans=3,
            patch_size=16,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            init_values=1e-5,
            mlp_ratio=5.33334,
            num_classes=0,
        ),
        hf_repo="prov-gigapath/prov-gigapath",
        hf_filenames=("pytorch_model.bin",),
        n_params=1.13e9,
        gated=True,
        license="Apache-2.0 (research use); gated on the Hub",
        notes="Tile encoder only (the slide encoder is not part of this registry).",
        sources={
            "timm_kwargs": "https://huggingface.co/prov-gigapath/prov-gigapath config.json model_args",
            "dim": "https://huggingface.co/prov-gigapath/prov-gigapath (1536-d tile embedding)",
            "mean": "https://huggingface.co/prov-gigapath/prov-gigapath usage transforms (ImageNet mean/std)",
            "n_params": "Xu et al. 2024 Nature (tile encoder ViT-g/14 DINOv2, 1.13 B)",
            "mpp": "https://huggingface.co/prov-gigapath/prov-gigapath (0.5 µm/px tiles)",
        },
    ),
    ModelSpec(
        name="phikon-v2",
        dim=1024,
        timm_name="vit_large_patch16_224",
        timm_kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, dynamic_img_size=False),
        hf_repo="owkin/phikon-v2",
        key_map="hf_dinov2",
        n_params=303e6,
        gated=False,
        license="Owkin non-commercial licence",
        precision="float16",
        notes=(
            "Not a timm model: the card loads transformers.AutoModel (Dinov2Model, ViT-L/16, 24 layers, 1024-d, "
            "layer scale, no registers, output last_hidden_state[:, 0] i.e. CLS after the final layer norm). "
            "transformers is not a dependency, so it is built as the equivalent timm ViT-L/16 with layer scale and "
            "its Hub checkpoint keys are converted (key_map='hf_dinov2'; the unused mask_token is dropped). "
            "The conversion is tested on synthetic state dicts only."
        ),
        sources={
            "timm_kwargs": "https://huggingface.co/owkin/phikon-v2 config.json (Dinov2Model, hidden_size 1024, 24 layers, 16 heads, patch 16, image 224, mlp_ratio 4)",
            "dim": "https://huggingface.co/owkin/phikon-v2 (1024-d CLS)",
            "mean": "https://huggingface.co/owkin/phikon-v2 preprocessor_config.json (ImageNet mean/std)",
            "n_params": "https://arxiv.org/abs/2409.09173 (Phikon-v2, ViT-L 0.3 B)",
            "mpp": "https://arxiv.org/abs/2409.09173 (20x, 0.5 µm/px)",
        },
    ),
    ModelSpec(
        name="handcrafted",
        dim=0,  # replaced below by the real feature count
        arch="handcrafted",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        n_params=0,
        precision="float32",
        license="BSD-3-Clause (part of hopt_st)",
        notes="Weight-free baseline: colour, H&E stain (colour deconvolution) and texture statistics per patch.",
        sources={"dim": "hopt_st.models._handcrafted.N_FEATURES"},
    ),
]

_REGISTRY: dict[str, ModelSpec] = {}


def _init_registry() -> None:
    from ._handcrafted import N_FEATURES

    for spec in _BUILTIN:
        if spec.arch == "handcrafted":
            spec = dataclasses.replace(spec, dim=N_FEATURES)
        _REGISTRY[spec.name] = spec


def register(spec: ModelSpec, *, overwrite: bool = False) -> ModelSpec:
    """Add a :class:`ModelSpec` to the registry.

    Parameters
    ----------
    spec : ModelSpec
        The spec; its ``name`` becomes the registry key.
    overwrite : bool
        Replace an existing entry of the same name.

    Returns
    -------
    ModelSpec
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register() takes a ModelSpec, got {type(spec).__name__}.")
    if spec.name.startswith("timm:"):
        raise ValueError(f"{spec.name!r}: names starting with 'timm:' are reserved for any timm model.")
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"model {spec.name!r} is already registered: pass overwrite=True to replace it.")
    _REGISTRY[spec.name] = spec
    return spec


def _timm_spec(name: str) -> ModelSpec:
    import timm
    import torch

    arch = name.split(":", 1)[1]
    if not arch or arch not in timm.list_models():
        raise KeyError(
            f"model {name!r}: {arch!r} is not a timm architecture (see timm.list_models()); e.g. 'timm:vit_small_patch14_reg4_dinov2'."
        )
    with torch.device("meta"):
        m = timm.create_model(arch, pretrained=False, num_classes=0)
    cfg = getattr(m, "pretrained_cfg", {}) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    return ModelSpec(
        name=name,
        dim=int(m.num_features),
        input_size=int(size),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        timm_name=arch,
        timm_kwargs=dict(num_classes=0),
        hf_repo=cfg.get("hf_hub_id") or None,
        precision="bfloat16",
        notes="Generic timm model; µm/px 0.5 assumed (set your own with models.register).",
        sources={
            "mean": "timm pretrained_cfg",
            "input_size": "timm pretrained_cfg",
            "dim": "timm num_features",
        },
    )


def get_spec(name: str | ModelSpec) -> ModelSpec:
    """Return the :class:`ModelSpec` registered under ``name`` (``"timm:<arch>"`` works for any timm model)."""
    if isinstance(name, ModelSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"model must be a registry name (str), got {type(name).__name__}.")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm:"):
        return _timm_spec(name)
    raise KeyError(
        f"model {name!r} is not in the registry; known models: {sorted(_REGISTRY)} "
        "(or 'timm:<architecture>', or add one with hopt_st.models.register)."
    )


def list_models() -> pd.DataFrame:
    """All registered encoders as a DataFrame indexed by name (``timm:<arch>`` entries are built on demand)."""
    rows = []
    for spec in _REGISTRY.values():
        row = dataclasses.asdict(spec)
        row["timm_kwargs"] = repr(row["timm_kwargs"]) if row["timm_kwargs"] else ""
        row["hf_filenames"] = ", ".join(row["hf_filenames"])
        row["sources"] = "; ".join(f"{k}: {v}" for k, v in spec.sources.items())
        rows.append(row)
    df = pd.DataFrame(rows).set_index("name")
    return df[[c for c in df.columns if c != "sources"] + ["sources"]]


def create(
    name: str | ModelSpec = "h-optimus-1",
    weights: str | None = None,
    pretrained: bool = True,
    device: str | None = None,
):
    """Build an encoder: a ``torch.nn.Module`` mapping uint8 ``(B, H, W, 3)`` to float32 ``(B, dim)``.

    Parameters
    ----------
    name : str or ModelSpec
        Registry name, ``"timm:<arch>"`` or a spec.
    weights : str or path-like, optional
        A local weight file (``.safetensors``; ``.bin``/``.pth`` via ``torch.load(weights_only=True)``).
        ``None`` with ``pretrained=True`` downloads (or reads from the local Hugging Face cache) the spec's
        ``hf_repo`` using ``HF_TOKEN``; ``HF_HUB_OFFLINE=1`` only uses the cache.
    pretrained : bool
        ``False`` builds the architecture with random weights (no file needed).
    device : str or torch.device, optional
        Where to put the module; ``"meta"`` builds without allocating memory. Default CPU.

    Returns
    -------
    Encoder
        With ``.spec`` and ``.weights_sha256`` (``None`` for random weights).
    """
    from ._encoder import build_encoder

    spec = get_spec(name)
    return build_encoder(spec, weights=weights, pretrained=pretrained, device=device)


_init_registry()
