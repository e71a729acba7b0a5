"""The checkpoint contract: typed config, migration of checkpoints written before it, one-line errors
naming the file and the field before any compute, the Scaler, the mpp rule; importing deepspot changes
no global state."""
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deepspot as ds
from deepspot.config import (CellGeometry, CheckpointError, GridSpec, ModelConfig, MppError, Scaler, SpotGeometry,
                             invert_scaler, resolve_mpp, um_to_px)
from deepspot.models.checkpoint import read_config

DATA = Path(__file__).parent / "data"
V1_SPOT, V1_CELL = DATA / "checkpoint_v1_spot", DATA / "checkpoint_v1_cell"


def test_checkpoints_written_before_the_typed_config_still_load(tmp_path):
    m = ds.load_model(V1_SPOT)
    cfg = m.config
    assert cfg.model == "deepspot" and cfg.context == "spot_subspot_neighbors" and cfg.feature_mode == "standard"
    assert m.genes == ["EPCAM", "VIM", "FN1"] and (cfg.encoder.name, cfg.encoder.dim) == ("efficientnet-lite0", 1280)
    assert cfg.geometry == SpotGeometry(GridSpec(120.0, 120.0, "hex", "px"), 3, 1)
    assert cfg.scaler.kind == "standard" and cfg.training["epochs"] == 3 and cfg.schema_version == 2
    rng = np.random.default_rng(0)
    spot, sub, nb = rng.random((4, 1280)), rng.random((4, 9, 1280)), rng.random((4, 3, 1280))
    raw = m.predict_features(spot, sub, nb, raw=True)
    np.testing.assert_allclose(m.predict_features(spot, sub, nb), raw * cfg.scaler.b + cfg.scaler.a, rtol=1e-6)
    # saved again: the current schema, the same numbers
    back = ds.load_model(m.save(tmp_path / "v2"))
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["schema_version"] == 2
    assert back.config.to_dict() == cfg.to_dict()
    np.testing.assert_array_equal(back.predict_features(spot, sub, nb), m.predict_features(spot, sub, nb))
    c = ds.load_model(V1_CELL)
    assert c.config.is_cell_model and c.config.geometry == CellGeometry(20.0, "px", "knn", 6)
    assert c.predict_features(spot, neighbors=nb).shape == (4, 3)
    with pytest.raises(CheckpointError, match="predicts cells, not a spot grid"):
        c.predict_slide("any.tif")


def test_old_top_level_feature_mode_is_migrated():
    raw = json.loads((V1_SPOT / "config.json").read_text())
    raw["feature_mode"] = "fast"
    del raw["geometry"]["feature_mode"]
    cfg = ModelConfig.from_dict(raw)
    assert cfg.feature_mode == "fast" and "feature_mode" not in cfg.extra


def _break(d, path, value=...):
    d = copy.deepcopy(d)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return d


@pytest.mark.parametrize("path,value,message", [
    ("geometry.grid.spot_diameter", ..., "geometry.grid.spot_diameter missing"),
    ("geometry.grid.spot_diameter", -5, "geometry.grid.spot_diameter must be a positive"),
    ("geometry.grid.unit", "mm", "geometry.grid.unit must be one of um, px"),
    ("geometry.n_sub", 0, "geometry.n_sub must be >= 1"),
    ("geometry.feature_mode", "turbo", "geometry.feature_mode must be one of standard, fast"),
    ("geometry", ..., "geometry missing"),
    ("encoder.dim", "1280", "encoder.dim must be an integer"),
    ("encoder.name", ..., "encoder.name missing"),
    ("encoder", ..., "encoder missing"),
    ("genes", ["A", "A", "B"], "genes has duplicates"),
    ("genes", "EPCAM", "genes must be a list"),
    ("model", "transformer", "model must be one of"),
    ("model_args.in_dim", 512, "model_args.in_dim is 512 but encoder.dim is 1280"),
    ("model_args.n_genes", 7, "model_args.n_genes is 7 but genes lists 3"),
    ("scaler.a", [0.0, 1.0], "scaler.a has 2 values for 3 genes"),
    ("scaler.b", [1.0, 0.0, 1.0], "scaler.b has zeros"),
    ("schema_version", 99, "schema_version 99 is newer"),
    ("training", [1, 2], "training must be an object"),
])
def test_every_malformed_field_is_one_line_naming_file_and_field(tmp_path, path, value, message):
    raw = json.loads((V1_SPOT / "config.json").read_text())
    ck = tmp_path / "ck"
    ck.mkdir()  # config only, no weights: the config is checked before anything else is read
    (ck / "config.json").write_text(json.dumps(_break(raw, path, value)))
    with pytest.raises(CheckpointError) as e:
        ds.load_model(ck)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{ck / 'config.json'}: ") and message in msg, msg


def test_cell_geometry_fields_are_checked(tmp_path):
    raw = json.loads((V1_CELL / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"config.json: geometry.neighbors must be one of knn, radius, none"):
        ModelConfig.from_dict(_break(raw, "geometry.neighbors", "delaunay"))
    with pytest.raises(CheckpointError, match=r"config.json: geometry.cell_diameter missing"):
        ModelConfig.from_dict(_break(raw, "geometry.cell_diameter"))


def test_scaler_keeps_the_stored_form_and_numbers():
    rng = np.random.default_rng(1)
    y = rng.normal(3, 2, size=(50, 4))
    y[:, 2] = 1.5  # constant gene: b = 1
    s = Scaler.fit(y, "standard")
    np.testing.assert_allclose(s.a, y.mean(0), rtol=1e-6)
    np.testing.assert_allclose(s.b, np.where(y.std(0) > 1e-12, y.std(0), 1.0), rtol=1e-6)
    d = s.to_dict()
    assert set(d) == {"kind", "a", "b", "lo", "hi"} and d["b"][2] == 1.0
    z = Scaler.from_dict(d).transform(y)
    np.testing.assert_allclose(z, (y - s.a) / s.b, rtol=1e-5)
    np.testing.assert_allclose(invert_scaler(z, d), y, rtol=1e-5)
    # predictions beyond the training range are clipped to it (a tile unlike any training tile)
    far = invert_scaler(np.full((2, 4), 1e3, np.float32), d)
    np.testing.assert_allclose(far, np.broadcast_to(y.max(0), (2, 4)), rtol=1e-6)
    old = {"kind": "standard", "a": d["a"], "b": d["b"]}  # checkpoints stored before the range: no clipping
    assert Scaler.from_dict(old).lo is None and invert_scaler(np.full((1, 4), 1e3, np.float32), old).max() > 1e3
    np.testing.assert_allclose(Scaler.fit(y, "minmax").transform(y).max(0)[[0, 1, 3]], 1.0, rtol=1e-6)
    assert Scaler.fit(y, None) is None and invert_scaler(z, None) is z
    with pytest.raises(ValueError, match="unknown scaler"):
        Scaler.fit(y, "robust")


def test_mpp_rule_and_um_to_px():
    class Slide:
        path, mpp = "s.svs", None

    assert resolve_mpp(Slide()) is None and resolve_mpp(Slide(), 0.5, needs_um=True) == 0.5
    with pytest.raises(MppError, match=r"^s.svs: .*pass --mpp"):
        resolve_mpp(Slide(), needs_um=True)
    Slide.mpp = 0.25
    assert resolve_mpp(Slide(), needs_um=True) == 0.25 and resolve_mpp(Slide(), 1.0) == 1.0
    assert um_to_px(55.0, "um", 0.5) == 110.0 and um_to_px(55.0, "px", None) == 55.0
    with pytest.raises(MppError, match="--mpp"):
        um_to_px(55.0, "um", None)
    assert GridSpec(55.0, 100.0).in_pixels(0.5) == GridSpec(110.0, 200.0, "hex", "px")
    assert CellGeometry(10.0, unit="um").tile_px(0.25) == 40.0


def test_importing_and_plotting_leave_the_matplotlib_backend_alone(tmp_path):
    code = f"""
import matplotlib
matplotlib.use("svg")
import anndata as ad, numpy as np, pandas as pd
import deepspot as ds
import deepspot.api, deepspot.inference.predict, deepspot.cli.spots
a = ad.AnnData(np.random.rand(5, 2).astype("float32"), var=pd.DataFrame(index=["A", "B"]))
a.obsm["spatial"] = np.random.rand(5, 2) * 100
axes = ds.pl.spatial(a, genes=["A", "B"], path={str(tmp_path / 'p.png')!r})
import matplotlib.pyplot as plt
print(matplotlib.get_backend(), len(axes), plt.get_fignums())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["svg", "2", "[]"], r.stdout
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_one_gene_name_rule_for_checkpoints_and_user_lists():
    from deepspot.config import gene_name_faults
    from deepspot.inference.preflight import check_gene_list

    assert gene_name_faults(["A", "B"]) == ([], [])
    assert gene_name_faults(["A", " ", "B", "A", "B", "A"]) == ([1], ["A", "B"])
    with pytest.raises(ValueError, match=r"^--genes: empty gene name at position 1$"):
        check_gene_list(["A", " "])
    with pytest.raises(ValueError, match=r"^--genes: repeated gene names \(A, B\)$"):
        check_gene_list(["A", "B", "A", "B"])


def test_every_check_of_a_choice_names_the_one_list(tmp_path):
    """Each vocabulary is listed once (deepspot.config, models/deepsets, training/recipe); the checks that
    refuse a value name every choice of that list, so a choice added there is accepted and named everywhere."""
    from typing import get_args

    from deepspot.config import FEATURE_MODES, GRID_LAYOUTS, SCALERS, SUBSPOT_RULES, TISSUE_RULES, UNITS
    from deepspot.features.extract import check_mode
    from deepspot.features.tiles import subspot_bounds
    from deepspot.inference.cohort.run import run_cohort
    from deepspot.models.deepsets import CONTEXTS, Context
    from deepspot.training.recipe import HVG_FLAVORS, SpotRecipe
    from deepspot.training.targets import rank_hvgs

    assert CONTEXTS == get_args(Context)
    refusals = [
        (lambda: run_cohort(tmp_path / "m.csv", tmp_path / "model", tmp_path / "out", backend="local",
                            tissue="bogus"), TISSUE_RULES),
        (lambda: SpotGeometry(GridSpec(), feature_mode="bogus"), FEATURE_MODES),
        (lambda: GridSpec(layout="bogus"), GRID_LAYOUTS),
        (lambda: GridSpec.from_dict({"spot_diameter": 55, "spacing": 100, "layout": "bogus", "unit": "um"}),
         GRID_LAYOUTS),
        (lambda: SpotGeometry(GridSpec(), tissue="bogus"), TISSUE_RULES),
        (lambda: check_mode("bogus"), FEATURE_MODES),
        (lambda: subspot_bounds(30, 3, rule="bogus"), SUBSPOT_RULES),
        (lambda: um_to_px(1.0, "bogus", 0.5), UNITS),
        (lambda: CellGeometry(unit="bogus"), UNITS),
        (lambda: Scaler.fit(np.ones((3, 2)), "bogus"), SCALERS),
        (lambda: SpotRecipe(scaler="bogus"), SCALERS),
        (lambda: rank_hvgs({}, 5, flavor="bogus"), HVG_FLAVORS),
    ]
    for call, choices in refusals:
        with pytest.raises(ValueError) as e:
            call()
        assert all(c in str(e.value) for c in choices), (str(e.value), choices)
    assert SpotRecipe(scaler=SCALERS[-1]).scaler == SCALERS[-1]
    assert SpotGeometry(GridSpec(layout=GRID_LAYOUTS[-1]), tissue=None).tissue is None  # no rule: the preset's


def test_geometry_words_come_from_the_presets():
    """The --geometry help of the commands (describe_geometries) names every preset with the sizes
    geometry_preset builds, and marks one default."""
    from deepspot.config import GEOMETRY_PRESETS, describe_geometries, geometry_preset

    text = describe_geometries("visium")
    assert all(f"{name} (" in text for name in GEOMETRY_PRESETS) and text.count("the default") == 1
    v, t = geometry_preset("visium").grid, geometry_preset("tcga").grid
    assert f"visium ({v.spot_diameter:g}/{v.spacing:g} µm {v.layout}, the default)" in text
    assert f"{t.spot_diameter:g}/{t.spacing:g} px at 20x" in text and "the default" not in describe_geometries()
