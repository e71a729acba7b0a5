"""Patient-level evaluation: folds, no leakage from held-out patients, same seed -> same numbers, outputs,
and `deepspot evaluate` end to end on a manifest of generated Space Ranger folders."""
import json
import logging
import re

import numpy as np
import pandas as pd
import pytest
import torch
from spatial_fakes import spaceranger_folder

from deepspot.evaluation.cv import (NOISE, ORACLE, RIDGE, EvalConfig, evaluate, noise_band, patient_folds, section_table,
                                   stack_bags)
from deepspot.training.recipe import SpotRecipe, block_validation
from deepspot.features.encoders import EncoderSpec, register_encoder
from deepspot.features.store import Features
from deepspot.training.manifest import her2st_manifest, load_sample
from deepspot.training.targets import log_normalize, rank_hvgs, select_panel

from shared_data import her2st_with_signal, HER2ST, require_data  # noqa: E402


def test_patient_folds_and_block_validation():
    pats = ["p3", "p1", "p2", "p1", "p4", "p5"]
    assert patient_folds(pats, "lopo") == [["p1"], ["p2"], ["p3"], ["p4"], ["p5"]]
    k = patient_folds(pats, 2, seed=1)
    assert len(k) == 2 and sorted(sum(k, [])) == ["p1", "p2", "p3", "p4", "p5"]  # a partition of patients
    assert k == patient_folds(pats, 2, seed=1) and k != patient_folds(pats, 2, seed=5)
    with pytest.raises(ValueError, match="at least 2 patients"):
        patient_folds(["p1", "p1"], "lopo")
    with pytest.raises(ValueError, match="6 folds but only 5 patients"):
        patient_folds(pats, 6)
    # validation: the top 20% of the array rows of EVERY training sample; a tiny sample trains only
    rows = [np.arange(0, 50), np.arange(50, 100), np.arange(100, 105)]
    arr = [np.arange(50) % 10, np.arange(50) // 5, np.zeros(5)]
    tr, va = block_validation(rows, arr, 0.2)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(105)) and not set(tr) & set(va)
    assert set(va) == set(np.flatnonzero(arr[0] >= 8)) | set(50 + np.flatnonzero(arr[1] >= 8))
    assert set(range(100, 105)) <= set(tr)
    with pytest.raises(ValueError, match="folds must be"):
        EvalConfig(folds=1)
    with pytest.raises(ValueError, match="unknown context"):
        EvalConfig(contexts=("spot", "cells"))
    with pytest.raises(TypeError, match="recipe must be a SpotRecipe"):
        EvalConfig(recipe={"hidden": 16})
    with pytest.raises(TypeError, match="hidden"):  # training settings live in the recipe, nowhere else
        EvalConfig(hidden=16)


@pytest.fixture(scope="module")
def her2st():
    """Three bundled sections (real counts) with features that carry expression signal (no encoding)."""
    return her2st_with_signal(("C2", "C3", "C4"), n_sub=4)


def _cfg(recipe=None, **kw):
    """The small evaluation of these tests: ``recipe`` changes its training recipe, ``kw`` the rest."""
    train = dict(max_epochs=5, patience=5, hidden=16, n_ensemble=2, dropout=0.0, lr=1e-2, batch_size=16, seed=11)
    base = dict(contexts=("spot",), n_top_genes=30, ridge_pca=16)
    return EvalConfig(recipe=SpotRecipe(**{**train, **(recipe or {})}), **{**base, **kw})


def test_stack_bags_keeps_neighbours_within_their_sample(her2st):
    samples, feats = her2st
    bags, owner = stack_bags(samples, feats, radius=1)
    assert len(bags) == sum(s.adata.n_obs for s in samples) == len(owner)
    m = bags.neighbor_mask.numpy()
    nb_owner = owner[bags.neighbor_idx.numpy()]
    assert m.any() and (nb_owner[m] == np.repeat(owner[:, None], m.shape[1], 1)[m]).all()
    assert torch.equal(bags.spot[owner == 2], torch.as_tensor(feats["C4"].spot))


def test_evaluate_no_leakage_and_same_seed_same_numbers(her2st, tmp_path):
    samples, feats = her2st
    res = evaluate(samples, cfg=_cfg(), features=feats, out_dir=tmp_path)
    assert set(res.scores["method"]) == {RIDGE, "deepspot spot", ORACLE, NOISE}
    assert sorted(res.scores["sample"].unique()) == ["C2", "C3", "C4"] and len(res.scores) == 12
    for info in res.folds:
        test = set(info["test_samples"])
        assert not test & set(info["train_samples"])  # held out means held out
        assert len(info["train_samples"]) == 2 and info["n_val_spots"] > 0  # both train, each gives a block
        assert info["n_train_spots"] + info["n_val_spots"] == sum(s.adata.n_obs for s in samples
                                                                   if s.sample_id not in test)
        train = {s.sample_id: s.adata for s in samples if s.sample_id not in test}
        assert info["panel"] == select_panel(train, n_top=30, others={t: next(s.adata for s in samples
                                                                              if s.sample_id == t) for t in test})
        assert info["top_eval"] == info["panel"][:30]
    # expression is in the features: the baseline finds it, and so does DeepSpot after a few epochs
    summ = res.summary
    table = section_table(res.scores)
    assert list(table.index) == ["C2", "C3", "C4", "mean"] and NOISE in table.columns
    # the shuffled band sits well below a model that found the signal
    assert (table[NOISE] < table[RIDGE]).all()
    assert summ.loc[RIDGE, "pearson_mean"] > 0.15
    assert summ.loc["deepspot spot", "pearson_mean"] > 0.08
    for name in ("scores.csv", "summary.csv", "per_gene.csv", "evaluation.png", "evaluation.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    stored = json.loads((tmp_path / "evaluation.json").read_text())["config"]
    recipe = {k: v for k, v in _cfg().recipe.to_dict().items() if k != "context"}  # contexts replace it
    assert stored["recipe"] == recipe and stored["contexts"] == ["spot"] and stored["n_top_genes"] == 30
    back = pd.read_csv(tmp_path / "scores.csv")
    assert {"fold", "sample", "method", "pearson_mean", "pearson_top50", "spearman_mean", "mse"} <= set(back.columns)
    again = evaluate(samples, cfg=_cfg(), features=feats)
    pd.testing.assert_frame_equal(res.scores, again.scores)  # same seed, same numbers


def test_evaluate_scaler_and_oversampling(her2st):
    samples, feats = her2st
    res = evaluate(samples, cfg=_cfg(dict(scaler="standard", oversample=True, max_epochs=2), folds=2),
                   features=feats)
    for info in res.folds:
        assert info["scaler"] == "standard" and info["leiden_clusters"] >= 2
        assert info["n_train_rows"] > info["n_train_spots"]  # small clusters repeated
    assert np.isfinite(res.summary["pearson_mean"]).all()
    assert (res.summary.loc[[RIDGE, "deepspot spot"], "mse"] < 5).all()  # back on the log1p scale (scaler inverted)


def test_missing_features_and_duplicate_samples(her2st):
    samples, feats = her2st
    with pytest.raises(ValueError, match=r"no features for samples \['C4'\]"):
        evaluate(samples, cfg=_cfg(), features={k: v for k, v in feats.items() if k != "C4"})
    with pytest.raises(ValueError, match="duplicated sample ids"):
        evaluate(samples + samples[:1], cfg=_cfg(), features=feats)


# --------------------------------------------------------------------------- CLI on generated Space Ranger data


class Tiny(torch.nn.Module):
    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def _tiny_encoder():
    try:
        register_encoder(EncoderSpec("tiny-test", 8, 16, (0.5,) * 3, (0.5,) * 3, lambda p: Tiny(), "test", False,
                                     arch=Tiny))
    except Exception:  # already registered in this process
        pass


def test_cli_evaluate_manifest_of_spaceranger_folders(tmp_path, capsys):
    from deepspot.cli import main

    _tiny_encoder()
    rows = []
    for i, (sid, pid) in enumerate([("A1", "p1"), ("A2", "p1"), ("B1", "p2")]):
        out, image, _ = spaceranger_folder(tmp_path, name=sid, seed=i, width=700, height=600, mpp=1.0)
        rows.append({"sample_id": sid, "patient_id": pid, "image": image.name, "expression": sid, "mpp": 1.0})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    out = tmp_path / "eval"
    main(["evaluate", "--manifest", str(tmp_path / "manifest.csv"), "--out", str(out), "--encoder", "tiny-test",
          "--contexts", "spot,spot_subspot_neighbors", "--n-top-genes", "10", "--max-epochs", "2",
          "--hidden", "8", "--n-ensemble", "2", "--no-progress"])  # returns normally on success
    scores = pd.read_csv(out / "scores.csv")
    assert sorted(scores["sample"].unique()) == ["A1", "A2", "B1"]
    # both samples of patient p1 are held out in the same fold
    assert scores.loc[scores["sample"].isin(["A1", "A2"]), "fold"].nunique() == 1
    assert (out / "evaluation.png").exists() and any((out / "features").iterdir())  # features cached per sample
    assert "ridge (PCA-256)" in capsys.readouterr().out
    recipe = json.loads((out / "evaluation.json").read_text())["config"]["recipe"]
    assert (recipe["max_epochs"], recipe["hidden"], recipe["n_ensemble"]) == (2, 8, 2)  # the options trained
    assert recipe["lr"] == SpotRecipe().lr and recipe["preset"] == "deepspot"  # the rest: the preset's

    # a panel gene missing from one sample: one line naming the sample and the gene, exit 1
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--manifest", str(tmp_path / "manifest.csv"), "--out", str(out), "--encoder", "tiny-test",
              "--genes", "G1,G2,NOPE", "--max-epochs", "1", "--no-progress"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"error: [AB][12]: 1 panel genes are missing from this sample \(NOPE\)$", err[0])


# --------------------------------------------------------------------------- fit: seed, precision, loggers, sharding


def _toy_bags(n=240, d=16, g=6, seed=0):
    from deepspot.geometry.neighbors import array_neighbors
    from deepspot.models.bags import Bags

    rng = np.random.default_rng(seed)
    spot = rng.normal(size=(n, d)).astype(np.float32)
    r, c = np.divmod(np.arange(n), 20)
    idx, m = array_neighbors(r, c, 1)
    y = (spot @ rng.normal(size=(d, g)) / 4).astype(np.float32)
    return Bags.from_numpy(spot, rng.normal(size=(n, 4, d)).astype(np.float32), idx, m), y


def _fit_once(seed, **kw):
    from deepspot.models.deepsets import DeepSpot
    from deepspot.training.fit import fit

    bags, y = _toy_bags()
    torch.manual_seed(seed)  # model init is the caller's, as in evaluate()
    model = DeepSpot(16, 6, hidden=8, n_ensemble=2)
    out = fit(model, bags, y, np.arange(180), np.arange(180, 240), max_epochs=3, patience=3, seed=seed,
              progress=False, batch_size=32, **kw)
    return out, {k: v.clone() for k, v in model.state_dict().items()}


def test_fit_same_seed_same_weights_and_no_leftover_state():
    det = torch.are_deterministic_algorithms_enabled()
    level = logging.getLogger("lightning.pytorch").level
    a, wa = _fit_once(5)
    b, wb = _fit_once(5)
    c, wc = _fit_once(6)
    assert a == b and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert torch.are_deterministic_algorithms_enabled() == det  # the run's flag is not left behind
    assert logging.getLogger("lightning.pytorch").level == level


def test_fit_precision_and_loggers(tmp_path, caplog):
    from deepspot.training.fit import resolve_precision

    assert resolve_precision("32") == "32-true" and resolve_precision("bf16") == "bf16-mixed"
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("fp16", "cpu") == "bf16-mixed"
    assert "fp16 mixed precision is not available on CPU" in caplog.text
    assert resolve_precision("fp16", "gpu") == "16-mixed"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8")
    out, _ = _fit_once(5, precision="bf16", log_dir=tmp_path / "csv")
    assert out["precision"] == "bf16-mixed" and np.isfinite(out["best_val_loss"])
    metrics = list((tmp_path / "csv").rglob("metrics.csv"))
    assert metrics and "val_loss" in pd.read_csv(metrics[0]).columns
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _fit_once(5, log_dir=tmp_path / "tb", loggers="tensorboard")
    try:
        import tensorboard  # noqa: F401

        assert list((tmp_path / "tb").rglob("events.out.tfevents*"))
    except ImportError:  # a clear message, and the curves still land in CSV
        assert "needs the `tensorboard` package" in caplog.text
        assert list((tmp_path / "tb").rglob("metrics.csv"))
    with pytest.raises(ValueError, match="unknown logger"):
        _fit_once(5, log_dir=tmp_path / "x", loggers="wandb")


def test_index_batch_sampler_shards_whole_batches(monkeypatch):
    from deepspot.training import fit as F

    index = np.arange(100, 170)  # 70 spots, batches of 16 -> 5 batches
    s = F.IndexBatchSampler(index, 16, shuffle=True, seed=3)
    s.set_epoch(2)
    one = list(s)
    assert len(one) == 5 == len(s) and sorted(torch.cat(one).tolist()) == index.tolist()
    s.set_epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(one, list(s)))  # an epoch's order is a function of the seed
    ranks = []
    for r in (0, 1):
        monkeypatch.setattr(F, "_dist_info", lambda r=r: (r, 2))
        s.set_epoch(2)
        ranks.append(list(s))
        assert len(s) == 3
    assert [len(x) for x in ranks] == [3, 3]  # same number of steps on both ranks (one batch wrapped)
    assert ranks[0] + ranks[1] != [] and {tuple(b.tolist()) for b in ranks[0] + ranks[1]} == \
        {tuple(b.tolist()) for b in one}
    monkeypatch.setattr(F, "_dist_info", lambda: (1, 2))
    v = F.IndexBatchSampler(index, 16, shuffle=False, shard=False)
    assert len(list(v)) == 5  # validation: every rank sees every batch


def test_noise_band_is_what_shuffled_predictions_score():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(200, 6))
    pred = truth + 0.1 * rng.normal(size=truth.shape)  # almost perfect predictions
    band = noise_band(pred, truth, np.arange(6), n=200, seed=1)
    assert 0 < band < 0.2  # chance level for 200 spots, far below the real r ~ 0.99
    assert noise_band(pred, truth, np.arange(6), n=50, seed=1) == noise_band(pred, truth, np.arange(6), n=50, seed=1)
