"""The package imports in any order, and reading data does not pull in torch."""

import inspect
import subprocess
import sys

import pytest

import hopt_st

SUBPACKAGES = ["bench", "datasets", "io", "models", "pl", "pp", "tl"]


@pytest.mark.parametrize("sub", [*SUBPACKAGES, "pp._embed", "_patchset"])
def test_each_module_imports_first_in_a_fresh_process(sub):
    # an import cycle (e.g. io <-> pp) only shows when that module is the first one imported
    r = subprocess.run([sys.executable, "-c", f"import hopt_st.{sub}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_reading_does_not_import_torch():
    code = (
        "import sys, hopt_st as hs; hs.io.read_hest; hs.io.read_visium; hs.datasets.synthetic_visium; "
        "hs.pp.patches; assert 'torch' not in sys.modules, 'torch imported'; "
        "hs.pp.embed; assert 'torch' in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_public_api_is_reexported():
    assert sorted(n for n in hopt_st.__all__ if n != "__version__") == SUBPACKAGES
    for sub in SUBPACKAGES:
        module = getattr(hopt_st, sub)
        for name in module.__all__:
            obj = getattr(module, name)
            assert callable(obj) or inspect.ismodule(obj), f"hopt_st.{sub}.{name}"
    with pytest.raises(AttributeError):
        hopt_st.utils  # noqa: B018
