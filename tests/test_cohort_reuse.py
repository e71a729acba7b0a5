"""A cohort's slides share one encoder and one model per process: building them (seconds for a foundation
model, more on first load from disk) is paid once, not once per slide."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from deepspot.config import SpotGeometry
from deepspot.features.encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder
from deepspot.geometry.grid import GridSpec
from deepspot.inference.cohort import SlidePredictor, run_cohort
from deepspot.models.checkpoint import save_checkpoint
from deepspot.models.deepsets import DeepSpot

BUILDS: list[int] = []


def _tiny() -> nn.Module:
    BUILDS.append(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 8))


def test_local_cohort_builds_the_encoder_once(tmp_path):
    register_encoder(EncoderSpec("test-count-builds", 8, 32, IMAGENET_MEAN, IMAGENET_STD, lambda _p: _tiny(),
                                 "random (test)", False, arch=_tiny), overwrite=True)
    rng = np.random.default_rng(0)
    rows = ["path,id,mpp"]
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (160, 200, 3), dtype=np.uint8)).save(tmp_path / f"s{i}.png")
        rows.append(f"s{i}.png,s{i},1.0")
    (tmp_path / "slides.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    geometry = SpotGeometry(GridSpec(40.0, 60.0, unit="um"), n_sub=3, neighbor_radius=1)
    save_checkpoint(tmp_path / "model", DeepSpot(8, 3, hidden=4, n_ensemble=2),
                    {"model": "deepspot", "encoder": {"name": "test-count-builds", "dim": 8},
                     "genes": ["A", "B", "C"], "geometry": geometry.to_dict(), "scaler": None})
    SlidePredictor._cache.clear()
    BUILDS.clear()
    quiet = dict(backend="local", tissue="none", progress=False, device="cpu", echo=lambda *a, **k: None)
    s = run_cohort(tmp_path / "slides.csv", tmp_path / "model", tmp_path / "out", **quiet)
    assert s.n_done == 3 and not s.failures
    assert len(BUILDS) == 1, f"the encoder was built {len(BUILDS)} times for 3 slides"
    run_cohort(tmp_path / "slides.csv", tmp_path / "model", tmp_path / "out2", **quiet)  # same process, new run
    assert len(BUILDS) == 1
