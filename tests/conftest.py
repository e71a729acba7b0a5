"""Tests marked ``needs_data`` skip where the example data is missing, and fail in CI (see shared_data.py)."""
import pytest

from shared_data import in_ci, missing


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_data(*names): needs these example files (fails in CI when missing)")


def pytest_runtest_setup(item):
    names = [n for m in item.iter_markers("needs_data") for n in m.args]
    gone = missing(*names) if names else []
    if gone:
        msg = (f"example data not found: {', '.join(gone)} (looked in --data-dir/$DEEPSPOT_DATA_DIR, the checkout's "
               f"shared/data and the user cache)")
        if in_ci():
            pytest.fail(msg + "; in CI that is a failure, not a skip", pytrace=False)
        pytest.skip(msg)
