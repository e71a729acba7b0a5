"""The spot training recipe: input projection, val-Pearson early stopping, recipe recorded and reloaded."""
import numpy as np
import pytest
import torch

from deepspot.config import ModelConfig, Scaler
from deepspot.models.bags import Bags, predict_bags
from deepspot.models.checkpoint import load_checkpoint, save_checkpoint
from deepspot.models.deepsets import DeepSpot, InputProjection
from deepspot.training.fit import KeepBest
from deepspot.training.module import mean_pearson_per_gene
from deepspot.training.recipe import SpotRecipe, build_spot_model, fit_spot_model


def test_input_projection_is_standardised_pca():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) * np.arange(1, 13) + 5.0  # dims on different scales, offset
    x[:, 3] = x[:, 2] * 2 + 0.01 * rng.normal(size=300)  # a redundant dim
    proj = InputProjection(12, 4).fit(torch.as_tensor(x, dtype=torch.float32))
    z = proj(torch.as_tensor(x, dtype=torch.float32)).numpy().astype(np.float64)
    # the same as sklearn's PCA on standardised features, up to the sign of each axis
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    ref = PCA(4).fit_transform(StandardScaler().fit_transform(x))
    for j in range(4):
        c = np.corrcoef(z[:, j], ref[:, j])[0, 1]
        assert abs(c) > 0.9999, (j, c)
    assert np.allclose(z.mean(axis=0), 0, atol=1e-4)
    assert np.all(np.diff(z.var(axis=0)) <= 1e-6)  # variance decreasing along the axes
    with pytest.raises(ValueError, match="needs more than 4 training spots"):
        InputProjection(12, 4).fit(torch.zeros(4, 12))


def test_projection_travels_with_the_checkpoint(tmp_path):
    rng = np.random.default_rng(1)
    recipe = SpotRecipe(hidden=8, n_ensemble=2, input_proj=6, context="spot_neighbors")
    feats = rng.normal(size=(40, 10)).astype(np.float32)
    model = build_spot_model(recipe, 10, 3, feats).eval()
    assert model.config()["input_proj"] == 6 and model.phi.linear.weight.shape[1] == 6
    idx = np.stack([np.roll(np.arange(40), 1), np.roll(np.arange(40), -1)], 1)
    bags = Bags.from_numpy(feats, None, idx, np.ones_like(idx, bool))
    before = predict_bags(model, bags)
    from deepspot.config import EncoderRef, SpotGeometry

    cfg = ModelConfig("deepspot", model.config(), EncoderRef("e", 10), ["a", "b", "c"], SpotGeometry(), None,
                      training={"recipe": recipe.to_dict()})
    save_checkpoint(tmp_path / "m", model, cfg)
    back, cfg2 = load_checkpoint(tmp_path / "m")
    assert torch.equal(back.proj.weight, model.proj.weight) and torch.equal(back.proj.mean, model.proj.mean)
    np.testing.assert_array_equal(predict_bags(back, bags), before)
    assert SpotRecipe(**cfg2.training["recipe"]) == recipe  # the run can be repeated exactly
    # the published architecture (no projection) is unchanged: same parameter names as before
    assert set(DeepSpot(10, 3).state_dict()) == {"phi.linear.weight", "phi.linear.bias", "rho.linear.weight",
                                                "rho.linear.bias"}


def test_recipe_checks_and_replace():
    r = SpotRecipe()
    assert r.replace(max_epochs=None, lr=0.5).lr == 0.5 and r.replace(max_epochs=None).max_epochs == r.max_epochs
    with pytest.raises(ValueError, match="neighbor_pool 'median'"):
        SpotRecipe(neighbor_pool="median")
    with pytest.raises(ValueError, match="unknown training option"):
        r.replace(learning_rate=1.0)


def test_mean_pearson_per_gene_and_keepbest_mode():
    rng = np.random.default_rng(2)
    t = rng.normal(size=(50, 4))
    p = t.copy()
    p[:, 3] = 1.0  # a constant prediction is left out, not averaged as 0
    got = float(mean_pearson_per_gene(torch.as_tensor(p), torch.as_tensor(t)))
    assert got == pytest.approx(1.0)
    p2 = t + rng.normal(size=t.shape)
    want = np.mean([np.corrcoef(p2[:, j], t[:, j])[0, 1] for j in range(4)])
    assert float(mean_pearson_per_gene(torch.as_tensor(p2), torch.as_tensor(t))) == pytest.approx(want, rel=1e-6)
    assert KeepBest("val_pearson").mode == "max" and KeepBest("val_loss").mode == "min"
    with pytest.raises(ValueError, match="unknown monitor"):
        KeepBest("val_r2")


def test_fit_spot_model_learns_and_scaler_round_trips():
    """Planted signal: targets are a linear map of the spot features; the recipe must find it, with
    targets standardised for training and predictions back on their own scale."""
    rng = np.random.default_rng(3)
    n, d, g = 240, 16, 5
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, :g] * np.array([1, 2, 3, 4, 5]) + 10 + 0.2 * rng.normal(size=(n, g))).astype(np.float32)
    idx = np.zeros((n, 0), np.int64)
    bags = Bags.from_numpy(x, None, idx, np.zeros((n, 0), bool))
    recipe = SpotRecipe(context="spot", hidden=32, n_ensemble=2, dropout=0.1, input_proj=None, max_epochs=30,
                        patience=30, batch_size=32, lr=3e-3)
    tr, va, te = np.arange(0, 160), np.arange(160, 200), np.arange(200, 240)
    model, scaler, summary = fit_spot_model(recipe, bags, y, tr, va, progress=False)
    assert isinstance(scaler, Scaler) and np.allclose(scaler.a, y[tr].mean(0), atol=1e-4)
    assert np.allclose(scaler.inverse(scaler.transform(y[tr])), y[tr], atol=1e-4)  # clipped only outside
    pred = scaler.inverse(predict_bags(model, bags))
    r = [np.corrcoef(pred[te, j], y[te, j])[0, 1] for j in range(g)]
    assert min(r) > 0.8, r
    assert abs(pred[te].mean() - y[te].mean()) < 1.0  # back on the targets' scale (mean 10)
    assert summary["monitor"] == "val_pearson" and summary["best_val"] > 0.8 and summary["best_epoch"] >= 1
