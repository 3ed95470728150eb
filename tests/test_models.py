"""Encoder registry: every architecture on the meta device, real forward on tiny ViTs, weight loading and errors."""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hopt_st import models
from hopt_st.models._handcrafted import FEATURE_NAMES, N_FEATURES
from hopt_st.models._weights import KeyMismatchError, WeightsUnavailableError, convert_hf_dinov2

BUILTIN = ["h-optimus-1", "h-optimus-0", "h0-mini", "uni", "uni2-h", "virchow2", "prov-gigapath", "phikon-v2"]

# Output dimension and parameter count as the model cards state them (independent of the specs).
CARD = {
    "h-optimus-1": (1536, 1.1e9, 0.05),
    "h-optimus-0": (1536, 1.13e9, 0.01),
    "h0-mini": (768, 86e6, 0.02),
    "uni": (1024, 0.3e9, 0.03),
    "uni2-h": (1536, 681e6, 0.01),
    "virchow2": (2560, 632e6, 0.01),
    "prov-gigapath": (1536, 1.13e9, 0.01),
    "phikon-v2": (1024, 0.3e9, 0.03),
}


def specs_to_register(tiny_vit_spec):
    """Registered for this module by the ``model_specs`` fixture (conftest), unregistered after it."""
    return [tiny_vit_spec(f"tiny-reg4-{pooling}", pooling) for pooling in ("token", "cls+mean")]


pytestmark = pytest.mark.usefixtures("model_specs")


def _uint8(n=3, size=56, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_list_models_is_a_dataframe_of_every_entry():
    df = models.list_models()
    assert set(BUILTIN + ["handcrafted"]) <= set(df.index)
    assert df.loc["h-optimus-1", "dim"] == 1536
    assert df.loc["handcrafted", "dim"] == N_FEATURES == len(FEATURE_NAMES)
    spec = models.get_spec("h-optimus-1")
    assert spec.mean == (0.707223, 0.578729, 0.703617) and spec.std == (0.211883, 0.230117, 0.177517)
    assert (spec.input_size, spec.mpp, spec.hf_repo) == (224, 0.5, "bioptimus/H-optimus-1")
    assert spec.timm_kwargs == dict(img_size=224, init_values=1e-5, dynamic_img_size=False, num_classes=0)
    for name in BUILTIN:
        assert {"dim", "mean", "n_params"} <= set(models.get_spec(name).sources), name
    assert "not a timm model" in models.get_spec("phikon-v2").notes.lower()
    hc = models.create("handcrafted", device="meta")
    assert tuple(hc(torch.zeros(2, 224, 224, 3, dtype=torch.uint8, device="meta")).shape) == (2, N_FEATURES)
    assert sum(p.numel() for p in hc.parameters()) == 0  # weight-free


@pytest.mark.parametrize("name", BUILTIN)
def test_architecture_on_meta_matches_model_card(name):
    dim, n_params, rtol = CARD[name]
    enc = models.create(name, pretrained=False, device="meta")
    assert enc.spec.dim == dim
    got = sum(p.numel() for p in enc.backbone.parameters())
    assert abs(got / n_params - 1) < rtol, (
        f"{name}: {got / 1e6:.1f} M parameters vs card {n_params / 1e6:.0f} M"
    )
    out = enc(torch.zeros(2, 224, 224, 3, dtype=torch.uint8, device="meta"))
    assert tuple(out.shape) == (2, dim) and out.dtype == torch.float32


def test_h_optimus_1_is_vit_giant_reg4_swiglu_cls():
    enc = models.create("h-optimus-1", pretrained=False, device="meta")
    bb = enc.backbone
    assert len(bb.blocks) == 40 and bb.embed_dim == 1536 and bb.num_reg_tokens == 4
    assert bb.global_pool == "token"
    fc1 = bb.blocks[0].mlp.fc1
    assert fc1.out_features == 8192  # SwiGLU packed: 2 x 4096 hidden = mlp_ratio 2.66667 * 2 (x1536)
    assert bb.blocks[0].ls1.gamma.shape == (1536,)


def test_timm_prefix_builds_any_timm_model():
    enc = models.create("timm:vit_small_patch14_reg4_dinov2", pretrained=False, device="meta")
    assert enc.spec.dim == 384
    assert tuple(enc(torch.zeros(1, 518, 518, 3, dtype=torch.uint8, device="meta")).shape) == (1, 384)
    with pytest.raises(KeyError, match="not a timm architecture"):
        models.get_spec("timm:no_such_net")
    with pytest.raises(KeyError, match="not in the registry"):
        models.get_spec("h-optimus-9")


def test_register_refuses_duplicates(tiny_vit_spec):
    with pytest.raises(ValueError, match="already registered"):
        models.register(tiny_vit_spec("tiny-reg4-token"))
    with pytest.raises(ValueError, match="pooling"):
        tiny_vit_spec("bad", pooling="max")


@pytest.mark.parametrize("pooling", ["token", "cls+mean"])
def test_forward_normalises_on_device_and_pools(pooling):
    torch.manual_seed(0)
    enc = models.create(f"tiny-reg4-{pooling}", pretrained=False)
    x = _uint8()
    with torch.inference_mode():
        y = enc(x)
        # the same computation written out by hand: scale, normalise with the spec's mean/std, pool
        z = x.permute(0, 3, 1, 2).float() / 255
        z = (z - torch.tensor(enc.spec.mean).view(1, 3, 1, 1)) / torch.tensor(enc.spec.std).view(1, 3, 1, 1)
        if pooling == "token":
            ref = enc.backbone(z)
        else:
            t = enc.backbone.forward_features(z)
            assert enc.backbone.num_prefix_tokens == 5  # CLS + 4 registers excluded from the mean
            ref = torch.cat([t[:, 0], t[:, 5:].mean(1)], 1)
    assert y.shape == (3, enc.spec.dim) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref)
    with pytest.raises(ValueError, match="uint8"):
        enc(x.float())


def test_weights_from_safetensors_and_pth_round_trip(tmp_path):
    torch.manual_seed(1)
    ref = models.create("tiny-reg4-token", pretrained=False)
    x = _uint8(seed=2)
    with torch.inference_mode():
        y_ref = ref(x)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.backbone.state_dict().items()}, str(st))
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": ref.backbone.state_dict()}, pth)
    for path in (st, pth):
        enc = models.create("tiny-reg4-token", weights=path)
        assert enc.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        with torch.inference_mode():
            torch.testing.assert_close(enc(x), y_ref)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    p = tmp_path / "evil.bin"
    torch.save({"x": _Evil()}, p)
    with pytest.raises(ValueError, match="weights_only"):
        models.create("tiny-reg4-token", weights=p)
    with pytest.raises(ValueError, match="unsupported extension"):
        (tmp_path / "w.ckpt").write_bytes(b"0")
        models.create("tiny-reg4-token", weights=tmp_path / "w.ckpt")


def test_key_mismatch_names_missing_and_unexpected_keys(tmp_path):
    sd = dict(models.create("tiny-reg4-token", pretrained=False).backbone.state_dict())
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["head.weight"] = torch.zeros(3, 64)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(KeyMismatchError, match=r"missing key\(s\): blocks.1.mlp.fc2.bias") as e:
        models.create("tiny-reg4-token", weights=path)
    assert "unexpected key(s): head.weight" in str(e.value)
    sd = dict(models.create("tiny-reg4-token", pretrained=False).backbone.state_dict())
    sd["cls_token"] = torch.zeros(1, 1, 32)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(KeyMismatchError, match="cls_token: file"):
        models.create("tiny-reg4-token", weights=path)


def test_missing_local_file_and_no_repo():
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        models.create("tiny-reg4-token", weights="/nonexistent/w.safetensors")
    with pytest.raises(WeightsUnavailableError, match="no Hugging Face repository"):
        models.create("tiny-reg4-token")
    with pytest.raises(ValueError, match="pretrained=False"):
        models.create("h-optimus-1", device="meta")


def test_offline_absent_model_says_how_to_get_it(tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETSECRETSECRET123")
    with caplog.at_level(logging.DEBUG), pytest.raises(WeightsUnavailableError) as e:
        models.create("h-optimus-1")
    msg = str(e.value)
    assert "https://huggingface.co/bioptimus/H-optimus-1" in msg and "HF_HUB_OFFLINE" in msg
    assert "HF_TOKEN" in msg and "weights='/path/to/model.safetensors'" in msg
    assert "SECRET" not in msg and "SECRET" not in caplog.text


def test_gated_model_error(monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import GatedRepoError

    seen = {}

    def fake_download(repo_id, filename, token=None, local_files_only=False):
        seen["token"] = token
        e = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(e, "403 gated")
        raise e

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_tokentokentoken42")
    with pytest.raises(WeightsUnavailableError, match="gated") as e:
        models.create("uni")
    assert seen["token"] == "hf_tokentokentoken42"  # the token is used...
    assert "tokentoken" not in str(e.value)  # ...but never shown
    assert "accept the terms" in str(e.value) and "MahmoodLab/UNI" in str(e.value)


def _to_hf_dinov2(sd: dict) -> dict:
    """The inverse of the key conversion, written independently: timm ViT keys -> transformers Dinov2Model."""
    out = {"embeddings.mask_token": torch.zeros(1, sd["cls_token"].shape[-1])}
    top = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        _, i, rest = k.split(".", 2)
        p = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), v.chunk(3, 0)):
                out[f"{p}attention.attention.{name}.{kind}"] = part
        elif rest.startswith("attn.proj."):
            out[p + "attention.output.dense." + rest.rsplit(".", 1)[1]] = v
        elif rest.startswith("ls"):
            out[f"{p}layer_scale{rest[2]}.lambda1"] = v
        else:
            out[p + rest] = v
    return out


def test_phikon_v2_hf_dinov2_checkpoint_is_converted(tmp_path, register_spec):
    small = dataclasses.replace(
        models.get_spec("phikon-v2"),
        name="tiny-phikon",
        dim=32,
        input_size=32,
        timm_kwargs=dict(
            img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, init_values=1e-5, num_classes=0
        ),
    )
    register_spec(small)
    torch.manual_seed(3)
    ref = models.create("tiny-phikon", pretrained=False)
    hf = _to_hf_dinov2(ref.backbone.state_dict())
    assert set(convert_hf_dinov2(hf)) == set(ref.backbone.state_dict())
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
    enc = models.create("tiny-phikon", weights=path)
    x = _uint8(2, 32)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), ref(x))


def _tile(colour, nuclei=0, seed=0, size=112):
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = colour
    yy, xx = np.mgrid[:size, :size]
    for _ in range(nuclei):
        cx, cy = rng.integers(4, size - 4, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 9] = (70, 40, 120)
    return img


def test_handcrafted_tracks_colour_and_nuclei_density():
    enc = models.create("handcrafted")
    f = {n: i for i, n in enumerate(FEATURE_NAMES)}
    tiles = np.stack(
        [
            _tile((245, 245, 245)),
            _tile((235, 150, 180)),
            _tile((235, 150, 180), 20),
            _tile((235, 150, 180), 80),
        ]
    )
    out = enc(torch.from_numpy(tiles)).numpy()
    assert out.shape == (4, N_FEATURES) and np.isfinite(out).all()
    assert out[0, f["background_fraction"]] == 1.0 and out[1, f["background_fraction"]] == 0.0
    assert out[1, f["eosin_mean"]] > out[0, f["eosin_mean"]] + 0.1  # pink = eosin
    hema, peaks = out[1:, f["hema_mean"]], out[1:, f["nuclei_peaks_per_kpx"]]
    assert (
        hema[0] < hema[1] < hema[2] and peaks[0] == 0 < peaks[1] < peaks[2]
    )  # more nuclei, more haematoxylin
    assert out[3, f["gray_gradient_mean"]] > out[1, f["gray_gradient_mean"]]
