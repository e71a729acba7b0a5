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


WEIGHTS_DOC = Path(__file__).resolve().parents[1] / "docs" / "weights.md"
# the placeholder file names of docs/weights.md's conversion examples -> the checkpoints the original code wrote
DOC_FILES = {"MODEL.pkl": "deepspot_spot_subspot_neighbors.pkl", "DEEPCELL.pkl": "deepcell_cell_neighbors.pkl",
             "deepspot2cell_final_model.pt": "deepspot2cell_final_model.pt", "GENES.txt": "genes.txt",
             "S2C_GENES.txt": "deepspot2cell_genes.txt",
             "CELL_GENES.txt": "deepcell_genes.txt", "info_highly_variable_genes.csv": "info_highly_variable_genes.csv"}


def test_weights_doc_convert_examples_run(tmp_path, monkeypatch, capsys):
    """docs/weights.md's conversion examples (its sections from "Published models" on), run on the reference
    checkpoints (32-d features): each
    ``deepspot convert-weights`` line as written must get as far as the encoder check (the reference models
    are 32-d, not the documented encoder's), then runs with ``--feature-dim 32`` in place of ``--encoder``;
    the Python blocks then run as written on what was converted."""
    import shlex

    import numpy as np

    from deepspot.cli import main
    from shared_data import reference_dir

    ref = reference_dir("original-checkpoints")
    section = WEIGHTS_DOC.read_text().split("## Published models", 1)[1]
    commands = [ln.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for ln in block.splitlines() if ln.strip().startswith("deepspot convert-weights")]
    pythons = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(commands) == 4 and len(pythons) == 2
    for name, target in DOC_FILES.items():
        (tmp_path / name).symlink_to(ref / target)
    monkeypatch.chdir(tmp_path)

    def run(argv):
        try:
            main(argv)
        except SystemExit as e:
            return e.code or 0, capsys.readouterr().err
        return 0, capsys.readouterr().err

    for cmd in commands:
        argv = shlex.split(cmd)[1:]
        code, err = run(argv)
        assert code == 1 and "the model takes 32-d features but encoder 'uni' gives 1024-d" in err, (cmd, err)
        i = argv.index("--encoder")
        code, err = run(argv[:i] + ["--feature-dim", "32"] + argv[i + 2:])
        assert code == 0, (cmd, err)
    assert {p.name for p in (tmp_path / "converted").iterdir()} == {"MODEL", "DEEPCELL", "S2C"}
    convert_line = next(ln for ln in pythons[0].splitlines() if "convert_checkpoint(" in ln)
    assert 'encoder="uni"' in convert_line
    exec(pythons[0].replace(convert_line, convert_line.replace('encoder="uni"', "feature_dim=32")
                            .replace('"converted/MODEL"', '"converted/py"')), {})
    assert (tmp_path / "converted" / "py" / "config.json").exists()
    exec(pythons[1], {})
    shapes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("(")]
    assert shapes == ["(4, 12)", "(4, 12)", "(4, 10)", "(4, 8)", "(4, 8)"]
    import deepspot as ds

    m = ds.load_model("converted/MODEL")
    inputs = np.load(ref / "inputs.npz")
    want = np.load(ref / "deepspot_spot_subspot_neighbors.expected.npz")["inverse"]
    got = m.predict_features(inputs["spot"], inputs["subspot"], inputs["spot"][inputs["neighbor_index"]],
                             inputs["neighbor_mask"])
    np.testing.assert_allclose(got, want, atol=1e-5)
