"""Feature stores shared by several jobs: each writer its own temporary folder, a half-written store
never read as finished."""
import stat

import numpy as np

from deepspot.features.store import FeatureWriter, load_features, open_store


def _fill(w, n, value):
    w.write(0, np.full((n, 2), value, float), np.full((n, 4), value, np.float32), np.full((n, 1, 4), value, np.float32))


def test_two_jobs_writing_one_store_leave_one_whole_store(tmp_path):
    path = tmp_path / "s.zarr"
    a = FeatureWriter(path, 5, 4, 1, {"encoder": "x"})
    b = FeatureWriter(path, 5, 4, 1, {"encoder": "x"})  # started before a finished: must not clobber a
    assert a.tmp != b.tmp
    _fill(a, 5, 1.0)
    _fill(b, 5, 2.0)
    a.close()
    assert load_features(path).spot[0, 0] == 1.0
    b.close()
    f = load_features(path)
    assert f.spot.shape == (5, 4) and f.spot[0, 0] == 2.0 and f.subspot.shape == (5, 1, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # no temporary folder left
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


def test_a_store_marked_complete_without_its_arrays_is_not_finished(tmp_path):
    import shutil

    path = tmp_path / "s.zarr"
    w = FeatureWriter(path, 3, 4, 0, {"encoder": "x"})
    w.write(0, np.zeros((3, 2)), np.zeros((3, 4), np.float32), None)
    w.close()
    assert open_store(path) is not None
    shutil.rmtree(path / "centers")
    assert open_store(path) is None  # encoded again rather than failing with a KeyError
