"""docs/api.md is executed: its python blocks run in order, in a fresh folder, on the bundled data."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
DATA = Path("../shared/data").resolve()


@pytest.mark.skipif(not (DATA / "ncbi858").exists(), reason="bundled data not found")
def test_api_doc_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    (tmp_path / "example.py").write_text("\n".join(blocks))
    env = dict(os.environ, DEEPSPOT_DATA_DIR=str(DATA), MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Model(deepspot" in r.stdout and "AnnData object" in r.stdout
    assert (tmp_path / "model" / "config.json").exists()
