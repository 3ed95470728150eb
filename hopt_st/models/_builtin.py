"""The built-in encoder specs: each model card's numbers as data, with their sources.

Near-identical models are variants made with :func:`dataclasses.replace` (H-optimus-0 is H-optimus-1 with
another repository, licence and parameter count), so each shared number is written once. The table is laid
out by hand (several fields a line, grouped: identity and weights, architecture, card facts, sources).
"""

from __future__ import annotations

from dataclasses import replace

from ._handcrafted import N_FEATURES
from ._spec import HOPTIMUS_MEAN, HOPTIMUS_STD, ModelSpec

#: SwiGLU MLP as the cards write it (``mlp_layer=SwiGLUPacked, act_layer=SiLU``), by name: specs stay data.
_SWIGLU = dict(mlp_layer="SwiGLUPacked", act_layer="SiLU")
_NC_GATED = "CC-BY-NC-ND-4.0; gated on the Hub"
_HOPT_CARD = "https://huggingface.co/bioptimus/H-optimus-1"
_HOPT0_CARD = "https://huggingface.co/bioptimus/H-optimus-0"


def _cite(card: str, **notes: str) -> dict[str, str]:
    """``sources`` entries that all point at one model card: field -> ``"<card> <note>"``."""
    return {field: f"{card} {note}" for field, note in notes.items()}


# fmt: off
H_OPTIMUS_1 = ModelSpec(
    name="h-optimus-1", dim=1536, hf_repo="bioptimus/H-optimus-1", gated=True,
    mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
    # timm's vit_giant_patch14_reg4_dinov2 defaults: embed_dim 1536, depth 40, heads 24,
    # mlp_ratio 2.66667 * 2 with SwiGLUPacked + SiLU (the ratio the card's config uses), 4 registers,
    # global_pool "token" (CLS).
    timm_name="vit_giant_patch14_reg4_dinov2",
    timm_kwargs=dict(img_size=224, init_values=1e-5, dynamic_img_size=False, num_classes=0),
    pooling="token", n_params=1.1e9, n_params_rtol=0.05,
    license="CC-BY-NC-ND-4.0 (non-commercial); gated on the Hub",
    notes="Default encoder. ViT-g/14 with 4 registers; output = CLS token after the final norm.",
    sources=_cite(
        _HOPT_CARD,
        timm_name="(timm.create_model('hf-hub:bioptimus/H-optimus-1', init_values=1e-5, dynamic_img_size=False))",
        timm_kwargs="usage snippet + config.json (architecture, num_classes 0, global_pool token)",
        dim="config.json num_features 1536",
        mean="usage snippet transforms.Normalize", std="usage snippet transforms.Normalize",
        input_size="(224 x 224 input)", mpp="(trained on 0.5 µm/px tiles, '20x')",
        n_params="(≈1.1 B parameters)",
    ),
)

H_OPTIMUS_0 = replace(
    H_OPTIMUS_1,
    name="h-optimus-0", hf_repo="bioptimus/H-optimus-0", n_params=1.13e9,
    license="Apache-2.0; gated on the Hub",
    notes="Same architecture as H-optimus-1.",
    sources=_cite(
        _HOPT0_CARD,
        timm_name="config.json architecture", dim="config.json num_features 1536",
        mean="config.json pretrained_cfg.mean", std="config.json pretrained_cfg.std",
        input_size="config.json input_size [3, 224, 224]", mpp="(0.5 µm/px)",
    ) | {"n_params": "https://huggingface.co/1aurent/vit_giant_patch14_reg4_224.h-optimus-v0 (Params: 1.13B)"},
)

H0_MINI = ModelSpec(
    name="h0-mini", dim=768, hf_repo="bioptimus/H0-mini", gated=True, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
    timm_name="vit_base_patch14_reg4_dinov2",
    timm_kwargs=dict(img_size=224, init_values=1e-5, dynamic_img_size=False, num_classes=0, **_SWIGLU,
                     mlp_ratio=2.66667 * 2),
    pooling="token", n_params=86e6, n_params_rtol=0.05, license=_NC_GATED,
    notes=(
        "ViT-B/14 distilled from H-optimus-0. Output = CLS token (768-d); the card also shows CLS ⊕ mean "
        "patch tokens (1536-d), available by registering a copy with pooling='cls+mean'. mlp_ratio 5.33 is "
        "inferred from the card's 86 M parameters with SwiGLUPacked (the card passes mlp_layer/act_layer) "
        "and was not checked against a downloaded config.json."
    ),
    sources=_cite(
        "https://huggingface.co/bioptimus/H0-mini",
        timm_kwargs="(timm.create_model(..., mlp_layer=SwiGLUPacked, act_layer=SiLU))",
        dim="(CLS token 768)", mean="(same normalisation as H-optimus-0)",
    ) | {"n_params": "https://arxiv.org/abs/2501.16239 (H0-mini, ViT-B 86 M)",
         "mpp": "https://huggingface.co/bioptimus/H0-mini (0.5 µm/px)"},
)

UNI = ModelSpec(
    name="uni", dim=1024, hf_repo="MahmoodLab/UNI", hf_filenames=("pytorch_model.bin",), gated=True,
    timm_name="vit_large_patch16_224",
    timm_kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
    n_params=303e6, license=_NC_GATED, precision="float16",
    sources=_cite(
        "https://huggingface.co/MahmoodLab/UNI",
        timm_kwargs="(timm.create_model('vit_large_patch16_224', img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True))",
        dim="(ViT-L/16, 1024-d)", mean="(ImageNet mean/std)",
        n_params="(ViT-L/16, 0.3 B); Chen et al. 2024 Nat Med", mpp="(20x, ~0.5 µm/px)",
    ),
)

UNI2_H = ModelSpec(
    name="uni2-h", dim=1536, hf_repo="MahmoodLab/UNI2-h", hf_filenames=("pytorch_model.bin",), gated=True,
    timm_name="vit_giant_patch14_224",
    timm_kwargs=dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                     mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, **_SWIGLU, reg_tokens=8,
                     dynamic_img_size=True),
    n_params=681e6, n_params_rtol=0.02, license=_NC_GATED,
    sources=_cite(
        "https://huggingface.co/MahmoodLab/UNI2-h",
        timm_kwargs="(timm_kwargs in the usage snippet)", dim="(1536-d)", mean="(ImageNet mean/std)",
        n_params="(ViT-H/14, 681 M parameters)", mpp="(20x, ~0.5 µm/px)",
    ),
)

VIRCHOW2 = ModelSpec(
    name="virchow2", dim=2560, hf_repo="paige-ai/Virchow2", gated=True,
    timm_name="vit_huge_patch14_224",
    timm_kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
                     reg_tokens=4, dynamic_img_size=True, **_SWIGLU),
    pooling="cls+mean", n_params=632e6, n_params_rtol=0.02, precision="float16", license=_NC_GATED,
    notes="Embedding = CLS token ⊕ mean of the 256 patch tokens (4 registers excluded), 2 x 1280 = 2560.",
    sources=_cite(
        "https://huggingface.co/paige-ai/Virchow2",
        timm_kwargs="config.json model_args + card (mlp_layer=SwiGLUPacked, act_layer=SiLU)",
        dim="(concat class token and mean patch tokens, 2560)", mean="config.json (ImageNet mean/std)",
        n_params="(ViT-H/14, 632 M params)",
        mpp="(trained on mixed magnifications, 0.5 µm/px = 20x used here)",
    ),
)

PROV_GIGAPATH = ModelSpec(
    name="prov-gigapath", dim=1536, hf_repo="prov-gigapath/prov-gigapath", gated=True,
    hf_filenames=("pytorch_model.bin",),
    timm_name="vit_giant_patch14_dinov2",
    timm_kwargs=dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                     init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
    n_params=1.13e9, license="Apache-2.0 (research use); gated on the Hub",
    notes="Tile encoder only (the slide encoder is not part of this registry).",
    sources=_cite(
        "https://huggingface.co/prov-gigapath/prov-gigapath",
        timm_kwargs="config.json model_args", dim="(1536-d tile embedding)",
        mean="usage transforms (ImageNet mean/std)",
    ) | {"n_params": "Xu et al. 2024 Nature (tile encoder ViT-g/14 DINOv2, 1.13 B)",
         "mpp": "https://huggingface.co/prov-gigapath/prov-gigapath (0.5 µm/px tiles)"},
)

PHIKON_V2 = ModelSpec(
    name="phikon-v2", dim=1024, hf_repo="owkin/phikon-v2", key_map="hf_dinov2", gated=False,
    timm_name="vit_large_patch16_224",
    timm_kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, dynamic_img_size=False),
    n_params=303e6, license="Owkin non-commercial licence", precision="float16",
    notes=(
        "Not a timm model: the card loads transformers.AutoModel (Dinov2Model, ViT-L/16, 24 layers, 1024-d, "
        "layer scale, no registers, output last_hidden_state[:, 0] i.e. CLS after the final layer norm). "
        "transformers is not a dependency, so it is built as the equivalent timm ViT-L/16 with layer scale and "
        "its Hub checkpoint keys are converted (key_map='hf_dinov2'; the unused mask_token is dropped). "
        "The conversion is tested on synthetic state dicts only."
    ),
    sources=_cite(
        "https://huggingface.co/owkin/phikon-v2",
        timm_kwargs="config.json (Dinov2Model, hidden_size 1024, 24 layers, 16 heads, patch 16, image 224, mlp_ratio 4)",
        dim="(1024-d CLS)", mean="preprocessor_config.json (ImageNet mean/std)",
    ) | _cite("https://arxiv.org/abs/2409.09173", n_params="(Phikon-v2, ViT-L 0.3 B)", mpp="(20x, 0.5 µm/px)"),
)

HANDCRAFTED = ModelSpec(
    name="handcrafted", dim=N_FEATURES, arch="handcrafted", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    n_params=0, precision="float32", license="BSD-3-Clause (part of hopt_st)",
    notes="Weight-free baseline: colour, H&E stain (colour deconvolution) and texture statistics per patch.",
    sources={"dim": "hopt_st.models._handcrafted.N_FEATURES"},
)
# fmt: on

#: Every built-in spec, in registry order.
BUILTIN: tuple[ModelSpec, ...] = (
    H_OPTIMUS_1,
    H_OPTIMUS_0,
    H0_MINI,
    UNI,
    UNI2_H,
    VIRCHOW2,
    PROV_GIGAPATH,
    PHIKON_V2,
    HANDCRAFTED,
)
