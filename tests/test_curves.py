"""training_curves.png: the per-epoch metrics of a fit, kept in its summary and drawn beside the checkpoint."""
import numpy as np
from PIL import Image

from deepspot.geometry.neighbors import array_neighbors
from deepspot.models.bags import Bags
from deepspot.training.curves import CURVES_FILE, plot_training_curves, write_curves
from deepspot.training.recipe import SpotRecipe, fit_spot_model


def _bags(n=100, d=8, g=3, seed=0):
    rng = np.random.default_rng(seed)
    spot = rng.normal(size=(n, d)).astype(np.float32)
    r, c = np.divmod(np.arange(n), 10)
    idx, m = array_neighbors(r, c, 1)
    return Bags.from_numpy(spot, None, idx, m), (spot @ rng.normal(size=(d, g))).astype(np.float32)


def test_fit_keeps_one_history_row_per_epoch_and_draws_it(tmp_path):
    bags, y = _bags()
    recipe = SpotRecipe(hidden=8, n_ensemble=2, context="spot_neighbors", max_epochs=4, min_epochs=4, patience=4)
    _, _, summary = fit_spot_model(recipe, bags, y, np.arange(80), np.arange(80, 100), progress=False)
    h = summary["history"]
    assert [r["epoch"] for r in h] == list(range(summary["epochs"]))
    assert all({"train_loss", "val_loss", "val_pearson"} <= set(r) for r in h)
    # the kept epoch is the best validation Pearson of the history
    assert max(h, key=lambda r: r["val_pearson"])["epoch"] == summary["best_epoch"]
    png = write_curves(tmp_path, summary, n_genes=3)
    assert png == tmp_path / CURVES_FILE
    im = np.asarray(Image.open(png).convert("L"))
    assert im.shape[1] > 600 and im.min() < 100  # a drawn figure, not a blank canvas


def test_no_history_no_file(tmp_path):
    assert plot_training_curves([], tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()
