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
    """Each subpackage exposes exactly its ``__all__``; every name there is hopt_st's own, documented object."""
    assert sorted(n for n in hopt_st.__all__ if n != "__version__") == SUBPACKAGES
    for sub in SUBPACKAGES:
        module = getattr(hopt_st, sub)
        public = {n for n in dir(module) if not n.startswith("_") and n != "annotations"}
        assert public == set(module.__all__), f"hopt_st.{sub}: public names outside __all__ or missing"
        for name in module.__all__:
            obj = getattr(module, name)
            home = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", "")
            assert home.startswith(f"hopt_st.{sub}") or home.startswith("hopt_st._"), (
                f"hopt_st.{sub}.{name}: {home}"
            )
            assert inspect.getdoc(obj), f"hopt_st.{sub}.{name} has no docstring"
    with pytest.raises(AttributeError):
        hopt_st.utils  # noqa: B018


def test_tl_linear_has_a_small_public_surface():
    from hopt_st.tl import linear

    own = {n for n, v in vars(linear).items() if getattr(v, "__module__", None) == linear.__name__}
    assert {n for n in own if not n.startswith("_")} == set(linear.__all__)
    assert set(linear.__all__) == {"LinearMap", "fit_ridge_cv", "hest_probe"}


def test_one_hest_probe_default_everywhere():
    """HEST's own operations ("exact") are the default of every entry point; "fast" is opt-in, "sklearn" gone."""
    import click

    from hopt_st._cli import bench as bench_command

    defaults = [
        inspect.signature(hopt_st.tl.linear.hest_probe).parameters["solver"].default,
        inspect.signature(hopt_st.bench.run).parameters["solver"].default,
        hopt_st.tl.ExpressionRegressor("ridge-hest").solver,
    ]
    (option,) = [p for p in bench_command.params if p.name == "solver"]
    assert defaults == ["exact"] * 3 and option.default == "exact"
    assert isinstance(option.type, click.Choice) and list(option.type.choices) == ["exact", "fast"]
    with pytest.raises(ValueError, match="must be 'exact' or 'fast'"):
        hopt_st.tl.ExpressionRegressor("ridge-hest", solver="sklearn").fit([[0.0], [1.0]], [0.0, 1.0])
