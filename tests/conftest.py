"""Shared, session-scoped fixtures (small and fast; built once per test session).

- ``synthetic_sdata``: ``hopt_st.datasets.synthetic_visium(n_spots=150, seed=0, n_genes=60)`` at 0.5 µm/px.
  Treat it as read-only (use ``copy.deepcopy`` / build your own to modify).
- ``hest_bench_root``: a HEST-Benchmark root written by ``write_hest_layout(layout="bench")``: task
  ``"SYNTH"``, 3 samples / 3 patients / 3 folds, 100 spots and 60 genes each. The fixture value is the
  ``dict`` returned by the writer (``["root"]``, ``["task"]``, ``["sample_ids"]``, ``["genes"]``, ...).
- ``hest1k_root``: a HEST-1k folder with 2 Visium samples and 1 Xenium-like sample (zlib tiles, lossless);
  the writer's ``dict``.
- ``shared_data``: ``Path`` of ``../shared/data`` (may not exist: skip when needed).

Encoder registry (never changed at import time; every registration is undone at teardown):

- ``tiny_vit_spec``: a function ``(name="tiny-vit", pooling="token", *, embed_dim=64, **fields) -> ModelSpec``
  of a tiny random ViT of H-optimus-1's family (``vit_small_patch14_reg4_dinov2``: 4 registers, layer
  scale; 56 px input, depth 2, 2 heads) at 2 µm/px with H-optimus normalisation. Not registered.
- ``model_specs``: registers, for one test module, the specs returned by the module's
  ``specs_to_register(tiny_vit_spec)`` and unregisters them after its last test; use it with
  ``pytestmark = pytest.mark.usefixtures("model_specs")``. Its value is ``{name: spec}``.
- ``register_spec``: a function ``(*specs, overwrite=False)`` that registers specs for one test.
- ``encoder`` / ``weights`` (module scope): that tiny ViT built with random weights, and its weights as a
  ``.safetensors`` file (for the CLI's ``--weights``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ------------------------------------------------------------------------------------------------------------
# nothing left in the system temp folder: pytest's tmp_path folders and every temporary file of this process and
# its children (notebook kernels, benchmark subprocesses, torch's inductor cache folder, dask's scratch space)
# live in this session's base folder, removed when the session passes (kept for inspection when it fails)
# ------------------------------------------------------------------------------------------------------------
@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    import tempfile

    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None or config.option.basetemp:  # --basetemp: the user's folder, left as pytest leaves it
        return
    base = factory.getbasetemp()
    scratch = base / "system_tmp"
    scratch.mkdir(exist_ok=True)
    config.stash[_SCRATCH] = (base, tempfile.tempdir, os.environ.get("TMPDIR"))
    os.environ["TMPDIR"] = tempfile.tempdir = str(scratch)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    import shutil
    import tempfile

    state = session.config.stash.get(_SCRATCH, None)
    if state is None:
        return
    base, old_tempdir, old_env = state
    tempfile.tempdir = old_tempdir
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env
    if exitstatus != 0:
        return
    shutil.rmtree(base, ignore_errors=True)
    current = base.parent / f"{base.name.rsplit('-', 1)[0]}-current"
    with contextlib.suppress(OSError):
        if current.is_symlink() and not current.exists():  # pointed at the folder just removed
            current.unlink()
    with contextlib.suppress(OSError):
        base.parent.rmdir()  # only when no other session's folder is in it


_SCRATCH = pytest.StashKey[tuple]()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_sdata():
    from hopt_st.datasets import synthetic_visium

    return synthetic_visium(n_spots=150, image_mpp=0.5, seed=0, n_genes=60)


@pytest.fixture(scope="session")
def hest_bench_root(tmp_path_factory):
    from hopt_st.datasets import write_hest_layout

    root = tmp_path_factory.mktemp("hest_bench")
    return write_hest_layout(root, layout="bench", task="SYNTH", n_samples=3, n_spots=100, n_genes=60, seed=0)


@pytest.fixture(scope="session")
def hest1k_root(tmp_path_factory):
    from hopt_st.datasets import write_hest_layout

    root = tmp_path_factory.mktemp("hest1k")
    return write_hest_layout(
        root, layout="hest1k", n_samples=2, n_spots=80, n_genes=40, xenium=True, compression="zlib", seed=3
    )


def _tiny_vit_spec(name: str = "tiny-vit", pooling: str = "token", *, embed_dim: int = 64, **fields):
    from hopt_st.models import ModelSpec
    from hopt_st.models._spec import HOPTIMUS_MEAN, HOPTIMUS_STD

    return ModelSpec(
        name=name,
        dim=embed_dim if pooling == "token" else 2 * embed_dim,
        input_size=56,
        mpp=2.0,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        timm_name="vit_small_patch14_reg4_dinov2",
        timm_kwargs=dict(
            img_size=56,
            embed_dim=embed_dim,
            depth=2,
            num_heads=2,
            init_values=1e-5,
            num_classes=0,
            dynamic_img_size=False,
        ),
        pooling=pooling,
        **fields,
    )


@pytest.fixture(scope="session")
def tiny_vit_spec():
    return _tiny_vit_spec


@pytest.fixture(scope="module")
def encoder(tiny_vit_spec):
    """A tiny random ViT (56 px patches at 2 µm/px): fast, and what it embeds is all that matters here."""
    import hopt_st as hs

    return hs.models.create(tiny_vit_spec(), pretrained=False)


@pytest.fixture(scope="module")
def weights(encoder, tmp_path_factory):
    """The tiny ViT's random weights as a file, for the CLI (``--weights``)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.backbone.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def model_specs(request, tiny_vit_spec):
    from hopt_st import models

    make = getattr(request.module, "specs_to_register", None)
    if make is None:
        raise RuntimeError(f"{request.module.__name__} uses model_specs but defines no specs_to_register().")
    specs = list(make(tiny_vit_spec))
    with models.registered(*specs):
        yield {spec.name: spec for spec in specs}


@pytest.fixture
def register_spec():
    from hopt_st import models

    with contextlib.ExitStack() as stack:

        def register(*specs, overwrite=False):
            return stack.enter_context(models.registered(*specs, overwrite=overwrite))

        yield register


@pytest.fixture
def cli_process_state():
    """``hopt_st._cli.main`` configures logging and ``TQDM_DISABLE`` for its process: undo it after a test (and
    first drop a handler an earlier ``main()`` left on a stream pytest has since closed)."""
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_hopt_st", False)]
    handlers, level = list(root.handlers), root.level
    tqdm_env = os.environ.get("TQDM_DISABLE")
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    if tqdm_env is None:
        os.environ.pop("TQDM_DISABLE", None)
    else:
        os.environ["TQDM_DISABLE"] = tqdm_env
