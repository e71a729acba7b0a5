"""Dependencies: the core install holds what the core commands import; a command that needs a missing
extra names the extra to install (the import is made to fail here)."""
import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import numpy as np
import pytest
import torch

import deepspot
from deepspot.extras import MissingExtra

ROOT = Path(deepspot.__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
pytestmark = pytest.mark.skipif(not PYPROJECT.is_file(), reason="needs the source checkout (pyproject.toml)")
EXTRAS = ("ray", "transformers", "squidpy", "leidenalg", "psutil", "spatialdata")  # not in the core install
OPTIONAL_WITH_FALLBACK = {"tensorboard"}  # imported only to decide whether to offer a logger


def _project():
    return tomllib.loads(PYPROJECT.read_text())["project"]


def _names(reqs):
    return {re.split(r"[ <>=!~\[;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def _cli(capsys, *args):
    from deepspot.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def test_heavy_packages_are_extras_not_core():
    p = _project()
    core, extras = _names(p["dependencies"]), p["optional-dependencies"]
    assert not core & {"squidpy", "ray", "transformers", "leidenalg", "psutil", "spatialdata"}
    assert {"huggingface-hub", "pyarrow", "pooch", "igraph"} <= core
    assert _names(extras["cohort"]) == {"ray"} and _names(extras["hf"]) == {"transformers"}
    assert _names(extras["spatialdata"]) == {"spatialdata", "spatialdata-plot"} and _names(extras["bench"]) == {"psutil"}
    assert _names(extras["test-core"]) == {"pytest", "pytest-timeout", "hypothesis"}  # the core-only test run
    assert "squidpy" in _names(extras["test"])
    # spatialdata-plot: a test plots a SpatialData
    assert "deepspot[test-core,cohort,hf,spatialdata]" in extras["test"]


def test_every_import_in_the_package_is_declared():
    p = _project()
    declared = _names(p["dependencies"]) | set().union(*(_names(v) for v in p["optional-dependencies"].values()))
    dists = {k: {d.lower().replace("_", "-") for d in v} for k, v in packages_distributions().items()}
    top = set()
    for f in (ROOT / "src" / "deepspot").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top.add(node.module.split(".")[0])
    third = {m for m in top - set(sys.stdlib_module_names) - {"deepspot", "__future__"} - OPTIONAL_WITH_FALLBACK}
    # a module not installed here (an extra, in the core-only run) is looked up by its own name
    undeclared = {m: dists.get(m) for m in third if not (dists.get(m, {m.lower().replace("_", "-")}) & declared)}
    assert undeclared == {}


def test_predict_cohort_on_ray_without_ray_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code, err = _cli(capsys, "predict-cohort", tmp_path / "slides.csv", "--model", tmp_path / "m",
                     "--out", tmp_path / "out")
    assert code == 1
    assert err.strip() == ("deepspot: error: predict-cohort --backend ray needs ray: "
                           "pip install 'deepspot[cohort]' (or use --backend local)")
    assert not (tmp_path / "out").exists()


def test_predict_cohort_spatialdata_without_it_names_the_extra(tmp_path, monkeypatch, capsys):
    """The one rule of a format's extra (config.output_names.FORMAT_EXTRAS, inference.predict_plan.require_format)
    serves the cohort as it serves predict; h5ad needs none."""
    from deepspot.config.output_names import FORMAT_EXTRAS, PREDICTION_FORMATS
    from deepspot.inference.predict_plan import require_format

    assert set(FORMAT_EXTRAS) < set(PREDICTION_FORMATS)
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # import spatialdata -> ImportError
    require_format("h5ad")
    code, err = _cli(capsys, "predict-cohort", tmp_path / "slides.csv", "--model", tmp_path / "m",
                     "--out", tmp_path / "out", "--backend", "local", "--format", "spatialdata")
    assert code == 1
    assert err.strip() == ("deepspot: error: predict-cohort --format spatialdata needs spatialdata: "
                           "pip install 'deepspot[spatialdata]'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["phikon", "phikon-v2"])
def test_phikon_without_transformers_names_the_extra(name, tmp_path, monkeypatch):
    from deepspot.features.encoders import load_encoder

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtra, match=r"^the Phikon encoders needs transformers: pip install 'deepspot\[hf\]'$"):
        load_encoder(name)
    with pytest.raises(MissingExtra, match=r"deepspot\[hf\]"):
        load_encoder(name, random_init=True)


@pytest.mark.parametrize("name", ["uni", "hoptimus0", "uni2-h", "virchow2", "hoptimus1", "h0-mini", "gigapath",
                                  "resnet50", "inception-v3", "densenet121"])
def test_timm_and_torchvision_encoders_need_no_extra(name, tmp_path, monkeypatch):
    """UNI, H-optimus-0 (timm) and the torchvision CNNs once demanded the [hf] extra (transformers) before
    looking for their weights; they need only the core install."""
    from deepspot.features.encoders import EncoderError, load_encoder

    monkeypatch.setitem(sys.modules, "transformers", None)
    bad = tmp_path / "pytorch_model.bin"
    torch.save({"foo.weight": torch.zeros(2)}, bad)
    with pytest.raises(EncoderError, match=f"does not fit encoder '{name}'"):  # got as far as the weights
        load_encoder(name, weights=bad)


def test_leiden_runs_without_leidenalg(monkeypatch):
    from deepspot.training.oversampling import leiden_clusters

    monkeypatch.setitem(sys.modules, "leidenalg", None)
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.normal(0, 1, (40, 20)), rng.normal(6, 1, (40, 20))]).astype(np.float32)
    labels = leiden_clusters(y, n_pcs=5, n_neighbors=8, resolution=0.3, seed=1)
    assert len(set(labels[:40])) == 1 and len(set(labels[40:])) == 1 and labels[0] != labels[-1]


def test_every_module_imports_without_the_extras():
    import subprocess

    code = (f"EXTRAS = {EXTRAS!r}\n"
            "import sys, pkgutil, importlib, deepspot\n"
            "class Gone:  # as if not installed: find_spec and import both fail\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in EXTRAS:\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Gone())\n"
            "import importlib.metadata as md\n"
            "real = md.version\n"
            "def version(name):  # installed-package checks (lightning's) see them missing too\n"
            "    if name.lower() in EXTRAS:\n"
            "        raise md.PackageNotFoundError(name)\n"
            "    return real(name)\n"
            "md.version = version\n"
            "for info in pkgutil.walk_packages(deepspot.__path__, 'deepspot.'):\n"
            "    importlib.import_module(info.name)\n"
            "from deepspot.cli import main\n"
            "main(['--help'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "predict-cohort" in r.stdout and "demo" in r.stdout
