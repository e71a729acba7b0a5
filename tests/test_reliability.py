"""Per-gene reliability and per-spot conformal intervals (deepspot.reliability), stored in the checkpoint
and carried into predictions and scores."""
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from deepspot.config import CheckpointError, GridSpec, ModelConfig, SpotGeometry
from deepspot.evaluation.metrics import pearson_per_gene
from deepspot.models.bags import Bags, predict_bags
from deepspot.models.checkpoint import read_config, save_checkpoint
from deepspot.models.deepsets import DeepSpot
from deepspot.reliability import (Intervals, Reliability, conformal_quantile, coverage_per_gene, gene_table,
                                  head_spread, predict_rows, reliable_first, shuffled_band)
from deepspot.training.recipe import SpotRecipe, fit_spot_model


def _planted(rng, n, g=20):
    """Exchangeable planted data: truth = prediction + noise whose sd (the 'spread') varies by spot."""
    pred = rng.normal(3, 1, size=(n, g))
    sd = rng.uniform(0.1, 2.0, size=(n, g))
    truth = pred + sd * rng.normal(size=(n, g))
    return pred, truth, sd


def test_conformal_quantile_is_the_finite_sample_rank():
    s = np.arange(1, 20, dtype=float)[:, None]  # n = 19 scores 1..19
    assert conformal_quantile(s, 0.9)[0] == 18  # ceil(20 * 0.9) = 18th smallest
    assert conformal_quantile(s, 0.5)[0] == 10
    assert np.isinf(conformal_quantile(s[:5], 0.9)[0])  # ceil(6 * 0.9) = 6 > 5: no finite quantile


def test_conformal_intervals_reach_nominal_coverage_and_widen_with_noise():
    rng = np.random.default_rng(0)
    p_cal, y_cal, sd_cal = _planted(rng, 400)
    p_te, y_te, sd_te = _planted(rng, 20000)
    for mode in ("head_spread", "constant"):
        iv = Intervals.calibrate(p_cal, y_cal, sd_cal, levels=(0.8, 0.9), mode=mode)
        for level in (0.8, 0.9):
            lo, hi = iv.bounds(p_te, sd_te, level)
            cov = coverage_per_gene(lo, hi, y_te)
            assert abs(cov.mean() - level) < 0.02, (mode, level, cov.mean())
            assert cov.min() > level - 0.06, (mode, level, cov.min())
    iv = Intervals.calibrate(p_cal, y_cal, sd_cal, levels=(0.9,))
    assert iv.mode == "head_spread" and iv.spread_informative > 0.3  # chosen because the spread tracks the error
    lo, hi = iv.bounds(p_te, sd_te, 0.9)
    width = hi - lo
    noisy, calm = sd_te > 1.5, sd_te < 0.5
    assert width[noisy].mean() > 2 * width[calm].mean()
    # where the spread is noisy the interval still covers: coverage conditional on noise level
    assert coverage_per_gene(np.where(noisy, lo, -np.inf), np.where(noisy, hi, np.inf), y_te).mean() > 0.85


def test_uninformative_spread_falls_back_to_a_constant_width():
    rng = np.random.default_rng(1)
    p, y, sd = _planted(rng, 300)
    iv = Intervals.calibrate(p, y, rng.uniform(0.1, 2.0, size=sd.shape), levels=(0.9,))  # spread unrelated
    assert iv.mode == "constant" and abs(iv.spread_informative) < 0.1
    lo, hi = iv.bounds(p, None, 0.9)
    assert np.allclose(hi - p, iv.q_at(0.9), atol=1e-5)  # one half width per gene
    assert np.allclose(lo, np.maximum(p - iv.q_at(0.9), np.minimum(p, 0)), atol=1e-5)  # log1p: not below 0
    with pytest.raises(ValueError, match="calibrated at 0.9"):
        iv.bounds(p, None, 0.95)


def test_shuffled_band_and_reliable_verdict():
    rng = np.random.default_rng(2)
    n = 150
    truth = rng.normal(size=(n, 3))
    pred = np.column_stack([truth[:, 0] + 0.3 * rng.normal(size=n), rng.normal(size=n), -truth[:, 2]])
    rel = Reliability.measure(pred, truth, levels=None)
    band = shuffled_band(pred, truth)
    assert np.allclose(rel.noise_band, band)
    assert 0.05 < band.max() < 0.3  # about 2 / sqrt(n) for 150 spots
    assert rel.reliable.tolist() == [True, False, False]  # anti-correlated is not reliable


def _fit(recipe=None, seed=3):
    rng = np.random.default_rng(seed)
    n, d, g = 240, 16, 6
    x = rng.normal(size=(n, d)).astype(np.float32)
    signal = x[:, :3] * np.array([1.0, 2.0, 3.0])
    y = np.column_stack([signal, rng.normal(size=(n, 3))]) + 5 + 0.5 * rng.normal(size=(n, g))
    y = y.astype(np.float32)  # genes 0-2 follow the image, genes 3-5 are noise
    bags = Bags.from_numpy(x, None, np.zeros((n, 0), np.int64), np.zeros((n, 0), bool))
    recipe = recipe or SpotRecipe(context="spot", hidden=32, n_ensemble=3, dropout=0.1, max_epochs=25, patience=25,
                                  batch_size=32, lr=3e-3)
    tr, va = np.arange(0, 170), np.arange(170, 240)
    model, scaler, summary = fit_spot_model(recipe, bags, y, tr, va, progress=False)
    return model, scaler, summary, bags, y, va


def test_stored_reliability_equals_a_hand_computation_on_the_validation_spots():
    model, scaler, summary, bags, y, va = _fit()
    stored = summary["reliability"]
    pred = scaler.inverse(predict_bags(model, bags))[va]
    hand = [np.corrcoef(pred[:, j], y[va, j])[0, 1] for j in range(y.shape[1])]
    assert np.allclose(stored["val_pearson"], hand, atol=1e-5)
    assert stored["n_val"] == len(va)
    assert stored["reliable"] == [v > b for v, b in zip(stored["val_pearson"], stored["noise_band"])]
    assert stored["reliable"][:3] == [True, True, True]  # the planted image genes
    # the conformal factor is the ceil((n+1) 0.9)-th smallest |error| / (head sd + eps) on those spots
    iv = stored["interval"]
    with head_spread(model) as spreads:
        predict_bags(model, bags)
    sd = np.concatenate(spreads)[va] * scaler.b
    score = np.abs(y[va] - pred) / (sd + np.asarray(iv["eps"])) if iv["mode"] == "head_spread" \
        else np.abs(y[va] - pred)
    k = int(np.ceil((len(va) + 1) * 0.9))
    assert np.allclose(iv["q"][iv["levels"].index(0.9)], np.sort(score, axis=0)[k - 1], rtol=1e-4)


def test_head_spread_is_the_sd_of_the_rho_heads_and_matches_chunked_prediction():
    torch.manual_seed(0)
    model = DeepSpot(8, 4, hidden=6, n_ensemble=3, context="spot").eval()
    x = torch.randn(10, 8)
    with head_spread(model) as spreads, torch.no_grad():
        out = model(x)
    with torch.no_grad():
        emb = torch.relu(model.embed(x))
        heads = torch.stack([emb @ model.rho.linear.weight[e] + model.rho.linear.bias[e] for e in range(3)])
    assert torch.allclose(out, heads.mean(0), atol=1e-5)
    assert np.allclose(spreads[0], heads.std(0, unbiased=False).numpy(), atol=1e-5)
    bags = Bags.from_numpy(x.numpy(), None, np.zeros((10, 0), np.int64), np.zeros((10, 0), bool))
    p, s = predict_rows(model, bags, np.array([7, 2, 5]), batch_size=2)
    assert np.allclose(p, out.numpy()[[7, 2, 5]], atol=1e-5) and np.allclose(s, spreads[0][[7, 2, 5]], atol=1e-5)


def test_reliability_round_trips_through_the_checkpoint(tmp_path):
    model, scaler, summary, bags, y, va = _fit()
    geometry = SpotGeometry(GridSpec(40.0, 60.0, unit="um"), n_sub=3, neighbor_radius=1)
    genes = [f"G{i}" for i in range(y.shape[1])]
    cfg = ModelConfig("deepspot", model.config(), _enc(16), genes, geometry, scaler,
                      extra={"reliability": summary["reliability"]})
    save_checkpoint(tmp_path / "m", model, cfg)
    back = read_config(tmp_path / "m")
    rel = Reliability.of(back)
    assert np.allclose(rel.val_pearson, summary["reliability"]["val_pearson"])
    t = gene_table(back)
    assert list(t.index) == genes and t["reliable"].dtype == "boolean"
    assert t.loc["G0", "rank"] <= 3 and t["reliable"].iloc[:3].all()
    assert reliable_first(back)[:3] == sorted(genes[:3], key=lambda g: -t.at[g, "val_pearson"])
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw["reliability"]["val_pearson"] = raw["reliability"]["val_pearson"][:2]
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="reliability"):
        Reliability.of(read_config(tmp_path / "m"))


def test_original_preset_stores_no_reliability():
    """The original trains on its validation spots (monitor train_loss): nothing held out to measure."""
    recipe = SpotRecipe(context="spot", hidden=16, n_ensemble=2, max_epochs=2, min_epochs=1, patience=2,
                        monitor="train_loss", batch_size=64)
    assert _fit(recipe)[2]["reliability"] is None


def _enc(dim):
    from deepspot.config import EncoderRef

    return EncoderRef("test-rel-enc", dim)


@pytest.fixture
def tiny_slide(tmp_path):
    from fixtures_cli import register_tiny_vit

    name = register_tiny_vit("test-rel-vit")
    rng = np.random.default_rng(0)
    img = tmp_path / "slide.png"
    Image.fromarray(rng.integers(0, 255, (200, 240, 3), dtype=np.uint8)).save(img)
    return img, name


def _checkpoint(tmp_path, enc_name, reliability: bool):
    torch.manual_seed(0)
    geometry = SpotGeometry(GridSpec(40.0, 60.0, unit="um"), n_sub=3, neighbor_radius=1)
    model = DeepSpot(32, 3, hidden=8, n_ensemble=3, context="spot_neighbors").eval()
    cfg = {"model": "deepspot", "encoder": {"name": enc_name, "dim": 32}, "genes": ["A", "B", "C"],
           "geometry": geometry.to_dict(), "scaler": None}
    if reliability:
        rng = np.random.default_rng(0)
        p = rng.normal(2, 1, size=(50, 3))
        rel = Reliability.measure(p, p + rng.normal(size=(50, 3)) * [0.1, 1.0, 3.0],
                                  rng.uniform(0.01, 0.1, size=(50, 3)), interval_mode="head_spread")
        cfg["reliability"] = rel.to_dict()
    path = tmp_path / ("new" if reliability else "old")
    save_checkpoint(path, model, cfg)
    return path


def test_predictions_carry_reliability_and_intervals(tmp_path, tiny_slide):
    import deepspot as ds

    img, enc = tiny_slide
    m = ds.load_model(_checkpoint(tmp_path, enc, True))
    a = m.predict_slide(img, mpp=1.0, tissue="none", progress=False, num_workers=0)
    assert list(a.var.columns[:2]) == ["val_pearson", "reliable"] and a.var["reliable"].dtype == bool
    assert np.allclose(a.var["val_pearson"], m.gene_table["val_pearson"])
    lo, hi = a.layers["lower"], a.layers["upper"]
    assert lo.shape == a.shape and (lo <= a.X + 1e-6).all() and (hi >= a.X - 1e-6).all() and (hi > lo).any()
    # the widths are q (head sd + eps) of the stored calibration, at the level asked for
    a8 = m.predict_slide(img, mpp=1.0, tissue="none", progress=False, num_workers=0, interval=0.8)
    assert (a8.layers["upper"] - a8.X <= hi - a.X + 1e-6).all() and (a8.layers["upper"] - a8.X < hi - a.X).any()
    with pytest.raises(ValueError, match="calibrated at"):
        m.predict_slide(img, mpp=1.0, tissue="none", progress=False, interval=0.7)
    out = m.predict_slide(img, out=tmp_path / "pred", mpp=1.0, tissue="none", progress=False, num_workers=0)
    assert np.allclose(np.asarray(out.layers["lower"][:]), lo) and np.allclose(np.asarray(out.layers["upper"][:]), hi)
    assert "val_pearson" in out.var


def test_old_checkpoint_without_reliability_loads_and_predicts(tmp_path, tiny_slide):
    import deepspot as ds

    img, enc = tiny_slide
    m = ds.load_model(_checkpoint(tmp_path, enc, False))
    assert m.gene_table["val_pearson"].isna().all() and m.gene_table["reliable"].isna().all()
    assert m.reliable_genes == []
    a = m.predict_slide(img, mpp=1.0, tissue="none", progress=False, num_workers=0)
    assert a.n_obs > 0 and np.isfinite(a.X).all()
    assert a.var["val_pearson"].isna().all() and not a.var["reliable"].any()
    assert "lower" not in a.layers and "upper" not in a.layers
    notes = list(a.uns["deepspot"]["notes"])
    assert len(notes) == 1 and "no validation" in notes[0]


def test_pictures_of_reliability(tmp_path):
    import deepspot as ds

    rng = np.random.default_rng(0)
    n = 30
    x = rng.uniform(0, 3, size=(n, 3)).astype(np.float32)
    a = ad.AnnData(X=x, var=pd.DataFrame(index=["A", "B", "C"]))
    a.obsm["spatial"] = rng.uniform(0, 100, size=(n, 2))
    a.var["val_pearson"], a.var["noise_band"], a.var["reliable"] = [0.1, 0.4, -0.05], [0.15, 0.15, 0.15], \
        [False, True, False]
    with pytest.raises(ValueError, match="no interval"):
        ds.pl.uncertainty(a)
    a.layers["lower"], a.layers["upper"] = x - 0.5, x + rng.uniform(0.1, 1.0, size=x.shape).astype(np.float32)
    axes = ds.pl.uncertainty(a, path=tmp_path / "u.png")
    assert (tmp_path / "u.png").stat().st_size > 0 and axes[0].get_title().startswith("B")  # the reliable gene
    width = axes[1].collections[0].get_array()
    assert np.allclose(width, a.layers["upper"][:, 1] - a.layers["lower"][:, 1])
    ax = ds.pl.gene_panel(a, path=tmp_path / "p.png")
    heights = [b.get_height() for b in ax.patches]
    assert heights == sorted(heights, reverse=True) and np.isclose(heights[0], 0.4)
    assert ds.pl.spatial(a, n_genes=1)[0].get_title() == "B"  # reliable genes first by default


def test_train_stores_reliability_and_score_reports_coverage(tmp_path_factory, capsys):
    """`deepspot train --manifest` stores the reliability; `deepspot score` adds per gene val_pearson
    (the stored one) and coverage, and their means per sample."""
    from test_score_cli import _sample

    from deepspot.cli import main

    root = tmp_path_factory.mktemp("rel_score")
    head = "sample_id,patient_id,image,expression,format,mpp,spot_diameter_um\n"
    (root / "train.csv").write_text(head + _sample(root, "A", 1) + _sample(root, "B", 2))
    (root / "test.csv").write_text(head + _sample(root, "C", 3))
    main(["train", "--manifest", str(root / "train.csv"), "--out", str(root / "model"), "--context", "spot",
          "--max-epochs", "3", "--n-top-genes", "12", "--no-progress"])
    cfg = read_config(root / "model")
    rel = Reliability.of(cfg)
    assert rel is not None and rel.n_val == cfg.training["n_val_spots"] and rel.interval is not None
    main(["score", "--model", str(root / "model"), "--manifest", str(root / "test.csv"), "--out", str(root / "s"),
          "--no-progress"])
    capsys.readouterr()
    per_gene, summary = pd.read_csv(root / "s" / "per_gene.csv"), pd.read_csv(root / "s" / "summary.csv")
    vp = per_gene.set_index("gene").loc[cfg.genes, "val_pearson"].to_numpy()
    assert np.allclose(vp, rel.val_pearson, equal_nan=True)
    cov = per_gene["coverage"].to_numpy()
    assert ((cov >= 0) & (cov <= 1)).all()
    assert np.isclose(summary.loc[0, "coverage_mean"], cov.mean()) and summary.loc[0, "interval"] == 0.9
    assert np.isclose(summary.loc[0, "val_pearson_mean"], np.nanmean(rel.val_pearson))


def test_spatialdata_output_carries_the_interval(tmp_path, tiny_slide):
    pytest.importorskip("spatialdata")
    import deepspot as ds

    img, enc = tiny_slide
    m = ds.load_model(_checkpoint(tmp_path, enc, True))
    a = m.predict_slide(img, mpp=1.0, tissue="none", progress=False, num_workers=0)
    sd = m.predict_slide(img, out=tmp_path / "sd", mpp=1.0, tissue="none", progress=False, num_workers=0,
                         as_spatialdata=True)
    t = sd.tables["table"]
    assert np.allclose(np.asarray(t.layers["lower"]), a.layers["lower"], atol=1e-5)
    assert np.allclose(np.asarray(t.layers["upper"]), a.layers["upper"], atol=1e-5)
    assert "reliable" in t.var
