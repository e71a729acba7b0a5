"""Training presets: the original's recipe (batch 1024, 10-15 epochs, early stop on the training loss with
patience 3, standard scaler, Leiden oversampling, top 5,000 seurat_v3 HVGs on counts) beside ours, the
preset name recorded in the checkpoint's recipe."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from deepspot.models.bags import Bags
from deepspot.training.recipe import PRESETS, SpotRecipe, fit_spot_model, preset_panel, spot_preset
from deepspot.training.targets import rank_hvgs, select_panel


def test_original_preset_is_the_published_recipe():
    r = spot_preset("original")
    assert (r.batch_size, r.min_epochs, r.max_epochs, r.patience) == (1024, 10, 15, 3)
    assert (r.monitor, r.scaler, r.oversample, r.hvg_flavor) == ("train_loss", "standard", True, "seurat_v3")
    assert (r.hidden, r.n_ensemble, r.dropout, r.subspot_pool, r.neighbor_pool) == (512, 10, 0.3, "sum", "max")
    assert (r.loss, r.lr, r.weight_decay) == ("mse", 1e-4, 1e-6)
    assert r.preset == "original" and spot_preset().preset == "deepspot" and spot_preset() == SpotRecipe()
    assert preset_panel("original") == (5000, 0.0) and preset_panel("original", 300) == (300, 0.0)
    assert preset_panel("deepspot", fallback_n_top=250) == (250, 0.1)
    assert spot_preset("original", batch_size=64, max_epochs=None).batch_size == 64  # options override it
    assert SpotRecipe(**PRESETS["original"].to_dict()) == PRESETS["original"]  # as recorded, as reloaded
    with pytest.raises(ValueError, match="unknown training preset"):
        spot_preset("published")


def _planted(n=120, d=8, g=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, :g] * 2.0 + 5.0 + 0.1 * rng.normal(size=(n, g))).astype(np.float32)
    y[: n // 6] += 4.0  # a small distinct group: its own Leiden cluster, oversampled
    idx = np.zeros((n, 0), np.int64)
    return Bags.from_numpy(x, None, idx, np.zeros((n, 0), bool)), y


def test_original_recipe_trains_10_to_15_epochs_on_every_spot_and_oversamples(tmp_path):
    bags, y = _planted()
    recipe = spot_preset("original", context="spot", hidden=16, n_ensemble=2)
    tr, va = np.arange(0, 100), np.arange(100, 120)
    model, scaler, summary = fit_spot_model(recipe, bags, y, tr, va, progress=False, log_dir=tmp_path)
    assert summary["monitor"] == "train_loss" and 10 <= summary["epochs"] <= 15
    assert summary["leiden_clusters"] >= 2
    assert summary["n_train_rows"] > 120  # the validation spots train too, small clusters repeated
    assert scaler.kind == "standard" and np.allclose(scaler.a, y.mean(0), atol=1e-4)  # fitted on all 120 spots
    # the kept weights are those of the lowest epoch-mean training loss, read when that epoch ended
    m = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    losses = m["train_loss"].dropna().to_numpy()
    assert len(losses) == summary["epochs"] and summary["best_val"] == pytest.approx(losses.min(), rel=1e-6)
    assert summary["best_epoch"] == int(np.argmin(losses))


def _counts(seed, n=80, g=40):
    rng = np.random.default_rng(seed)
    mu = rng.gamma(0.5, 4.0, size=g)
    disp = np.where(np.arange(g) % 5 == 0, 0.2, 5.0)  # every 5th gene overdispersed
    x = rng.negative_binomial(disp, disp / (disp + mu), size=(n, g)).astype(np.float32)
    return ad.AnnData(X=x, var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))


def test_seurat_v3_ranks_on_counts_as_scanpy_does():
    a = _counts(1)
    got = rank_hvgs({"s": a}, 10, flavor="seurat_v3")
    df = sc.pp.highly_variable_genes(a.copy(), n_top_genes=10, flavor="seurat_v3", inplace=False)
    df.index = a.var_names
    want = list(df[df["highly_variable"]].sort_values("highly_variable_rank").index)
    assert got == want
    assert got != rank_hvgs({"s": a}, 10)  # not the log-data seurat ranking
    both = select_panel({"a": a, "b": _counts(2)}, n_top=10, flavor="seurat_v3", min_fraction=0.0)
    assert len(both) == 10 and len(set(both)) == 10
    with pytest.raises(ValueError, match="unknown HVG flavor"):
        rank_hvgs({"s": a}, 10, flavor="cell_ranger_v9")


def test_api_train_with_the_original_preset_records_it(tmp_path):
    """ds.train(..., preset='original') on a generated image: the checkpoint's recipe says so."""
    import json

    import torch
    from PIL import Image

    import deepspot as ds
    from deepspot.config import GridSpec, SpotGeometry
    from deepspot.features.encoders import EncoderSpec, register_encoder
    from deepspot.geometry.grid import make_grid

    register_encoder(EncoderSpec("test-pixel-probe", 48, 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                                 lambda _p: torch.nn.Flatten(), "pixels as features (tests)", False,
                                 arch=torch.nn.Flatten), overwrite=True)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(180, 180, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "he.png")
    grid = GridSpec(16, 20, "square", "px")
    spots = make_grid(180, 180, grid)
    counts = _counts(3, n=len(spots), g=60)
    counts.obs = pd.DataFrame({"array_row": spots["array_row"].to_numpy(), "array_col": spots["array_col"].to_numpy()},
                              index=[f"s{i}" for i in range(len(spots))])
    counts.obsm["spatial"] = spots[["x", "y"]].to_numpy()
    m = ds.train(counts, image=tmp_path / "he.png", encoder="test-pixel-probe", geometry=SpotGeometry(grid),
                 preset="original", n_top_genes=20, hidden=16, n_ensemble=2, out=tmp_path / "m", progress=False)
    rec = json.loads((tmp_path / "m" / "config.json").read_text())["training"]["recipe"]
    assert rec["preset"] == "original" and rec["batch_size"] == 1024 and rec["monitor"] == "train_loss"
    assert rec["hidden"] == 16 and rec["dropout"] == 0.3  # an option given overrides the preset, the rest stays
    assert rec["hvg_flavor"] == "seurat_v3" and rec["oversample"] is True
    assert len(m.config.genes) == 20 and 10 <= m.config.training["epochs"] <= 15
    with pytest.raises(ValueError, match="presets are for spot models"):
        ds.train(counts, image=tmp_path / "he.png", model="deepcell", preset="original")


def test_evaluate_options_left_at_default_take_the_presets():
    from deepspot.cli.evaluate import recipe_from_options

    r = recipe_from_options("original", {"lr": SpotRecipe().lr, "batch_size": 256, "scaler": "none",
                                         "oversample": None})
    assert r.preset == "original" and r.lr == 1e-4 and r.batch_size == 256 and r.scaler == "none"
    assert r.oversample is True and r.monitor == "train_loss"
    assert recipe_from_options("deepspot", {"batch_size": 256}) == SpotRecipe(batch_size=256)
