"""The command line's quick paths (help, usage errors, a missing file) import neither torch nor Lightning:
they would cost seconds before the first line is printed. Run in a fresh interpreter, so what other tests
imported does not count."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

PROBE = r"""
import contextlib, io, json, sys
from deepspot.cli import main

def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return {"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()}

results = [run(a) for a in json.loads(sys.argv[1])]
heavy = sorted(m for m in ("torch", "lightning", "timm", "anndata", "zarr", "scanpy") if m in sys.modules)
print(json.dumps({"results": results, "heavy": heavy}))
"""


def probe(argvs: list[list[str]]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_help_of_every_command_imports_no_torch():
    from deepspot.cli import _register, app

    _register()
    import typer.main

    names = sorted(typer.main.get_command(app).commands)
    assert {"predict", "train", "evaluate"} <= set(names)
    got = probe([["--help"]] + [[n, "--help"] for n in names])
    for r in got["results"]:
        assert r["code"] == 0, r
    assert "predict" in got["results"][0]["out"]  # the top-level help lists the commands
    assert "--batch-size" in next(r["out"] for r in got["results"] if r["argv"][0] == "evaluate")
    assert got["heavy"] == [], f"--help imported {got['heavy']}"


def test_error_paths_import_no_torch(tmp_path):
    missing = tmp_path / "missing.tif"
    got = probe([["predict", str(missing), "--model", str(tmp_path)], ["predict"], ["no-such-command"],
                 ["plot", str(tmp_path / "missing.h5ad")]])
    codes = [r["code"] for r in got["results"]]
    assert all(c not in (0, None) for c in codes), got["results"]
    first = got["results"][0]["err"].strip().splitlines()
    assert first == [f"deepspot: error: {missing}: file not found"]  # one line, classed as a user error
    assert got["heavy"] == [], f"an error path imported {got['heavy']}"
