"""DeepCell / DeepSpot2Cell: model math on random features, checkpoints, the neighbour rule kept from
training to prediction, bad input, and the CLI end to end on a few real NCBI858 cells."""
from __future__ import annotations

import logging
import types

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from deepspot.features.store import Features
from deepspot.datasets import ncbi858
from deepspot.config import CellGeometry
from deepspot.evaluation.holdout import score_holdout
from deepspot.inference.predict_cells import predict_cells
from deepspot.io.spatial import SpatialDataError, read_cell_table
from deepspot.models.deepcell import CellBags, DeepCell, cell_bags, cell_neighbors, predict_batches
from deepspot.models.deepcell import PooledDeepSpot2Cell as DeepSpot2Cell  # the spot-aggregation variant
from deepspot.models.checkpoint import load_checkpoint, read_config, save_checkpoint
from deepspot.training.fit_cells import SpotCellBags, drop_empty_spots, train_cell_model, train_spot2cell_model

from shared_data import HE as IMAGE, NCBI858, needs_data  # noqa: E402


def small(cls, d=8, g=5, **kw):
    torch.manual_seed(0)
    return cls(d, g, hidden=16, n_ensemble=3, **kw).eval()


def random_cells(n=30, d=8, k=4, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, d)).astype(np.float32)
    xy = rng.uniform(0, 100, size=(n, 2))
    return f, xy, CellBags.from_numpy(f, *cell_neighbors(CellGeometry(k=k), xy))


# ---------------------------------------------------------------- model math

@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_spot2cell_aggregation_equals_hand_computation(aggregate):
    f, xy, cells = random_cells()
    model = small(DeepSpot2Cell, aggregate=aggregate)
    members = [[0, 5, 7], [3], [10, 11, 12, 13]]
    c2s = -np.ones(len(f), dtype=np.int64)
    for s, m in enumerate(members):
        c2s[m] = s
    spots = SpotCellBags.from_assignment(cells, c2s, len(members))
    got = model(**spots.batch(torch.arange(3))).detach().numpy()
    with torch.no_grad():
        raw = model.cell_outputs(**cells.batch(torch.arange(len(f)))).numpy().astype(np.float64)
    for s, m in enumerate(members):
        if aggregate == "sum":  # rates exp(l) summed over the spot's cells, then log1p(normalize_total 1e4)
            rate = np.exp(raw[m]).sum(axis=0)
            want = np.log1p(1e4 * rate / rate.sum())
        else:  # log-space mean
            want = raw[m].mean(axis=0)
        np.testing.assert_allclose(got[s], want, rtol=1e-4, atol=1e-4)
    # per-cell expression is the same transform applied to one cell
    expr = predict_batches(model.cell_predictor(), cells)
    want_cell = np.log1p(1e4 * np.exp(raw) / np.exp(raw).sum(1, keepdims=True)) if aggregate == "sum" else raw
    np.testing.assert_allclose(expr, want_cell, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_padded_cells_and_neighbours_change_nothing(aggregate):
    rng = np.random.default_rng(1)
    model = small(DeepSpot2Cell, aggregate=aggregate)
    cells = torch.as_tensor(rng.normal(size=(2, 3, 8)), dtype=torch.float32)
    nbrs = torch.as_tensor(rng.normal(size=(2, 3, 4, 8)), dtype=torch.float32)
    cmask = torch.tensor([[True, True, False], [True, False, False]])
    nmask = torch.tensor([[[True, True, False, False]] * 3, [[True, False, False, False]] * 3])
    base = model(cell_mask=cmask, cells=cells, neighbors=nbrs, neighbor_mask=nmask)
    junk_c, junk_n = cells.clone(), nbrs.clone()
    junk_c[~cmask] = 1e4
    junk_n[~nmask] = -1e4
    junk_n[~cmask] = 7.0  # neighbours of padded cells too
    np.testing.assert_allclose(model(cell_mask=cmask, cells=junk_c, neighbors=junk_n, neighbor_mask=nmask).detach(),
                               base.detach(), rtol=1e-5, atol=1e-5)
    # one more all-padded cell slot: still the same
    wide = model(cell_mask=torch.cat([cmask, torch.zeros(2, 1, dtype=torch.bool)], 1),
                 cells=torch.cat([cells, torch.full((2, 1, 8), 3.0)], 1),
                 neighbors=torch.cat([nbrs, torch.zeros(2, 1, 4, 8)], 1),
                 neighbor_mask=torch.cat([nmask, torch.zeros(2, 1, 4, dtype=torch.bool)], 1))
    np.testing.assert_allclose(wide.detach(), base.detach(), rtol=1e-5, atol=1e-5)


def test_indexed_batches_equal_gathered_inputs():
    f, xy, cells = random_cells(n=40, k=6)
    model = small(DeepCell)
    ix = torch.tensor([3, 1, 30, 7])
    indexed = model(**cells.batch(ix))
    gathered = model(spot=cells.features[ix], neighbors=cells.features[cells.neighbor_idx[ix]],
                     neighbor_mask=cells.neighbor_mask[ix])
    np.testing.assert_allclose(indexed.detach(), gathered.detach(), rtol=1e-5, atol=1e-6)
    # DeepSpot2Cell: indexed spot batches equal gathered ones
    m2 = small(DeepSpot2Cell)
    c2s = np.arange(40) % 7
    spots = SpotCellBags.from_assignment(cells, c2s, 7)
    b = spots.batch(torch.arange(7))
    mem = spots.members[:, :b["cell_mask"].shape[1]]
    g = m2(cell_mask=b["cell_mask"], cells=cells.features[mem], neighbors=cells.features[cells.neighbor_idx[mem]],
           neighbor_mask=b["neighbor_mask"])
    np.testing.assert_allclose(m2(**b).detach(), g.detach(), rtol=1e-5, atol=1e-6)


def test_empty_spot_gives_zero_and_finite_gradient():
    model = small(DeepSpot2Cell).train()
    cells = torch.randn(2, 2, 8)
    out = model(cell_mask=torch.tensor([[True, False], [False, False]]), cells=cells,
                neighbors=torch.randn(2, 2, 3, 8), neighbor_mask=torch.ones(2, 2, 3, dtype=torch.bool))
    assert torch.all(out[1] == 0)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="aggregate"):
        DeepSpot2Cell(8, 3, aggregate="median")
    with pytest.raises(ValueError, match="context"):
        DeepCell(8, 3, context="spot")
    with pytest.raises(ValueError, match="neighbour rule"):
        CellGeometry(neighbors="delaunay")


# ---------------------------------------------------------------- training, checkpoints, prediction

def ncbi(n=None, seed=0):
    a = ncbi858()[0]
    if n is not None:
        a = a[np.sort(np.random.default_rng(seed).choice(a.n_obs, n, replace=False))].copy()
    return a


ENC = types.SimpleNamespace(name="random-test", dim=16)
FAST = dict(hidden=16, n_ensemble=2, max_epochs=3, patience=3, progress=False)


@needs_data(*NCBI858)
def test_neighbour_rule_kept_from_training_to_prediction(tmp_path, monkeypatch):
    cells = ncbi()
    feats = np.random.default_rng(0).normal(size=(cells.n_obs, ENC.dim)).astype(np.float32)
    geom = CellGeometry(20.0, neighbors="radius", radius=90.0, max_neighbors=12)
    res = train_cell_model(IMAGE, cells, ENC, geom, features=feats, **FAST)
    save_checkpoint(tmp_path / "m", res.model, res.config)
    model, cfg = load_checkpoint(tmp_path / "m")
    assert cfg.geometry == geom
    train_bags = cell_bags(feats, cells.obsm["spatial"], geom)
    pred_bags = cell_bags(feats, cells.obsm["spatial"], cfg.geometry)
    assert torch.equal(train_bags.neighbor_idx, pred_bags.neighbor_idx)
    assert train_bags.neighbor_mask.sum(1).max() == 12  # the cap is part of the rule
    # whole prediction path (features injected in place of the encoder) gives the training predictions
    from deepspot.features.store import match_centers

    monkeypatch.setattr("deepspot.inference.predict_cells.extract_to_store",  # the features of the centres asked for
                        lambda _slide, centers, *a, **k: Features(
                            spot=feats[match_centers(cells.obsm["spatial"], centers)], subspot=None))
    out = predict_cells(IMAGE, cells.obsm["spatial"], model, cfg, ENC, cell_ids=cells.obs_names, progress=False)
    np.testing.assert_allclose(out.X, res.cell_pred, rtol=1e-5, atol=1e-5)
    assert list(out.obs_names) == list(cells.obs_names)
    assert out.uns["deepspot"]["neighbors"] == "cell tile 20 px, context: cells within 90 px"
    lib = next(iter(out.uns["spatial"]))
    assert out.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"] == 20.0


@pytest.mark.parametrize("kind", ["deepcell", "deepspot2cell-pooled"])
def test_checkpoint_round_trip(tmp_path, kind):
    f, xy, cells = random_cells(d=16)
    model = small(DeepCell if kind == "deepcell" else DeepSpot2Cell, d=16, g=4,
                  **({"aggregate": "mean"} if kind != "deepcell" else {}))
    cfg = {"model": kind, "genes": ["a", "b", "c", "d"], "encoder": {"name": "x", "dim": 16},
           "geometry": CellGeometry(12.0, unit="um", k=5).to_dict()}
    save_checkpoint(tmp_path / kind, model, cfg)
    back, cfg2 = load_checkpoint(tmp_path / kind)
    assert type(back) is type(model) and cfg2.model_args == model.config()
    assert cfg2.geometry == CellGeometry(12.0, unit="um", k=5)
    from deepspot.models.deepcell import cell_predictor

    np.testing.assert_array_equal(predict_batches(cell_predictor(back), cells),
                                  predict_batches(cell_predictor(model), cells))


@needs_data(*NCBI858)
def test_spot2cell_learns_within_spot_variation():
    """Planted signal: each cell's expression is a function of its own features; spots pool 3 cells.
    Trained on spot sums only, DeepSpot2Cell must resolve the cells of a spot, which no per-spot value
    (not even the spot's true profile) can."""
    rng = np.random.default_rng(0)
    n, d, g = 240, 6, 5
    f = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, g)) * 0.9
    counts = rng.poisson(20 * np.exp(f @ w - 1)).astype(np.float32)
    xy = np.c_[rng.uniform(20, 1400, n), rng.uniform(20, 1200, n)]
    c2s = np.argsort(np.argsort(xy[:, 0], kind="stable"), kind="stable") // 3  # 3 cells per spot, by x
    spot_xy = np.stack([xy[c2s == s].mean(0) for s in range(n // 3)])
    spot_counts = np.stack([counts[c2s == s].sum(0) for s in range(n // 3)])
    spots = ad.AnnData(spot_counts, var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))
    spots.obsm["spatial"] = spot_xy
    cells = ad.AnnData(counts, var=spots.var.copy())
    enc = types.SimpleNamespace(name="planted", dim=d)
    res = train_spot2cell_model(IMAGE, spots, xy, c2s, enc, CellGeometry(neighbors="none"), features=f,
                                cell_counts=cells, hidden=32, n_ensemble=2, dropout=0.0, lr=3e-3, max_epochs=40,
                                patience=40, batch_size=32, progress=False, model="deepspot2cell-pooled")
    scores = score_holdout(res)
    ours, oracle = scores["deepspot2cell"]["pearson_mean"], scores["spot truth ÷ n cells"]["pearson_mean"]
    assert ours > oracle + 0.1, (ours, oracle)


# ---------------------------------------------------------------- bad input

def test_spot_without_cells_is_dropped_and_logged(caplog):
    spots = ad.AnnData(np.ones((3, 2), np.float32))
    with caplog.at_level(logging.WARNING):
        kept, c2s = drop_empty_spots(spots, np.array([0, 0, 2, -1]), source="s")
    assert kept.n_obs == 2 and list(c2s) == [0, 0, 1, -1]
    assert "dropping 1 of 3 spots that contain no cell" in caplog.text
    with pytest.raises(SpatialDataError, match="no spot contains a cell"):
        drop_empty_spots(spots, np.array([-1, -1]), source="s")


def test_cell_table_errors(tmp_path):
    p = tmp_path / "cells.csv"
    pd.DataFrame({"cx": [1.0], "cy": [2.0]}).to_csv(p, index=False)
    with pytest.raises(SpatialDataError, match=r"cells.csv: cell table needs centroid columns \['x', 'y'\]"):
        read_cell_table(p)
    ids, xy = read_cell_table(p, x_col="cx", y_col="cy")
    assert xy.tolist() == [[1.0, 2.0]] and list(ids) == ["0"]
    pd.DataFrame({"x": [1.0, np.nan], "y": [2.0, 3.0]}).to_csv(p, index=False)
    with pytest.raises(SpatialDataError, match="non-finite"):
        read_cell_table(p)
    with pytest.raises(SpatialDataError, match="not found"):
        read_cell_table(tmp_path / "none.csv")


@needs_data(*NCBI858)
def test_cells_outside_the_image_are_refused_or_dropped(caplog):
    cells = ncbi(20)
    cells.obsm["spatial"][0] = [5000.0, 10.0]
    with pytest.raises(SpatialDataError, match="1 of 20 cells lie outside the 1431x1249 image"):
        train_cell_model(IMAGE, cells, ENC, features=np.zeros((20, 16), np.float32), **FAST)
    from deepspot.io.spatial import inside_image

    with caplog.at_level(logging.WARNING):
        keep = inside_image(cells.obsm["spatial"], 1431, 1249, "t", drop_outside=True)
    assert keep.sum() == 19 and "dropping 1 of 20 cells" in caplog.text


# ---------------------------------------------------------------- CLI, real crops

def run_cli(args, capsys):
    from deepspot.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_data(*NCBI858)
def test_cli_train_predict_cells_end_to_end(tmp_path, capsys):
    sub = ncbi(30, seed=3)
    sub.write_h5ad(tmp_path / "cells.h5ad")
    cache = tmp_path / "feats"
    common = ["--image", str(IMAGE), "--adata", str(tmp_path / "cells.h5ad"), "--max-epochs", "2",
              "--patience", "2", "--cache-dir", str(cache), "--no-progress", "--k", "6"]
    code, out, err = run_cli(["train", "--model", "deepcell", "--out", str(tmp_path / "dc"), *common], capsys)
    assert code == 0, err
    assert "deepcell" in out and "ridge" in out
    cfg = read_config(tmp_path / "dc")
    assert cfg.model == "deepcell" and cfg.geometry.k == 6 and cfg.model_args["hidden"] == 1024
    code, out, err = run_cli(["train", "--model", "deepspot2cell", "--out", str(tmp_path / "s2c"), "--unit", "px",
                              "--spot-diameter", "160", "--spacing", "160", *common], capsys)
    assert code == 0, err
    s2c = read_config(tmp_path / "s2c")
    assert "spot truth" in out and s2c.model == "deepspot2cell" and "aggregate" not in s2c.model_args
    assert s2c.extra["spot_grid"]["spot_diameter"] == 160 and s2c.model_args["hidden"] == 512

    table = tmp_path / "table.csv"
    xy = sub.obsm["spatial"]
    pd.DataFrame({"cell_id": sub.obs_names, "x": xy[:, 0], "y": xy[:, 1]}).to_csv(table, index=False)
    code, out, err = run_cli(["predict-cells", str(table), "--image", str(IMAGE), "--model", str(tmp_path / "s2c"),
                              "--out", str(tmp_path / "pred"), "--cache-dir", str(cache), "--no-progress"], capsys)
    assert code == 0, err
    pred = ad.read_h5ad(tmp_path / "pred" / "NCBI858_cells.h5ad")
    assert pred.shape == (30, len(read_config(tmp_path / "s2c").genes))
    assert np.isfinite(pred.X).all() and list(pred.obs_names) == list(sub.obs_names)
    np.testing.assert_allclose(pred.obsm["spatial"], xy)
    assert "NCBI858" in pred.uns["spatial"] and (tmp_path / "pred" / "NCBI858_cells_genes.png").exists()

    # a spot-grid command given a cell model points to predict-cells; a spot model refused by predict-cells
    code, _, err = run_cli(["predict", str(IMAGE), "--model", str(tmp_path / "dc"), "--out", str(tmp_path / "x")],
                           capsys)
    assert code == 1 and "predict-cells" in err and len(err.strip().splitlines()) == 1
    pd.DataFrame({"cx": [1.0]}).to_csv(tmp_path / "bad.csv", index=False)
    code, _, err = run_cli(["predict-cells", str(tmp_path / "bad.csv"), "--image", str(IMAGE), "--model",
                            str(tmp_path / "dc")], capsys)
    assert code == 1 and "bad.csv: cell table needs centroid columns" in err


def test_cli_trains_deepcell_from_a_xenium_folder(tmp_path, capsys):
    from spatial_fakes import tissue_image, xenium_folder

    folder, xy_um, _, genes = xenium_folder(tmp_path, n_cells=24, width_um=120, height_um=100)
    image = tissue_image(tmp_path / "he.png", int(120 / 0.2125) + 1, int(100 / 0.2125) + 1)
    code, out, err = run_cli(["train", "--model", "deepcell", "--image", str(image), "--adata", str(folder),
                              "--out", str(tmp_path / "m"), "--max-epochs", "1", "--patience", "1", "--k", "5",
                              "--no-progress"], capsys)
    assert code == 0, err
    cfg = read_config(tmp_path / "m")
    assert cfg.model == "deepcell" and set(cfg.genes) <= set(genes) and "24 cells" in out
