"""Property-based fuzzing of hopt_st's inputs (issue 10): bad images, bad coordinates, truncated files, random keys.

Every call either succeeds with a result checked against an independent computation, or raises one of the
package's documented exceptions: a built-in ``ValueError`` / ``TypeError`` / ``KeyError`` / ``IndexError`` /
``OSError`` (or hopt_st's own subclass, e.g. ``CorruptFileError``), never a crash, a raw third-party exception
(h5py, safetensors, tifffile, zarr, spatialdata, ...) or a changed file on disk. Derandomized (the same examples
on every run, no example database), so CI is deterministic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity

import hopt_st as hs
from hopt_st import models
from hopt_st._patchset import ArrayPatches
from hopt_st.io._store import NAME_RULE, check_name, sanitize_name, valid_name, write_table_in_place

FAST = "handcrafted-fuzz"
DOCUMENTED = (ValueError, TypeError, KeyError, IndexError, OSError)
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def specs_to_register(tiny_vit_spec):
    return [dataclasses.replace(models.get_spec("handcrafted"), name=FAST, input_size=56, mpp=2.0)]


pytestmark = pytest.mark.usefixtures("model_specs")


def _documented(e: BaseException, *, names: Path | None = None) -> None:
    """``e`` is a documented exception (built-in type or hopt_st's own), naming ``names`` when given."""
    kind = f"{type(e).__module__}.{type(e).__name__}"
    assert isinstance(e, DOCUMENTED), f"undocumented exception {kind}: {e}"
    assert type(e).__module__ == "builtins" or type(e).__module__.startswith("hopt_st"), f"raw {kind}: {e}"
    if names is not None:
        assert str(names) in str(e), f"{kind} does not name {names}: {e}"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# images: dtypes, channels, value ranges
# ----------------------------------------------------------------------------------------------------------
def _sdata(image: np.ndarray, xy: np.ndarray) -> SpatialData:
    """One (c, y, x) image and circle spots at ``xy`` (image pixels = spot units)."""
    n = len(xy)
    img = Image2DModel.parse(image, dims=("c", "y", "x"), transformations={"global": Identity()})
    shapes = ShapesModel.parse(
        np.asarray(xy, dtype=np.float64),
        geometry=0,
        radius=np.full(n, 2.0),
        index=np.arange(n),
        transformations={"global": Identity()},
    )
    obs = pd.DataFrame(
        {"region": pd.Categorical(["spots"] * n), "spot_id": np.arange(n)}, index=[f"s{i}" for i in range(n)]
    )
    table = TableModel.parse(
        ad.AnnData(np.zeros((n, 1), np.float32), obs=obs),
        region="spots",
        region_key="region",
        instance_key="spot_id",
    )
    return SpatialData(images={"he": img}, shapes={"spots": shapes}, tables={"table": table})


def _expected_rgb8(crop: np.ndarray) -> np.ndarray:
    """What a (c, h, w) crop must become: uint8 RGB (h, w, 3), from the dtype's documented value range."""
    c = crop.astype(np.float64)
    if crop.dtype == np.uint16:
        c = c if crop.max() <= 255 else np.floor((c + 128) / 257)
    elif crop.dtype.kind == "f":
        c = np.floor(np.clip(c, 0, 1) * 255 + 0.5)
    rgb = np.moveaxis(c, 0, -1)
    rgb = np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb[..., :3]
    return rgb.astype(np.uint8)


@st.composite
def images(draw):
    dtype = draw(st.sampled_from(["uint8", "uint16", "int16", "float32", "float64", "bool"]))
    channels = draw(st.sampled_from([1, 2, 3, 4, 5]))
    h, w = draw(st.integers(12, 40)), draw(st.integers(12, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    mode = draw(st.sampled_from(["random", "constant", "8bit", "nan", "above1"]))
    if dtype == "bool":
        a = rng.random((channels, h, w)) > 0.5
    elif dtype.startswith("float"):
        a = rng.random((channels, h, w)).astype(dtype)
        if mode == "nan":
            a[0, h // 2, w // 2] = np.nan
        elif mode == "above1":
            a *= 300
    else:
        hi = {"uint8": 256, "uint16": 256 if mode == "8bit" else 65536, "int16": 32768}[dtype]
        a = rng.integers(0, hi, (channels, h, w)).astype(dtype)
    if mode == "constant":
        a[...] = a.flat[0]
    return a


_RGB8 = np.random.default_rng(5).integers(0, 256, (3, 21, 30)).astype(np.uint8)


@settings(FUZZ, max_examples=60)
@given(image=images())
@example(image=_RGB8)  # always among the cases: the plain uint8 RGB image, which must give its patch
@example(image=_RGB8[:, :12, :12].copy())
def test_fuzz_image_dtypes_channels_and_value_ranges(image):
    _, h, w = image.shape
    cx, cy = w // 2, h // 2
    # the plain case, uint8 RGB with content (not one colour, which is refused as a placeholder), must work
    valid = image.dtype == np.uint8 and image.shape[0] == 3 and image.min() != image.max()
    try:
        sdata = _sdata(image, np.array([[float(cx), float(cy)]]))  # a pixel corner: window [c - 4, c + 4)
    except Exception:  # noqa: BLE001 - spatialdata refuses to build it: not an input hopt_st ever sees
        assert not valid, "spatialdata refused a valid uint8 RGB image"
        return
    try:
        got = hs.pp.patches(sdata, patch_size=8, target_mpp=1.0, image_mpp=1.0).to_numpy()
    except Exception as e:  # noqa: BLE001 - checked below
        if valid:
            raise AssertionError(f"a valid uint8 RGB image was refused: {e!r}") from e
        _documented(e)
        return
    # a window of exactly 8 px centred on the spot: the crop, converted from the dtype's value range
    np.testing.assert_array_equal(got[0], _expected_rgb8(image[:, cy - 4 : cy + 4, cx - 4 : cx + 4]))
    assert image.dtype.kind in "uf" and image.shape[0] in (1, 3, 4)


# ----------------------------------------------------------------------------------------------------------
# spot coordinates: NaN, inf, out of range, swapped axes
# ----------------------------------------------------------------------------------------------------------
_H, _W = 40, 64
_POSITION_IMAGE = np.stack(
    [
        np.broadcast_to(np.arange(_W), (_H, _W)),
        np.broadcast_to(np.arange(_H)[:, None], (_H, _W)),
        np.full((_H, _W), 7),
    ]
).astype(np.uint8)  # R = column, G = row: every pixel says where it is


@st.composite
def coordinates(draw):
    n = draw(st.integers(1, 4))
    kinds = draw(
        st.lists(st.sampled_from(["inside", "edge", "outside", "nan", "inf"]), min_size=n, max_size=n)
    )
    xy = []
    for kind in kinds:
        x, y = draw(st.floats(0, _W - 1)), draw(st.floats(0, _H - 1))
        if kind == "edge":
            x = draw(st.sampled_from([0.0, _W - 0.5]))
        elif kind == "outside":
            x = draw(st.sampled_from([-100.0, _W + 100.0, 1e9]))
        elif kind == "nan":
            y = np.nan
        elif kind == "inf":
            x = -np.inf
        xy.append([x, y])
    xy = np.array(xy)
    return xy[:, ::-1].copy() if draw(st.booleans()) else xy  # swapped (y, x)


def _expected_window(x: float, y: float, size: int = 8, fill: int = 255) -> np.ndarray:
    """The documented window: the ``size`` px whose centre is nearest the spot, ``fill`` outside the image."""
    x0, y0 = int(np.floor(x - size / 2 + 0.5)), int(np.floor(y - size / 2 + 0.5))
    rgb = np.moveaxis(_POSITION_IMAGE, 0, -1)
    out = np.full((size, size, 3), fill, np.uint8)
    ys, xs = slice(max(y0, 0), min(y0 + size, _H)), slice(max(x0, 0), min(x0 + size, _W))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = rgb[ys, xs]
    return out


@settings(FUZZ, max_examples=60)
@given(xy=coordinates(), outside=st.sampled_from(["raise", "drop", "keep"]))
def test_fuzz_spot_coordinates(xy, outside):
    try:
        sdata = _sdata(_POSITION_IMAGE, xy)
    except Exception:  # noqa: BLE001 - spatialdata refuses to build it
        return
    try:
        p = hs.pp.patches(sdata, patch_size=8, target_mpp=1.0, image_mpp=1.0, outside=outside)
        got = p.to_numpy()
    except Exception as e:  # noqa: BLE001 - checked below
        _documented(e)
        assert not np.isfinite(xy).all() or outside == "raise" or len(xy) == 0, e
        return
    assert np.isfinite(xy).all()  # NaN / inf never yield patches
    kept = [
        i for i, (x, y) in enumerate(xy) if outside != "drop" or _expected_window(x, y)[..., 2].min() < 255
    ]
    assert len(got) == len(kept)
    for k, i in enumerate(kept):
        np.testing.assert_array_equal(got[k], _expected_window(*xy[i]))


# ----------------------------------------------------------------------------------------------------------
# truncated files at random offsets
# ----------------------------------------------------------------------------------------------------------
def _read_patch_file(path):
    return hs.io.read_patches(path).to_numpy()


def _read_regressor(path):
    return hs.tl.ExpressionRegressor.load(path).linear_.coef


def _read_weights(path):
    from hopt_st.models._weights import read_state_dict

    return {k: v.numpy() for k, v in read_state_dict(path).items()}


def _read_tiff(path):
    from hopt_st.io._elements import image_levels
    from hopt_st.io._tiff import read_tiff_image
    from hopt_st.pp._image_reader import LevelReader

    level = image_levels(read_tiff_image(path))[0]
    return LevelReader(level, name="he").read_windows(
        np.array([[0, 0], [200, 200]]), (64, 64), np.zeros(3, np.uint8)
    )


def _read_checkpoint_batch(path):
    from hopt_st.pp._checkpoint import CheckpointStore

    out, done = np.zeros((10, 4), np.float32), np.zeros(10, bool)
    with CheckpointStore(path.parent, "fp", 10, 4, {}) as store:
        store.load(out, done)
    return out


def _read_manifest(path):
    from hopt_st.pp._checkpoint import CheckpointStore

    with CheckpointStore(path.parent, "fp", 10, 4, {}):
        return True


def _read_scalefactors(path):
    from hopt_st.io._visium import _check_folder

    return _check_folder(path.parents[1], "filtered_feature_bc_matrix.h5")[1]


def _read_h5ad(path):
    from hopt_st.io._counts import read_h5ad

    return read_h5ad(path).X.toarray()


def _in_checkpoint_dir(name: str):
    def place(folder: Path, data: bytes) -> Path:
        if name == "emb_000000000.npz":  # a batch file needs its run's manifest
            manifest = {"fingerprint": "fp", "n": 10, "dim": 4, "info": {}}
            (folder / "manifest.json").write_text(json.dumps(manifest))
        (folder / name).write_bytes(data)
        return folder / name

    return place


def _in_space_ranger_outs(folder: Path, data: bytes) -> Path:
    (folder / "spatial").mkdir()
    (folder / "filtered_feature_bc_matrix.h5").write_bytes(b"")
    (folder / "spatial" / "tissue_positions.csv").write_bytes(b"")
    (folder / "spatial" / "scalefactors_json.json").write_bytes(data)
    return folder / "spatial" / "scalefactors_json.json"


def _as_file(name: str):
    def place(folder: Path, data: bytes) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return place


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """Every kind of file hopt_st reads: (its bytes, where it goes, its reader, what the whole file reads as)."""
    import torch
    from safetensors.torch import save_file
    from scipy import sparse

    root = tmp_path_factory.mktemp("originals")
    rng = np.random.default_rng(0)
    p = ArrayPatches(
        rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8), 0.5, None, rng.random((6, 2)) * 99, 16.0
    )
    p.to_h5(root / "patches.h5")
    x = rng.normal(size=(30, 4))
    hs.tl.ExpressionRegressor().fit(x, x[:, :2]).save(root / "reg.safetensors")
    save_file({"a.weight": torch.randn(8, 8), "b.bias": torch.randn(8)}, str(root / "weights.safetensors"))
    y, xx = np.mgrid[0:512, 0:512] / 512
    tissue = np.stack(
        [128 + 90 * np.sin(9 * xx), 128 + 90 * np.cos(7 * y), 128 + 60 * np.sin(13 * xx * y)], -1
    )
    hs.datasets.write_pyramidal_tiff(root / "wsi.tif", tissue.astype(np.uint8), mpp=0.5, n_levels=2, tile=128)
    np.savez(root / "batch.npz", idx=np.arange(5), emb=rng.normal(size=(5, 4)).astype(np.float32))
    (root / "manifest.json").write_text(json.dumps({"fingerprint": "fp", "n": 10, "dim": 4, "info": {}}))
    (root / "scalefactors.json").write_text(
        json.dumps({"spot_diameter_fullres": 89.4, "tissue_hires_scalef": 0.15})
    )
    ad.AnnData(sparse.csr_matrix(rng.poisson(2, (20, 5)).astype(np.float32))).write_h5ad(root / "counts.h5ad")
    kinds = {
        "patches.h5": (_as_file("p.h5"), _read_patch_file),
        "reg.safetensors": (_as_file("reg.safetensors"), _read_regressor),
        "weights.safetensors": (_as_file("w.safetensors"), _read_weights),
        "wsi.tif": (_as_file("wsi.tif"), _read_tiff),
        "batch.npz": (_in_checkpoint_dir("emb_000000000.npz"), _read_checkpoint_batch),
        "manifest.json": (_in_checkpoint_dir("manifest.json"), _read_manifest),
        "scalefactors.json": (_in_space_ranger_outs, _read_scalefactors),
        "counts.h5ad": (_as_file("counts.h5ad"), _read_h5ad),
    }
    counter = itertools.count()
    out = {}
    for name, (place, read) in kinds.items():
        data = (root / name).read_bytes()
        folder = root / f"whole{next(counter)}"
        folder.mkdir()
        out[name] = (data, place, read, read(place(folder, data)))
    return root, out, counter


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return np.array_equal(np.asarray(a), np.asarray(b))


@settings(FUZZ, max_examples=200)
@given(
    kind=st.sampled_from(
        [
            "patches.h5",
            "reg.safetensors",
            "weights.safetensors",
            "wsi.tif",
            "batch.npz",
            "manifest.json",
            "scalefactors.json",
            "counts.h5ad",
        ]
    ),
    fraction=st.floats(0, 1, exclude_max=True),
)
def test_fuzz_truncated_files(originals, kind, fraction):
    root, kinds, counter = originals
    data, place, read, whole = kinds[kind]
    folder = root / f"cut{next(counter)}"
    folder.mkdir()
    path = place(folder, data[: int(len(data) * fraction)])
    before = _sha(path)
    try:
        got = read(path)
    except Exception as e:  # noqa: BLE001 - checked below
        _documented(e, names=path)
    else:  # a truncation that loses nothing read must give what the whole file gives
        assert _same(got, whole), f"{kind} cut at {fraction:.3f} read without error but differently"
    assert _sha(path) == before  # reading never changes the file


# ----------------------------------------------------------------------------------------------------------
# random keys
# ----------------------------------------------------------------------------------------------------------
_TEXT = st.text(alphabet=st.sampled_from(list("aZ09_-.:/ é\\*")), max_size=12)
_KEYS = st.one_of(
    _TEXT, _TEXT.map(lambda k: "__" + k), st.sampled_from(["", ".", "..", "X_timm:vit", "my emb"])
)


@settings(FUZZ, max_examples=200)
@given(key=_KEYS)
def test_fuzz_keys_follow_the_store_rule(key):
    from spatialdata._core.validation import check_valid_name

    try:
        check_valid_name(key)
        theirs = True
    except ValueError:
        theirs = False
    assert valid_name(key) == theirs  # our rule is spatialdata's (what the store accepts)
    assert valid_name(sanitize_name(key))
    if theirs:
        assert check_name(key, "key_added") == key
    else:
        with pytest.raises(ValueError, match="not a valid key") as e:
            check_name(key, "key_added")
        assert NAME_RULE in str(e.value)


@pytest.fixture(scope="module")
def backed_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    hs.datasets.synthetic_visium(n_spots=20, seed=0, n_genes=10).write(path)
    return path


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@settings(FUZZ, max_examples=10)
@given(key=_KEYS)
def test_fuzz_keys_in_place_write_is_all_or_nothing(backed_store, key):
    """A random obsm key, set behind pp.embed's back: the in-place write stores it or leaves the store as it was."""
    before = _tree(backed_store)
    sdata = sd.read_zarr(backed_store)
    table = sdata["table"]
    if not valid_name(key):  # pp.embed refuses it before any work (a valid key would be embedded: slow here)
        with pytest.raises(ValueError, match="key_added"):
            hs.pp.embed(sdata, FAST, key_added=key, progress=False)
    acceptable = valid_name(key) and key.lower() not in {k.lower() for k in table.obsm if k != key}
    table.obsm[key] = np.arange(table.n_obs * 2, dtype=np.float32).reshape(-1, 2)
    try:
        write_table_in_place(sdata, "table")
    except Exception as e:  # noqa: BLE001 - checked below
        _documented(e, names=backed_store)
        assert not acceptable, e
        assert _tree(backed_store) == before
        return
    assert acceptable
    np.testing.assert_array_equal(sd.read_zarr(backed_store)["table"].obsm[key], table.obsm[key])
