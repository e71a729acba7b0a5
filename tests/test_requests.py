"""Typed requests (config/requests.py), the plan a predict request becomes (inference/predict_plan.py),
ds.settings (config/runtime.py) and the one list of output names (config/output_names.py)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import deepspot as ds
from deepspot.config import output_names as names
from deepspot.config.requests import CohortRequest, PredictRequest, TrainRecipe, TrainRequest, TrainerSettings


@pytest.fixture
def png(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "he.png")
    return tmp_path / "he.png"


def test_settings_read_set_override_and_refuse_unknown_names():
    s = ds.settings
    before = s.as_dict()
    try:
        s.progress = False
        assert s.progress is False
        with s.override(device="cuda:1", num_workers=0):
            assert (s.device, s.num_workers, s.progress) == ("cuda:1", 0, False)
            with s.unless_set(num_workers=3, cache_dir="c"):  # only where unset
                assert s.num_workers == 0 and str(s.cache_dir) == "c"
        assert (s.device, s.num_workers) == (before["device"], before["num_workers"])
        with pytest.raises(AttributeError, match="no setting 'bogus'"):
            s.bogus = 1
        with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
            with s.override(bogus=1):
                pass
        with pytest.raises(ValueError, match="--num-workers must be 0 or more"):
            s.num_workers = -1
    finally:
        s.reset()
    assert s.as_dict() == before


def test_predict_request_is_checked_once_when_built(png, tmp_path):
    r = PredictRequest.from_options(png, genes="A, B", out=tmp_path / "o", min_tissue=0.2, interval=0)
    assert r.genes == ("A", "B") and r.interval is None and r.stem == "he"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.mpp = 1.0
    assert PredictRequest.from_options(png, genes="reliable").reliable_only
    for kw, msg in [(dict(min_tissue=2), "--min-tissue must be between 0 and 1"),
                    (dict(batch_size=0), "--batch-size must be a whole number of at least 1"),
                    (dict(spacing=-1.0), "--spacing must be a positive number"),
                    (dict(fmt="zarr"), "--format must be one of h5ad, spatialdata, got 'zarr'"),
                    (dict(genes=["A", "A"]), "--genes: repeated gene names"),
                    (dict(spot_px=50.0), "--spot-px / --spacing-px need --geometry original"),
                    (dict(tissue="magic"), "unknown tissue method 'magic'")]:
        with pytest.raises(ValueError, match=msg):
            PredictRequest(png, **kw)
    with pytest.raises(FileNotFoundError, match="missing.svs: file not found"):
        PredictRequest(tmp_path / "missing.svs")


def test_the_plan_opens_the_slide_once_and_holds_it(png, tmp_path, monkeypatch):
    from deepspot.config import GridSpec, ModelConfig, SpotGeometry
    from deepspot.inference import predict_plan
    from deepspot.io import slides

    from deepspot.models.deepsets import DeepSpot

    opened = []
    real = slides.open_slide
    monkeypatch.setattr(slides, "open_slide", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    net = DeepSpot(8, 2, hidden=4, n_ensemble=1, context="spot_neighbors")
    cfg = ModelConfig.from_dict({"model": "deepspot", "model_args": net.config(),
                                 "encoder": {"name": "x", "dim": 8}, "genes": ["A", "B"],
                                 "geometry": SpotGeometry(GridSpec(20.0, 30.0, unit="px")).to_dict()})
    with predict_plan.plan_prediction(PredictRequest(png, out=tmp_path / "o", genes=["A"]), cfg) as plan:
        assert plan.slide is not None and plan.dimensions == (64, 64) and plan.mpp is None
        assert plan.files == names.prediction_files("he") and plan.genes_plot == ["A"]
    assert plan.slide is None and opened == [png]  # opened once, closed with the block
    with pytest.raises(Exception, match="C"):
        predict_plan.plan_prediction(PredictRequest(png, genes=["C"]), cfg)
    assert opened == [png]  # a gene the model does not predict is refused before the slide is opened


def test_planning_imports_no_torch():
    code = ("import sys, deepspot.inference.predict_plan, deepspot.config.requests, deepspot.config.runtime; "
            "print(sorted(m for m in ('torch', 'anndata', 'zarr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_request_keeps_the_recipe_apart_from_the_trainer():
    r = TrainRequest.of(loss="mse_pearson", lr=1e-3, patience=5, precision="bf16", devices=2)
    assert r.recipe == TrainRecipe(loss="mse_pearson", lr=1e-3, patience=5)
    assert r.trainer == TrainerSettings(precision="bf16", devices=2)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        TrainRequest.of(learning_rate=1)
    with pytest.raises(ValueError, match="batch_size must be a whole number"):
        TrainRecipe(batch_size=0)


def test_cohort_request_checks(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'dask'"):
        CohortRequest(tmp_path / "m.csv", tmp_path / "m", tmp_path / "o", backend="dask")
    with pytest.raises(ValueError, match="give --new-run or --overwrite, not both"):
        CohortRequest(tmp_path / "m.csv", tmp_path / "m", tmp_path / "o", new_run=True, overwrite=True)
    with pytest.raises(ValueError, match="unknown tissue method 'magic'; use otsu, mean_rgb, tile_mean_rgb, none"):
        CohortRequest(tmp_path / "m.csv", tmp_path / "m", tmp_path / "o", tissue="magic")


def test_output_names_are_one_list():
    for fmt in names.PREDICTION_FORMATS:
        made = names.prediction_files("s1", fmt)
        assert all(names.is_prediction_file(n) for n in made)
        assert set(made) <= set(names.all_prediction_files("s1"))
    assert names.is_score_file(names.score_plot("C5")) and names.is_demo_file(names.DEMO_PREDICTIONS)


def test_train_job_sorts_the_keywords_and_is_checked_when_built(png, tmp_path):
    """ds.train's keywords become one TrainJob: recipe names (SpotRecipe's), trainer settings, a manifest's
    options; a bad value or an unknown name is refused when the request is built, before any data is read."""
    from deepspot.training.request import TrainJob

    job = TrainJob.of("m.csv", image=png, loss="mse", max_epochs=3, lr=1e-3, precision="bf16", accelerator="cpu",
                      log_dir=tmp_path, val_samples=["A"], genes="G1,G2", patience=None)
    assert job.recipe == {"context": "spot_subspot_neighbors", "seed": 2024, "loss": "mse", "max_epochs": 3,
                          "lr": 1e-3}  # None: the preset's
    assert (job.trainer.precision, job.trainer.log_dir) == ("bf16", tmp_path) and job.genes == ("G1", "G2")
    assert job.samples_options == {"val_samples": ["A"]}
    assert job.spot_recipe.max_epochs == 3 and job.spot_recipe.lr == 1e-3 and job.spot_recipe.patience == 8
    assert TrainJob.of("m.csv", preset="original").spot_recipe.batch_size == 1024
    assert set(job.samples_only) == {"lr", "precision", "val_samples"}  # accelerator cpu: the default
    with pytest.raises(ValueError, match="loss 'nope'"):
        TrainJob.of("m.csv", loss="nope")
    with pytest.raises(TypeError, match="no_such"):
        TrainJob.of("m.csv", no_such=1)
    with pytest.raises(ValueError, match="unknown model 'spots'"):
        TrainJob.of("m.csv", model="spots")
    with pytest.raises(ValueError, match="repeated gene names"):
        TrainJob.of("m.csv", genes=["A", "A"])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        TrainJob.of("m.csv", image=tmp_path / "gone.png")
    with pytest.raises(ValueError, match="training recipe: min_epochs"):  # the preset's 10 minimum epochs
        job.replace(preset="original", recipe={"max_epochs": 2})
