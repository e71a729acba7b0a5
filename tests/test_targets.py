"""Targets: log-normalisation, gene panels decided on training samples only, missing genes, the target
scaler (inverted at prediction), and Leiden-cluster oversampling."""
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from deepspot.config import invert_scaler
from deepspot.io.spatial import SpatialDataError
from deepspot.training.oversampling import balanced_index, leiden_clusters, oversample_clusters
from deepspot.training.targets import (apply_scaler, check_panel, common_genes, fit_scaler, log_normalize, rank_hvgs,
                                       select_genes, select_panel)


N_GENES, N_VAR = 120, 10


def _sample(seed, n=120, genes=None, shift=0.0):
    """Counts where genes G0..G9 differ 10-fold between two spot groups (the highly variable ones) and the
    rest are Poisson noise; gene means spread over two decades so every mean bin mixes both kinds."""
    rng = np.random.default_rng(seed)
    all_genes = [f"G{i}" for i in range(N_GENES)]
    means = np.geomspace(2.0, 200.0, N_GENES)[np.random.default_rng(0).permutation(N_GENES)]
    group = rng.integers(0, 2, n)[:, None]
    rate = np.broadcast_to(means, (n, N_GENES)).copy()
    rate[:, :N_VAR] = means[:N_VAR] * np.where(group == 1, 1.8, 0.18) + shift
    X = rng.poisson(rate).astype(np.float32)
    a = ad.AnnData(X=X, var=pd.DataFrame(index=all_genes), obs=pd.DataFrame(index=[f"s{seed}_{i}" for i in range(n)]))
    return a[:, genes].copy() if genes is not None else a


def test_log_normalize_matches_scanpy_and_uses_the_whole_library():
    import scanpy as sc
    import scipy.sparse as sp

    a = _sample(0, n=6)
    a.X[2] = 0  # a spot without counts stays 0 (scanpy leaves it too)
    ref = a.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    np.testing.assert_allclose(log_normalize(a), ref.X, rtol=1e-5, atol=1e-6)
    b = a.copy()
    b.X = sp.csr_matrix(b.X)
    np.testing.assert_allclose(log_normalize(b), ref.X, rtol=1e-5, atol=1e-6)
    # a panel: the library size is still over all genes, columns in the panel's order
    np.testing.assert_allclose(log_normalize(b, genes=["G7", "G3"]), ref[:, ["G7", "G3"]].X, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not in the data"):
        log_normalize(a, genes=["G3", "nope"])


def test_hvgs_across_training_samples_rank_the_variable_genes_first():
    train = {"a": _sample(1), "b": _sample(2)}
    top = rank_hvgs(train, 10)
    assert sorted(top) == sorted(f"G{i}" for i in range(N_VAR))
    panel = select_panel(train, n_top=10)
    assert panel == top  # ranked, best first
    # the single-sample helper keeps its behaviour: scanpy's own top-n on the log data, in var order
    import scanpy as sc

    a = train["a"].copy()
    a.X = log_normalize(a)
    sc.pp.highly_variable_genes(a, n_top_genes=10, flavor="seurat")
    assert select_genes(train["a"], n_top=10) == list(a.var_names[a.var["highly_variable"]])


def test_panel_ignores_the_values_of_held_out_samples():
    train = {"a": _sample(1), "b": _sample(2)}
    test1 = {"t": _sample(3)}
    test2 = {"t": _sample(4, shift=500.0)}  # very different expression in the held-out sample
    assert select_panel(train, n_top=8, others=test1) == select_panel(train, n_top=8, others=test2)
    # ... but a gene absent from a held-out sample is not chosen (the panel must be scorable there)
    genes = [f"G{i}" for i in range(N_GENES) if i != 0]
    p = select_panel(train, n_top=8, others={"t": _sample(5, genes=genes)})
    assert "G0" not in p and len(p) == 8


def test_given_panel_missing_genes_error_or_intersect(caplog):
    s = {"a": _sample(1), "b": _sample(2, genes=[f"G{i}" for i in range(3, N_GENES)])}
    with pytest.raises(SpatialDataError, match=r"^b: 3 panel genes are missing from this sample \(G0, G1, G2\)"):
        select_panel(s, genes=["G0", "G1", "G2", "G5"])
    with caplog.at_level(logging.WARNING):
        assert check_panel(["G0", "G1", "G2", "G5"], s, on_missing="intersect") == ["G5"]
    assert "b: 3 panel genes missing" in caplog.text
    with pytest.raises(SpatialDataError, match="no panel gene is present in every sample"):
        check_panel(["G0"], s, on_missing="intersect")
    with pytest.raises(ValueError, match="on_missing"):
        check_panel(["G5"], s, on_missing="ignore")
    assert common_genes(s)[:2] == ["G3", "G4"]


@pytest.mark.parametrize("kind", ["standard", "minmax"])
def test_scaler_fitted_on_training_rows_and_inverted(kind):
    rng = np.random.default_rng(0)
    y = rng.gamma(2.0, 1.0, size=(50, 6)).astype(np.float32)
    y[:, 5] = 3.0  # a constant gene
    train = y[:30]
    sc = fit_scaler(train, kind)
    assert sc["kind"] == kind and len(sc["a"]) == 6 and sc["b"][5] == 1.0
    z = apply_scaler(train, sc)
    if kind == "standard":
        np.testing.assert_allclose(z[:, :5].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(z[:, :5].std(0), 1, atol=1e-4)
    else:
        np.testing.assert_allclose(z[:, :5].min(0), 0, atol=1e-6)
        np.testing.assert_allclose(z[:, :5].max(0), 1, atol=1e-6)
    # the statistics are the training rows' (not all rows'), and prediction inverts them exactly
    a, b = (train.mean(0), train.std(0)) if kind == "standard" else (train.min(0), train.max(0) - train.min(0))
    np.testing.assert_allclose(sc["a"], a, rtol=1e-6)
    np.testing.assert_allclose(sc["b"][:5], b[:5], rtol=1e-5)
    assert fit_scaler(y, kind) != sc
    np.testing.assert_allclose(invert_scaler(apply_scaler(train, sc), sc), train, rtol=1e-5, atol=1e-5)
    # rows beyond the training range come back clipped to it (the scaler keeps each gene's range)
    np.testing.assert_allclose(invert_scaler(apply_scaler(y, sc), sc), np.clip(y, train.min(0), train.max(0)),
                               rtol=1e-5, atol=1e-5)
    assert fit_scaler(train, None) is None and apply_scaler(train, None) is not None
    with pytest.raises(ValueError, match="unknown scaler"):
        fit_scaler(train, "robust")


def test_oversample_clusters_to_the_largest():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 1)
    pos = oversample_clusters(labels, seed=1)
    assert np.bincount(labels[pos]).tolist() == [10, 10, 10]
    assert set(range(15)) <= set(pos.tolist())  # every original spot is kept
    assert np.array_equal(pos, oversample_clusters(labels, seed=1))


def test_leiden_balanced_index_uses_training_rows_only():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 20)) * 4
    sizes = [60, 20, 8]
    y = np.concatenate([c + rng.normal(size=(n, 20)) for c, n in zip(centres, sizes)]).astype(np.float32)
    labels = leiden_clusters(y, resolution=0.3, seed=3)
    assert len(np.unique(labels)) >= 3
    assert np.array_equal(labels, leiden_clusters(y, resolution=0.3, seed=3))  # seeded
    train = np.arange(0, len(y), 2)  # held-out rows must never be drawn
    idx, lab = balanced_index(train, y, seed=3)
    assert set(idx.tolist()) == set(train.tolist())
    counts = np.bincount(lab[np.searchsorted(train, idx)])
    assert counts.min() == counts.max() == np.bincount(lab).max()
