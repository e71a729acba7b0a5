"""Inputs that gave a wrong result with exit 0, or an error naming nothing (issue D8–D19): each is now the
right result or a one-line error naming the file or option, before compute."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from deepspot.config import CellGeometry, CheckpointError, SpotGeometry, read_config_file
from deepspot.geometry.grid import GridSpec
from deepspot.inference.preflight import check_options
from deepspot.io import slides as slides_mod
from deepspot.io.slides import SlideError, open_slide
from deepspot.models.checkpoint import save_checkpoint
from deepspot.models.deepsets import DeepSpot

from fixtures_cli import register_tiny_vit, run_cli

TINY = "test-vit-tiny-wrong"
GENES = [f"G{i}" for i in range(4)]
register_tiny_vit(TINY)


@pytest.fixture(autouse=True)
def _fresh_cache():
    slides_mod.clear_decode_cache()
    yield
    slides_mod.clear_decode_cache()


def _rgb(h=64, w=80):
    rng = np.random.default_rng(0)
    return (np.array([190, 80, 150]) + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    torch.manual_seed(0)
    net = DeepSpot(32, len(GENES), hidden=8, n_ensemble=2, context="spot_neighbors").eval()
    geom = SpotGeometry(GridSpec(55.0, 100.0, unit="um"), n_sub=3, neighbor_radius=1)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "model", net,
                           {"model": "deepspot", "encoder": {"name": TINY, "dim": 32}, "genes": GENES,
                            "geometry": geom.to_dict(), "scaler": None})


# --------------------------------------------------------------------------- D8 colour models


def test_cmyk_palette_and_float_tiffs_read_as_their_colours(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.tif")
    tifffile.imwrite(tmp_path / "f255.tif", rgb.astype(np.float32), photometric="rgb")
    tifffile.imwrite(tmp_path / "f1.tif", rgb.astype(np.float32) / 255.0, photometric="rgb")
    want = {"cmyk.tif": rgb, "f255.tif": rgb, "f1.tif": rgb,
            "pal.tif": np.asarray(Image.open(tmp_path / "pal.tif").convert("RGB"))}
    for name, expect in want.items():
        with open_slide(tmp_path / name) as s:
            got = s.read_region((0, 0), 0, (80, 64))
        assert np.abs(got.astype(int) - expect.astype(int)).max() <= 1, name


def test_anisotropic_resolution_is_refused_unless_mpp_is_given(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", _rgb(), photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 5),
                     resolutionunit="CENTIMETER")
    with pytest.raises(SlideError, match=r"a.tif: anisotropic resolution \(x 0.5, y 5 µm/px\)"):
        open_slide(tmp_path / "a.tif")
    with open_slide(tmp_path / "a.tif", mpp=0.5) as s:
        assert s.mpp == 0.5


# --------------------------------------------------------------------------- D9 / D10 / D17 configs


def _edit(ck: Path, tmp: Path, edit) -> Path:
    d = tmp / "edited"
    shutil.copytree(ck, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("value", [300_000, 1e9, float("inf")])
def test_model_sizes_are_bounded_before_allocating(ck, tmp_path, value):
    d = _edit(ck, tmp_path, lambda c: c["model_args"].update(hidden=value))
    with pytest.raises(CheckpointError, match=r"config.json: model_args.hidden is .*over the bound"):
        read_config_file(d)


def test_a_nan_in_the_scaler_is_refused(ck, tmp_path):
    scaler = {"kind": "standard", "a": [0.0, float("nan"), 0.0, 0.0], "b": [1.0] * 4}
    d = _edit(ck, tmp_path, lambda c: c.update(scaler=scaler))
    with pytest.raises(CheckpointError, match=r"config.json: scaler.a has a NaN .*position 1"):
        read_config_file(d)


def test_a_deeply_nested_config_is_one_line(ck, tmp_path):
    d = tmp_path / "deep"
    shutil.copytree(ck, d)
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="config.json: JSON nested too deeply"):
        read_config_file(d)


# --------------------------------------------------------------------------- D11 / D12 cohorts


def test_predict_cohort_refuses_a_cell_model_and_ray_without_resources(ck, tmp_path):
    from deepspot.inference.cohort import run_cohort

    Image.fromarray(_rgb()).save(tmp_path / "s.png")
    (tmp_path / "m.csv").write_text("path,id\ns.png,a\n")
    cell = _edit(ck, tmp_path, lambda c: c.update(model="deepcell", geometry=CellGeometry(10.0).to_dict()))
    kw = dict(backend="local", progress=False, echo=lambda *a, **k: None, mpp=1.0)
    with pytest.raises(CheckpointError, match="predicts cells"):
        run_cohort(tmp_path / "m.csv", cell, tmp_path / "o", **kw)
    pytest.importorskip("ray")
    with pytest.raises(ValueError, match="--num-cpus 0 .* every slide at once"):
        run_cohort(tmp_path / "m.csv", ck, tmp_path / "o", **dict(kw, backend="ray"), num_cpus=0)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- D14 / D15 options and grids


@pytest.mark.parametrize("kw, needle", [
    (dict(spacing=0), "--spacing"), (dict(spacing=float("nan")), "--spacing"), (dict(spot_px=1e9), "--spot-px"),
    (dict(min_tissue=float("nan")), "--min-tissue"), (dict(min_tissue=2), "--min-tissue"),
    (dict(batch_size=0), "--batch-size"), (dict(num_workers=-1), "--num-workers"),
])
def test_numeric_options_are_checked(kw, needle):
    with pytest.raises(ValueError, match=needle):
        check_options(**kw)


@pytest.mark.parametrize("args, needle", [
    (["--mpp", "0.011"], "smaller than one spot"),  # a 55 µm spot is 5000 px: the image is smaller
    (["--mpp", "1.0", "--spacing", "0.001"], "is over"),
    (["--mpp", "1.0", "--spacing", "0"], "--spacing must be"),
    (["--mpp", "1.0", "--min-tissue", "nan"], "--min-tissue must be"),
    (["--mpp", "1.0", "--batch-size", "0"], "--batch-size must be"),
])
def test_empty_or_absurd_grid_is_an_error_not_an_empty_result(ck, tmp_path, capsys, args, needle):
    Image.fromarray(_rgb(300, 300)).save(tmp_path / "he.png")
    code, _, err = run_cli(capsys, "predict", tmp_path / "he.png", "--model", ck, "--out", tmp_path / "o",
                           "--no-progress", "--num-workers", "0", *args)
    assert code == 1 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- D19 settings


@pytest.mark.parametrize("value", ["nan", "-1", "0", "lots"])
def test_decode_budget_setting_is_checked_as_a_setting(tmp_path, monkeypatch, value):
    monkeypatch.setenv("DEEPSPOT_DECODE_BUDGET_GB", value)
    with pytest.raises(SlideError, match="DEEPSPOT_DECODE_BUDGET_GB must be a positive number") as e:
        slides_mod.decode_budget()
    assert "corrupt" not in str(e.value)
