"""Tests marked ``needs_data`` skip where the example data is missing, and fail in CI (see shared_data.py).

Tests marked ``needs_extra(extra, ...)`` need an optional extra of the package (``pip install
'deepspot[extra]'``): they skip where it is not installed, and fail in CI, where the core-only run
deselects them with ``-m "not needs_extra"``.

No test leaves an encoder in the global registry: a module that registers one at import fails to collect
(register it in a fixture: fixtures_cli.encoder_registered / tiny_vit_encoder, or the ``temp_encoder``
fixture), and the registry is put back as it was after every test module.
"""
import importlib.util

import pytest

from shared_data import in_ci, require_data

# the modules each extra installs (pyproject.toml [project.optional-dependencies]); "test": the test-only ones
EXTRA_MODULES = {"cohort": ("ray",), "hf": ("transformers",), "spatialdata": ("spatialdata", "spatialdata_plot"),
                 "bench": ("psutil",), "test": ("squidpy",)}


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_data(*names): needs these example files (fails in CI when missing)")
    config.addinivalue_line("markers", "needs_extra(*extras): needs these optional extras (see EXTRA_MODULES in "
                                       "tests/conftest.py); deselect with -m 'not needs_extra'")


def missing_extras(*extras: str) -> list[str]:
    return [e for e in extras for m in EXTRA_MODULES[e] if importlib.util.find_spec(m) is None]


def pytest_runtest_setup(item):
    names = [n for m in item.iter_markers("needs_data") for n in m.args]
    if names:
        require_data(*names)
    gone = missing_extras(*(e for m in item.iter_markers("needs_extra") for e in m.args))
    if gone:
        msg = f"needs pip install 'deepspot[{','.join(sorted(set(gone)))}]'"
        if in_ci():
            pytest.fail(msg + "; in CI that is a failure, not a skip (the core-only run deselects it)", pytrace=False)
        pytest.skip(msg)


def _registry() -> dict:
    from deepspot.features.encoders.registry import _REGISTRY

    return _REGISTRY


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    before = dict(_registry()) if isinstance(collector, pytest.Module) else None
    report = yield
    if before is not None and dict(_registry()) != before:
        added = sorted(set(_registry()) - set(before)) or sorted(_registry())
        _registry().clear()
        _registry().update(before)
        report.outcome = "failed"
        report.longrepr = (f"{collector.path.name} changes the encoder registry at import ({', '.join(added)}): "
                           f"register test encoders in a fixture that unregisters them "
                           f"(fixtures_cli.encoder_registered, tiny_vit_encoder, or the temp_encoder fixture)")
    return report


@pytest.fixture(scope="module", autouse=True)
def _encoder_registry_restored():
    """Whatever a module's tests register, the next module sees the registry as it was."""
    before = dict(_registry())
    yield
    if dict(_registry()) != before:
        _registry().clear()
        _registry().update(before)


@pytest.fixture
def temp_encoder():
    """``temp_encoder(spec)`` registers a test encoder for this test only (unregistered at its end)."""
    from fixtures_cli import encoder_registered
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield lambda spec: stack.enter_context(encoder_registered(spec))[0]


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """No weights dir, an empty HF cache and an empty torch hub dir (the encoder tests' missing-weights case)."""
    from deepspot.features import encoders as E

    monkeypatch.delenv(E.WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path
