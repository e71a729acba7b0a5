"""``deepspot demo --her2st`` on a reduced setting: the real HER2ST sections and images, a one-block ViT on
32-px crops with fixed random weights (test_predict_wsi's) instead of EfficientNet, 2 epochs, 20 genes."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from deepspot.demo import HER2ST_MARKERS, run_her2st_demo

from shared_data import HER2ST, needs_data
from test_predict_wsi import TINY, _tiny_vit, one_thread  # noqa: F401  (_tiny_vit: the tiny encoder, autouse)

pytestmark = needs_data(*HER2ST)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("her2st") / "demo"
    lines = []
    res = run_her2st_demo(out, encoder_name=TINY, n_top_genes=20, max_epochs=2, patience=2, progress=False,
                          echo=lines.append)
    return out, res, "\n".join(lines)


def test_her2st_demo_trains_scores_predicts_and_writes(demo):
    out, res, text = demo
    for name in ("predictions.h5ad", "predicted_genes.png", "C5_score.png", "scores.csv", "per_gene.csv",
                 "model/config.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "C2_score.png").exists()  # only the held-out section's plot is kept
    # the score table: the held-out section first, model next to ridge, every section a row
    t = res["scores"]
    assert list(t.index) == ["C5", "C2", "C3", "C4"]
    assert t.loc["C5", "role"] == "held out" and t.loc["C2", "role"].startswith("trained on")
    assert np.isfinite(t[["deepspot_r", "ridge_r", "noise95"]].to_numpy()).all()
    assert (t["spots"] > 150).all()
    # the whole held-out section on the model's virtual grid (100 µm spots at the ST pitch)
    a = ad.read_h5ad(out / "predictions.h5ad")
    g = a.uns["deepspot"]
    assert a.n_vars == 20 + len(HER2ST_MARKERS) and set(HER2ST_MARKERS) <= set(a.var_names)  # HVGs + markers
    assert a.n_obs > 150 and g["grid_spots"] > a.n_obs
    assert g["spot_diameter_px"] == pytest.approx(100 / 0.686, rel=0.03)
    assert a.uns["deepspot"]["context"] == "spot_neighbors"
    assert np.isfinite(a.X).all() and float(np.std(a.X)) > 0
    # what was chosen and the time of each step are printed
    assert "context 'spot_neighbors'" in text and "held out" in text and "ridge_r" in text
    assert {"read data", "train", "score", "predict section", "total"} <= set(res["seconds"])
    assert "seconds: read data" in text
    # the genes plotted are the best held-out ones, named in the panel titles
    held = res["per_gene"].query("sample_id == 'C5'").set_index("gene")["pearson"]
    assert res["genes_plotted"] == held.dropna().sort_values(ascending=False).index[:4].tolist()


def test_her2st_demo_refuses_a_held_out_section_it_trains_on(tmp_path):
    with pytest.raises(ValueError, match="must not be a training section"):
        run_her2st_demo(tmp_path / "x", train_sections=("C2", "C5"), test_section="C5", echo=lambda *_: None)
    assert not (tmp_path / "x").exists()
