"""Tests marked ``needs_data`` skip where the example data is missing, and fail in CI (see shared_data.py)."""
from shared_data import require_data


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_data(*names): needs these example files (fails in CI when missing)")


def pytest_runtest_setup(item):
    names = [n for m in item.iter_markers("needs_data") for n in m.args]
    if names:
        require_data(*names)
