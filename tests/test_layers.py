"""The package's layers, lowest first: a module imports only from its own layer's lower rungs or below.

config, metrics → io, geometry, plotting → features → models, reliability → training, inference, convert → evaluation →
api → demo (it shows the public API) → cli. (convert is only the old import path of models/convert; docs/architecture.md
describes the layers.) Within a layer no module imports another layer-mate's package (training and inference
are independent); plotting imports only config and io.
"""
import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "deepspot"

LAYERS = {
    "config": 0, "extras": 0, "metrics": 0,
    "io": 1, "geometry": 1, "plotting": 1,
    "features": 2,
    "models": 3, "reliability": 3,
    "training": 4, "inference": 4, "convert": 4,
    "evaluation": 5,
    "api": 6, "datasets": 6,
    "demo": 7,
    "cli": 8,
}
ONLY = {"plotting": {"config", "io"}, "io": {"config", "io"}, "geometry": {"config", "geometry"}}


def _unit(module: str) -> str:
    """deepspot.training.fit -> training; deepspot (the package itself) -> api (it exports the API)."""
    parts = module.split(".")
    unit = parts[1] if len(parts) > 1 else "api"
    return "cli" if unit == "__main__" else unit


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "deepspot":
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "deepspot":
            if node.module == "deepspot":  # from deepspot import plotting
                for a in node.names:
                    yield node.lineno, f"deepspot.{a.name}"
            else:
                yield node.lineno, node.module


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        yield ".".join(parts), path


def test_every_module_has_a_layer():
    units = {_unit(m) for m, _ in _modules() if m != "deepspot"}
    assert units <= set(LAYERS), sorted(units - set(LAYERS))


def test_no_module_imports_a_layer_above_or_beside_it():
    bad = []
    for module, path in _modules():
        if module == "deepspot":
            continue  # the package exports the API lazily (no import statements at module level)
        unit = _unit(module)
        for line, target in _imports(path):
            t = _unit(target)
            if t == unit:
                continue
            allowed = ONLY.get(unit)
            if (t not in allowed) if allowed is not None else LAYERS[t] >= LAYERS[unit]:
                bad.append(f"{path.relative_to(SRC.parent)}:{line} ({unit}, layer {LAYERS[unit]}) imports "
                           f"{target} ({t}, layer {LAYERS[t]})")
    assert not bad, "\n".join(bad)


ARCHITECTURE = SRC.parents[1] / "docs" / "architecture.md"


def _doc_layers(text: str) -> dict[str, int]:
    """The units of docs/architecture.md's layer table (``| 0 | `config`, `extras` | …``) -> their layer."""
    rows = re.findall(r"^\| (\d+) \| ([^|]*) \|", text, flags=re.M)
    return {u: int(n) for n, units in rows for u in re.findall(r"`(\w+)`", units)}


def test_architecture_doc_has_this_table_and_names_every_module():
    """The doc's layer table is LAYERS, and the doc names every module inside a unit's package by its file
    name (a new module is described where a newcomer looks for it)."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    assert _doc_layers(text) == LAYERS
    unnamed = [path.relative_to(SRC).as_posix() for module, path in _modules()
               if path.parent != SRC and path.name != "__init__.py"
               and not re.search(rf"(?<![\w.]){re.escape(path.name)}", text)]
    assert not unnamed, f"not named in {ARCHITECTURE.name}: {unnamed}"


def test_the_check_catches_an_upward_import(tmp_path):
    """The walker sees both import forms (a check that could never fail would prove nothing)."""
    p = tmp_path / "m.py"
    p.write_text("import deepspot.cli\nfrom deepspot.training.fit import fit\nfrom deepspot import plotting\n")
    assert [t for _, t in _imports(p)] == ["deepspot.cli", "deepspot.training.fit", "deepspot.plotting"]


@pytest.mark.parametrize("name", ["load_model", "Model", "train", "read", "pl", "datasets", "ModelConfig"])
def test_public_names_resolve(name):
    import deepspot as ds

    assert getattr(ds, name) is not None and name in dir(ds)
