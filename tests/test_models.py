"""Encoder registry: every architecture on the meta device, real forward on tiny ViTs, weight loading and errors."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    with pytest.raises(ValueError, match="weights_only") as e:
        models.create("tiny-reg4-token", weights=p)
    assert str(p) in str(e.value) and "never unpickles" in str(e.value)
    with pytest.raises(ValueError, match="unsupported extension"):
        (tmp_path / "w.ckpt").write_bytes(b"0")
        models.create("tiny-reg4-token", weights=tmp_path / "w.ckpt")


def test_corrupt_and_non_state_dict_files_are_refused(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ValueError, match="not a readable safetensors file") as e:
        models.create("tiny-reg4-token", weights=corrupt)
    assert str(corrupt) in str(e.value)
    truncated = tmp_path / "truncated.pth"
    torch.save({"w": torch.zeros(8)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(ValueError, match="cannot be read with torch.load") as e:
        models.create("tiny-reg4-token", weights=truncated)
    assert str(truncated) in str(e.value)
    for i, obj in enumerate(
        [[torch.zeros(2)], torch.zeros(3), {"w": [1, 2]}, {"w": torch.zeros(1), 3: torch.zeros(1)}]
    ):
        path = tmp_path / f"not_a_state_dict_{i}.pt"
        torch.save(obj, path)
        with pytest.raises(ValueError, match="flat dict of tensors") as e:
            models.create("tiny-reg4-token", weights=path)
        assert str(path) in str(e.value)


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
    monkeypatch.setattr("hopt_st.models._weights._hub_unreachable", lambda: None)  # as if online
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


def test_variants_are_replacements_of_one_spec():
    h1, h0 = models.get_spec("h-optimus-1"), models.get_spec("h-optimus-0")
    a, b = dataclasses.asdict(h1), dataclasses.asdict(h0)
    assert {k for k in a if a[k] != b[k]} == {"name", "hf_repo", "n_params", "license", "notes", "sources"}
    assert h0.timm_kwargs == h1.timm_kwargs and h0.timm_kwargs is not h1.timm_kwargs  # copied, not shared


def test_spec_is_hashable_plain_data(tiny_vit_spec):
    a, b = tiny_vit_spec("x"), tiny_vit_spec("x")
    assert a == b and hash(a) == hash(b) and len({a, b, tiny_vit_spec("y")}) == 2
    kwargs = dict(a.timm_kwargs)
    c = dataclasses.replace(a, timm_kwargs=kwargs)
    kwargs["depth"] = 40  # the spec holds its own copy
    assert c.timm_kwargs["depth"] == 2 and c == a
    assert dataclasses.replace(a, mean=[0.5, 0.5, 0.5]).mean == (0.5, 0.5, 0.5)
    with pytest.raises(TypeError, match="dim must be an int"):
        dataclasses.replace(a, dim="64")
    with pytest.raises(TypeError, match="timm_kwargs must be a dict"):
        dataclasses.replace(a, timm_kwargs=[("depth", 2)])
    with pytest.raises(TypeError, match="hf_filenames"):
        dataclasses.replace(a, hf_filenames="model.safetensors")
    with pytest.raises(ValueError, match="input_size=0"):
        dataclasses.replace(a, input_size=0)
    with pytest.raises(ValueError, match="3 values"):
        dataclasses.replace(a, std=(1.0, 1.0))
    with pytest.raises(ValueError, match="arch"):
        dataclasses.replace(a, arch="onnx")


def test_registered_restores_the_registry(tiny_vit_spec):
    h1 = models.get_spec("h-optimus-1")
    mine = dataclasses.replace(h1, mpp=0.25)
    with models.registered(mine, tiny_vit_spec("tiny-temp"), overwrite=True) as specs:
        assert specs[0] is mine and models.get_spec("h-optimus-1") is mine
        assert "tiny-temp" in models.list_models().index
    assert models.get_spec("h-optimus-1") is h1
    with pytest.raises(KeyError, match="not in the registry"):
        models.get_spec("tiny-temp")
    with pytest.raises(ValueError, match="already registered"):  # a failure undoes the earlier ones too
        with models.registered(tiny_vit_spec("tiny-temp"), tiny_vit_spec("tiny-reg4-token")):
            pass
    with pytest.raises(KeyError):
        models.get_spec("tiny-temp")
    spec = models.register(tiny_vit_spec("tiny-temp"))
    assert models.unregister("tiny-temp") is spec
    with pytest.raises(KeyError, match="not in the registry"):
        models.unregister("tiny-temp")
    with pytest.raises(TypeError):
        models.unregister(spec)
    with pytest.raises(TypeError, match="ModelSpec"):
        models.register("tiny-temp")


def test_backbone_carries_the_normalisation_config():
    from timm.data import resolve_data_config

    enc = models.create("tiny-reg4-token", pretrained=False)
    cfg = enc.backbone.pretrained_cfg
    assert cfg["mean"] == enc.spec.mean and cfg["std"] == enc.spec.std and cfg["input_size"] == (3, 56, 56)
    data = resolve_data_config({}, model=enc.backbone)
    assert data["mean"] == enc.spec.mean and data["input_size"] == (3, 56, 56) and data["crop_pct"] == 1.0
    meta = models.create("h-optimus-1", pretrained=False, device="meta").backbone.pretrained_cfg
    assert meta["mean"] == (0.707223, 0.578729, 0.703617) and meta["input_size"] == (3, 224, 224)


def test_dtype_casts_the_backbone():
    torch.manual_seed(4)
    ref = models.create("tiny-reg4-cls+mean", pretrained=False)
    half = models.create(ref.spec, pretrained=False, dtype="bfloat16")
    half.load_state_dict(ref.state_dict())
    assert {p.dtype for p in half.backbone.parameters()} == {torch.bfloat16}
    x = _uint8(2)
    with torch.inference_mode():
        y, y_ref = half(x), ref(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=0.1, atol=0.1)
    hc = models.create("handcrafted", dtype=torch.float16)  # statistics stay float32
    assert hc.backbone.stain_inv.dtype == torch.float32
    with pytest.raises(ValueError, match="floating precision"):
        models.create("tiny-reg4-token", pretrained=False, dtype="int8")
    with pytest.raises(TypeError, match="dtype"):
        models.create("tiny-reg4-token", pretrained=False, dtype=16)
    with pytest.raises(TypeError, match="weights"):
        models.create("tiny-reg4-token", weights=3)
    with pytest.raises(ValueError, match="device"):
        models.create("tiny-reg4-token", pretrained=False, device="gpu0")


# ---------------------------------------------------------------- one encoder per process, digests known


def _save_tiny(path, seed=0):
    torch.random.manual_seed(seed)
    sd = models.create("tiny-reg4-token", pretrained=False).backbone.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_get_encoder_builds_once_per_spec_file_device_and_dtype(tmp_path, tiny_vit_spec, register_spec):
    models.clear_encoder_cache()
    w = _save_tiny(tmp_path / "w.safetensors")
    a = models.get_encoder("tiny-reg4-token", weights=w)
    assert models.get_encoder("tiny-reg4-token", weights=str(w)) is a
    assert models.get_encoder(models.get_spec("tiny-reg4-token"), weights=w, device="cpu") is a
    assert models.encoder_cache_info() == {"builds": 1, "hits": 2, "size": 1}
    assert models.create("tiny-reg4-token", weights=w) is not a  # create() always builds
    assert models.get_encoder("tiny-reg4-token", weights=w, dtype=torch.bfloat16) is not a
    random = models.get_encoder("tiny-reg4-token", pretrained=False)
    assert random is not a and random.weights_sha256 is None
    assert models.get_encoder("tiny-reg4-token", pretrained=False) is random
    assert models.encoder_cache_info()["builds"] == 3

    _save_tiny(w, seed=1)  # the file changed: loaded again, with its new digest
    os.utime(w, ns=(time.time_ns(), time.time_ns() + 10**9))
    b = models.get_encoder("tiny-reg4-token", weights=w)
    assert b is not a and b.weights_sha256 == hashlib.sha256(w.read_bytes()).hexdigest() != a.weights_sha256

    register_spec(tiny_vit_spec("tiny-reg4-token", embed_dim=32), overwrite=True)  # same name, other spec
    c = models.get_encoder("tiny-reg4-token", pretrained=False)
    assert c is not random and c.spec.dim == 32
    assert models.encoder_cache_info()["builds"] == 5
    models.clear_encoder_cache()
    assert models.encoder_cache_info() == {"builds": 0, "hits": 0, "size": 0}
    assert models.get_encoder("tiny-reg4-token", pretrained=False) is not c


def test_get_encoder_is_thread_safe(monkeypatch):
    from hopt_st.models import _cache

    models.clear_encoder_cache()
    built = []
    build = _cache.build_encoder

    def slow_build(*args, **kwargs):
        built.append(1)
        time.sleep(0.3)  # every thread arrives while the first one builds
        return build(*args, **kwargs)

    monkeypatch.setattr(_cache, "build_encoder", slow_build)
    barrier = threading.Barrier(6)

    def get(_):
        barrier.wait()
        return models.get_encoder("tiny-reg4-cls+mean", pretrained=False)

    with ThreadPoolExecutor(6) as pool:
        encoders = list(pool.map(get, range(6)))
    assert len(built) == 1 and all(e is encoders[0] for e in encoders)
    assert models.encoder_cache_info() == {"builds": 1, "hits": 5, "size": 1}
    models.clear_encoder_cache()


def _count_hashing(monkeypatch):
    from hopt_st.models import _weights

    calls = []
    real = _weights.sha256_file

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(_weights, "sha256_file", counting)
    monkeypatch.setattr(_weights, "_DIGESTS", {})
    return calls


def _hf_cache_file(hub, repo, filename, data: bytes, blob_name=None):
    """Write ``data`` into a Hugging Face cache layout: snapshots/<rev>/<filename> -> ../../blobs/<blob_name>."""
    root = hub / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    blob = root / "blobs" / (blob_name or hashlib.sha256(data).hexdigest())
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = root / "snapshots" / rev / filename
    link.parent.mkdir(parents=True)
    link.symlink_to(Path("..", "..", "blobs", blob.name))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    return link


def test_digest_of_a_hugging_face_cache_file_is_its_blob_name(
    tmp_path, monkeypatch, tiny_vit_spec, register_spec
):
    from huggingface_hub import constants

    calls = _count_hashing(monkeypatch)
    data = _save_tiny(tmp_path / "w.safetensors").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    hub = tmp_path / "hub"
    link = _hf_cache_file(hub, "org/tiny", "model.safetensors", data)
    assert models.create("tiny-reg4-token", weights=link).weights_sha256 == sha and calls == []

    # through the Hub lookup (offline: the cache only), as create()/get_encoder() do for a registry model
    register_spec(tiny_vit_spec("tiny-hub", hf_repo="org/tiny"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.clear_encoder_cache()
    enc = models.get_encoder("tiny-hub")
    assert enc.weights_sha256 == sha and enc.weights_source.endswith("model.safetensors") and calls == []

    # a blob that links on into a shared store (named by another hash) is known by its per-repo name
    shared = tmp_path / "hub" / "blobs" / "ab" / ("ab" * 32)
    shared.parent.mkdir(parents=True)
    shared.write_bytes(data)
    blob = hub / "models--org--tiny" / "blobs" / sha
    blob.unlink()
    blob.symlink_to(shared)
    assert models.create("tiny-hub").weights_sha256 == sha and calls == []
    models.clear_encoder_cache()

    # a 40-hex blob name is a git sha1 (small files kept in git), not the sha256: the file is hashed
    sha1_link = _hf_cache_file(tmp_path / "hub2", "org/tiny", "model.safetensors", data, blob_name="f" * 40)
    assert models.create("tiny-reg4-token", weights=sha1_link).weights_sha256 == sha and len(calls) == 1


def test_digest_is_computed_once_per_file_version(tmp_path, monkeypatch):
    calls = _count_hashing(monkeypatch)
    w = _save_tiny(tmp_path / "w.safetensors")
    first = models.create("tiny-reg4-token", weights=w).weights_sha256
    assert models.create("tiny-reg4-token", weights=w).weights_sha256 == first and len(calls) == 1
    os.utime(w, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: hashed again
    assert models.create("tiny-reg4-token", weights=w).weights_sha256 == first and len(calls) == 2


# ---------------------------------------------------------------- which weights are on this machine


def test_weights_status_and_local_models_never_download(tmp_path, monkeypatch, tiny_vit_spec, register_spec):
    import huggingface_hub
    from huggingface_hub import constants

    def no_download(*args, **kwargs):
        raise AssertionError("weights_status must not download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _hf_cache_file(tmp_path / "hub", "org/tiny", "pytorch_model.bin", b"weights")
    register_spec(
        tiny_vit_spec("tiny-cached", hf_repo="org/tiny"), tiny_vit_spec("tiny-absent", hf_repo="org/absent")
    )
    assert models.weights_status("handcrafted") == "not needed"
    assert models.weights_status("tiny-cached") == "local"  # the second candidate file name is found
    assert models.weights_status("tiny-absent") == "missing"
    assert models.weights_status("tiny-reg4-token") == "missing"  # no repository: only a file can be passed
    assert models.weights_status("h-optimus-1") == "missing"
    local = models.local_models()
    assert {"handcrafted", "tiny-cached"} <= set(local)
    assert not {"tiny-absent", "h-optimus-1", "tiny-reg4-token"} & set(local)
    assert local == [n for n in models.list_models().index if n in local]  # registry order


def test_unreachable_hub_fails_fast_with_what_is_true_for_the_model(tmp_path, monkeypatch):
    """No internet, weights not cached: refused in seconds (no retries), saying public vs gated truthfully."""
    import time

    import huggingface_hub
    from huggingface_hub import constants

    from hopt_st.models import _weights

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    assert "127.0.0.1:9" in _weights._hub_unreachable()
    real = huggingface_hub.hf_hub_download

    def cache_only(*args, local_files_only=False, **kwargs):
        assert local_files_only, "the network was tried although the Hub is unreachable"
        return real(*args, local_files_only=True, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only)
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as e:
        models.create("uni")
    assert time.perf_counter() - t0 < 10
    assert "could not be reached" in str(e.value) and "gated" in str(e.value) and "HF_TOKEN" in str(e.value)
    public = dataclasses.replace(models.get_spec("uni"), name="public-uni", gated=False)
    with pytest.raises(WeightsUnavailableError) as e:
        models.create(public)
    assert "public" in str(e.value) and "gated" not in str(e.value) and "accept" not in str(e.value)
    # offline and not cached: a public model is not told to log in and accept terms
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as e:
        models.create(public)
    msg = str(e.value)
    assert (
        "is public (no login or token needed)" in msg
        and "unset HF_HUB_OFFLINE" in msg
        and "accept" not in msg
    )


def test_generic_timm_vit_uses_the_224_px_patch_geometry(tmp_path):
    """timm's dinov2 ViTs are pretrained at 518 px (259 µm at 0.5 µm/px): hopt_st builds them for 224 px patches
    (112 µm), says so, and resamples a 518 px checkpoint's position embeddings when loading it."""
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    spec = models.get_spec("timm:vit_small_patch14_reg4_dinov2")  # (made once per process; logged then)
    assert spec.input_size == 224 and spec.timm_kwargs["img_size"] == 224
    assert "224 px patches at 0.5 µm/px (112 µm" in spec.notes and "518 px" in spec.notes
    enc = models.create(spec, pretrained=False)
    assert enc.backbone.patch_embed.img_size == (224, 224)
    native = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0)  # 518 px
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = models.create(spec, weights=tmp_path / "w.safetensors")
    expected = resample_abs_pos_embed(native.pos_embed.detach(), new_size=[16, 16], num_prefix_tokens=0)
    torch.testing.assert_close(loaded.backbone.pos_embed.detach(), expected)
