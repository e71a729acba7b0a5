"""Inputs that gave a wrong result with exit 0, or an error naming nothing (issue D8–D19): each is now the
right result or a one-line error naming the file or option, before compute."""
from __future__ import annotations

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

from fixtures_cli import edited_checkpoint, run_cli, tiny_vit_encoder

TINY = "test-vit-tiny-wrong"
GENES = [f"G{i}" for i in range(4)]
_tiny = tiny_vit_encoder(TINY)


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




@pytest.mark.parametrize("value", [300_000, 1e9, float("inf")])
def test_model_sizes_are_bounded_before_allocating(ck, tmp_path, value):
    d = edited_checkpoint(ck, tmp_path, lambda c: c["model_args"].update(hidden=value))
    with pytest.raises(CheckpointError, match=r"config.json: model_args.hidden is .*over the bound"):
        read_config_file(d)


def test_a_nan_in_the_scaler_is_refused(ck, tmp_path):
    scaler = {"kind": "standard", "a": [0.0, float("nan"), 0.0, 0.0], "b": [1.0] * 4}
    d = edited_checkpoint(ck, tmp_path, lambda c: c.update(scaler=scaler))
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
    cell = edited_checkpoint(ck, tmp_path, lambda c: c.update(model="deepcell", geometry=CellGeometry(10.0).to_dict()))
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


# --------------------------------------------------------------------------- D13 / D17 manifests, caches, files


def test_huge_or_non_utf8_manifests_are_refused_before_parsing(tmp_path, monkeypatch):
    import deepspot.io.owner as owner
    from deepspot.inference.cohort import read_cohort
    from deepspot.io.spatial import SpatialDataError
    from deepspot.training.manifest import read_manifest

    big = tmp_path / "big.csv"
    big.write_text("path,id\n" + "x.png,a\n" * 2000)
    monkeypatch.setattr(owner, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(ValueError, match=r"big.csv: manifest is .* MB; .* at most"):
        read_cohort(big)
    with pytest.raises(SpatialDataError, match=r"big.csv: manifest is"):
        read_manifest(big)
    monkeypatch.undo()
    bad = tmp_path / "latin.csv"
    bad.write_bytes("path,id\nsl\xefde.png,a\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.csv: manifest is not UTF-8"):
        read_cohort(bad)


def test_a_damaged_feature_cache_chunk_names_the_cache(tmp_path):
    from deepspot.features.store import FeatureWriter, StoredFeatures

    w = FeatureWriter(tmp_path / "store", 40, 8, 0, {})
    w.write(0, np.zeros((40, 2)), np.ones((40, 8), np.float32), None)
    path = w.close()
    chunks = [p for p in (path / "spot").rglob("*") if p.is_file() and not p.name.startswith(("zarr", "."))]
    assert chunks
    for c in chunks:
        c.write_bytes(b"\x28\xb5\x2f\xfd garbage" * 3)
    with pytest.raises(ValueError, match=r"store: feature cache is damaged .* delete that folder"):
        StoredFeatures(path).spot_rows(np.arange(5))


def test_a_killed_runs_feature_store_partial_is_removed_by_the_next(tmp_path):
    from deepspot.features.store import FeatureWriter

    stale = tmp_path / "store.partial-abc"
    stale.mkdir()
    (stale / "junk").write_text("x")
    live = FeatureWriter(tmp_path / "store", 2, 4, 0, {})  # alive: its lock is held
    w = FeatureWriter(tmp_path / "store", 2, 4, 0, {})
    assert not stale.exists() and live.tmp.exists()
    w.abort()
    live.abort()
    assert list(tmp_path.iterdir()) == []


def test_all_zero_counts_name_the_file(tmp_path):
    import anndata as ad
    import pandas as pd

    from deepspot.io.spatial import SpatialDataError
    from deepspot.training.manifest import SampleSpec, load_sample

    a = ad.AnnData(np.zeros((4, 3), np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(4)]))
    a.obsm["spatial"] = np.array([[10, 10], [20, 10], [10, 20], [20, 20]], float)
    a.obs["array_row"], a.obs["array_col"] = [0, 0, 1, 1], [0, 2, 1, 3]
    a.write_h5ad(tmp_path / "zero.h5ad")
    Image.fromarray(_rgb()).save(tmp_path / "he.png")
    spec = SampleSpec("s", "p", tmp_path / "he.png", tmp_path / "zero.h5ad", "h5ad", 1.0)
    with pytest.raises(SpatialDataError, match=r"zero.h5ad: sample s has all-zero counts"):
        load_sample(spec)


def test_plot_of_a_non_h5ad_is_one_line(tmp_path, capsys):
    (tmp_path / "x.h5ad").write_text("not hdf5")
    code, _, err = run_cli(capsys, "plot", tmp_path / "x.h5ad")
    assert code == 1 and "x.h5ad: not a readable h5ad" in err and "Traceback" not in err, err


def test_score_refuses_a_cell_model_before_reading_samples(ck, tmp_path, capsys, monkeypatch):
    import deepspot.api

    def boom(*a, **k):
        raise AssertionError("samples read before the model kind was checked")

    from deepspot.models.deepcell import DeepCell

    monkeypatch.setattr(deepspot.api.Model, "score", boom)
    cell = save_checkpoint(tmp_path / "cell", DeepCell(32, len(GENES), hidden=8, n_ensemble=2),
                           {"model": "deepcell", "encoder": {"name": TINY, "dim": 32}, "genes": GENES,
                            "geometry": CellGeometry(10.0).to_dict(), "scaler": None})
    # a well-formed manifest whose files exist (empty: the model is refused before any sample is read)
    (tmp_path / "s1.png").write_bytes(b"")
    (tmp_path / "s1.h5ad").write_bytes(b"")
    (tmp_path / "m.csv").write_text("sample_id,patient_id,image,expression\ns1,p1,s1.png,s1.h5ad\n")
    code, _, err = run_cli(capsys, "score", "--model", cell, "--manifest", tmp_path / "m.csv", "--out",
                           tmp_path / "o", "--no-progress")
    assert code == 1 and "predicts cells" in err, err


def test_predicting_a_tiff_leaves_no_unclosed_file(ck, tmp_path):
    import gc
    import warnings

    import deepspot as ds

    tifffile.imwrite(tmp_path / "he.tif", _rgb(300, 300), photometric="rgb")
    m = ds.load_model(ck)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.predict_slide(tmp_path / "he.tif", out=tmp_path / "o", mpp=1.0, tissue="none", num_workers=0,
                        progress=False, n_plot=0)
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks

