"""Ctrl-C during predict (cli): exit code 130, one line, nothing written."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fixtures_hard_inputs import _checkpoint, _fresh_cache, _tiny_vit  # noqa: F401 (_fresh_cache: autouse)
from shared_data import HE, needs_data


@needs_data("ncbi858/NCBI858.jpg")
def test_sigint_during_predict_exits_130_and_writes_nothing(tmp_path):
    ck = _checkpoint(tmp_path / "model", encoder="efficientnet-lite0", dim=1280)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "deepspot", "predict", str(HE), "--model", str(ck), "--mpp", "0.25",
                          "--out", str(out), "--no-progress", "--num-workers", "0", "--tissue", "none"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None and not list(out.glob(".*.work-*")):
            time.sleep(0.05)  # the work folder appears when encoding starts
        assert p.poll() is None, p.communicate()
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "deepspot: interrupted; nothing written", err
    assert "Traceback" not in err
    assert not out.exists()  # the folder this run created is gone, with no partial file in it
