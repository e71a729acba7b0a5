"""How many times one predict opens its slide (issue 23: each open reads the header again, and a plain image
may be decoded again). Counted at io.slides.BACKENDS, the classes open_slide builds. A predict request is checked
once into a plan that opens the slide once; the run reads pixels through that handle (it was 4 opens for the
CLI and 3 for the API before the request -> plan -> run flow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deepspot.config import GridSpec, SpotGeometry
from deepspot.io import slides
from deepspot.models.checkpoint import save_checkpoint
from deepspot.models.deepsets import DeepSpot

from fixtures_cli import run_cli, tiny_vit_encoder

TINY = "test-vit-tiny-opens"
_tiny = tiny_vit_encoder(TINY)
CLI_OPENS, API_OPENS = 1, 1


@pytest.fixture
def opens(monkeypatch):
    """The paths open_slide opened, in order (every backend class wrapped)."""
    seen = []
    for name, cls in list(slides.BACKENDS.items()):
        def counted(p, *a, _cls=cls, **kw):
            seen.append(str(p))
            return _cls(p, *a, **kw)
        monkeypatch.setitem(slides.BACKENDS, name, counted)
    slides.clear_decode_cache()
    return seen


@pytest.fixture
def model_and_slide(tmp_path):
    torch.manual_seed(1)
    net = DeepSpot(32, 3, hidden=8, n_ensemble=2, context="spot_neighbors").eval()
    geom = SpotGeometry(GridSpec(55.0, 100.0, unit="um"), n_sub=3, neighbor_radius=1)
    ck = save_checkpoint(tmp_path / "m", net, {"model": "deepspot", "model_args": net.config(),
                                                "encoder": {"name": TINY, "dim": 32}, "genes": ["A", "B", "C"],
                                                "geometry": geom.to_dict(), "scaler": None})
    rng = np.random.default_rng(0)
    img = (np.array([180, 90, 160], np.float32) + rng.normal(0, 25, (400, 400, 3))).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "he.png")
    return ck, tmp_path / "he.png"


def test_cli_predict_opens_the_slide_a_counted_number_of_times(model_and_slide, opens, tmp_path, capsys):
    ck, png = model_and_slide
    code, _, err = run_cli(capsys, "predict", png, "--model", ck, "--mpp", "0.5", "--out", tmp_path / "o",
                           "--no-progress", "--plot-genes", "0")
    assert code == 0, err
    assert set(opens) == {str(png)}
    assert len(opens) == CLI_OPENS, f"{len(opens)} opens"


def test_api_predict_opens_the_slide_a_counted_number_of_times(model_and_slide, opens, tmp_path):
    import deepspot as ds

    ck, png = model_and_slide
    ds.load_model(ck).predict_slide(png, tmp_path / "o", mpp=0.5, progress=False, n_plot=0)
    assert set(opens) == {str(png)}
    assert len(opens) == API_OPENS, f"{len(opens)} opens"


def test_api_in_memory_and_reader_workers_open_the_slide_once(model_and_slide, opens):
    """In memory, and with reader processes (they inherit the plan's handle or reopen in their own process,
    never in this one)."""
    import deepspot as ds

    ck, png = model_and_slide
    m = ds.load_model(ck)
    a = m.predict_slide(png, mpp=0.5, progress=False)
    assert a.n_obs > 0 and len(opens) == 1, f"{len(opens)} opens"
    opens.clear()
    m.predict_slide(png, mpp=0.5, progress=False, num_workers=1)
    assert len(opens) == 1, f"{len(opens)} opens"
