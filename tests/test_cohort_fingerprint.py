"""Cohort outputs never mix runs (inference/cohort): a rerun with another model or mpp is refused, unless
a new folder (--new-run) or --overwrite is asked for."""
from __future__ import annotations

import pytest
from PIL import Image

from fixtures_hard_inputs import _checkpoint, _fresh_cache, _tiny_vit, _tissue, ck  # noqa: F401 (_fresh_cache: autouse)


def test_cohort_rerun_with_another_model_or_mpp_is_refused(ck, tmp_path):
    from deepspot.inference.cohort import RUN_FILE, run_cohort

    for i in range(2):
        Image.fromarray(_tissue(300, 300, seed=i)).save(tmp_path / f"s{i}.png")
    (tmp_path / "m.csv").write_text("path,id\ns0.png,a\ns1.png,b\n")
    other = _checkpoint(tmp_path / "other", seed=7)
    out = tmp_path / "out"
    kw = dict(backend="local", tissue="none", progress=False, echo=lambda *a, **k: None, device="cpu")
    s = run_cohort(tmp_path / "m.csv", ck, out, mpp=1.0, **kw)
    assert s.n_done == 2 and (out / RUN_FILE).exists()
    assert run_cohort(tmp_path / "m.csv", ck, out, mpp=1.0, **kw).ran == []  # same run: resumes
    with pytest.raises(ValueError, match=r"out: holds results of another run \(model weights sha256:"):
        run_cohort(tmp_path / "m.csv", other, out, mpp=1.0, **kw)
    with pytest.raises(ValueError, match=r"mpp of a, b \(a: 1.0 -> 2.0\)"):
        run_cohort(tmp_path / "m.csv", ck, out, mpp=2.0, **kw)
    first = (out / "a_spots.csv").read_bytes()
    s2 = run_cohort(tmp_path / "m.csv", other, out, mpp=1.0, new_run=True, **kw)
    assert s2.out_dir == tmp_path / "out-2" and s2.n_done == 2
    assert (out / "a_spots.csv").read_bytes() == first  # the first run untouched
    s3 = run_cohort(tmp_path / "m.csv", other, out, mpp=2.0, overwrite=True, **kw)
    assert s3.out_dir == out and len(s3.ran) == 2
    assert run_cohort(tmp_path / "m.csv", other, out, mpp=2.0, **kw).ran == []
