"""Each training loss against values computed by hand with numpy."""
import pickle

import numpy as np
import pytest
import torch

from deepspot.models.losses import LOSSES, get_loss

RNG = np.random.default_rng(7)
P = RNG.normal(size=(6, 4))
T = RNG.normal(size=(6, 4)) + 0.5 * P


def _mse(p, t):
    return np.mean((p - t) ** 2)


def _cos(p, t):
    sims = [np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(p, t)]  # per spot
    return 1.0 - np.mean(sims)


def _pearson(p, t):
    rs = [np.corrcoef(p[:, g], t[:, g])[0, 1] for g in range(p.shape[1])]  # per gene, across spots
    return 1.0 - np.mean(rs)


def _poisson(p, t):
    return np.mean(np.exp(p) - t * p)  # log-rate input, exp applied once, Stirling term off


def _orig_cos(p, t):
    sims = [np.dot(p[:, g], t[:, g]) / (np.linalg.norm(p[:, g]) * np.linalg.norm(t[:, g]))
            for g in range(p.shape[1])]  # per gene, across spots, not centred
    return 1.0 - np.mean(sims)


def _orig_pearson(p, t):
    rs = [np.corrcoef(a, b)[0, 1] for a, b in zip(p, t)]  # per spot, across genes
    return 1.0 - np.mean(rs)


def _l1(p, t):
    return np.mean(np.abs(p - t))


def _huber(p, t):
    d = np.abs(p - t)
    return np.mean(np.where(d <= 1.0, 0.5 * d ** 2, d - 0.5))


HAND = {"mse": _mse, "cos": _cos, "pearson": _pearson, "poisson": _poisson,
        "mse_cos": lambda p, t: _mse(p, t) + _cos(p, t),
        "mse_pearson": lambda p, t: _mse(p, t) + _pearson(p, t),
        "l1": _l1, "huber": _huber,
        "original_cos": _orig_cos, "original_pearson": _orig_pearson,
        "original_mse_cos": lambda p, t: _orig_cos(p, t) + _mse(p, t),
        "original_mse_pearson": lambda p, t: _orig_cos(p, t) + 0.2 * _mse(p, t),
        "original_cell_mse_pearson": lambda p, t: 0.1 * _orig_cos(p, t) + _mse(p, t),
        "original_l1_cos": lambda p, t: _orig_cos(p, t) + _l1(p, t),
        "original_huber_cos": lambda p, t: _orig_cos(p, t) + _huber(p, t)}


def _torch(name, p, t):
    return float(get_loss(name)(torch.tensor(p, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)))


@pytest.mark.parametrize("name", sorted(HAND))
def test_loss_matches_hand_value(name):
    t = np.abs(T) if name == "poisson" else T  # Poisson targets are non-negative
    assert _torch(name, P, t) == pytest.approx(HAND[name](P, t), rel=1e-9, abs=1e-12)


def test_every_loss_is_checked():
    assert set(LOSSES) == set(HAND)


def test_pearson_is_per_gene_not_per_spot():
    # across spots every gene rises with its target (per-gene r = +1), while within each spot the
    # target falls across genes as the prediction rises (per-spot r = -1): the loss must be ~0, not ~2
    p = np.array([[0.0, 3.0, 6.0], [1.0, 4.0, 7.0], [2.0, 5.0, 8.0]])
    t = p + np.array([100.0, 50.0, 0.0])
    assert all(np.corrcoef(a, b)[0, 1] < -0.99 for a, b in zip(p, t))
    assert _torch("pearson", p, t) == pytest.approx(0.0, abs=1e-6)


def test_original_variants_differ_from_ours_where_the_original_does():
    # the same inputs give different values: the original's cosine is per gene (ours per spot), its spot
    # Pearson per spot (ours per gene), its mse_pearson weights differ
    p, t = 3.0 * P + 1.0, T  # scale and shift change the per-spot / per-gene cosines differently
    for ours, orig in (("cos", "original_cos"), ("pearson", "original_pearson"),
                       ("mse_pearson", "original_mse_pearson"), ("mse_cos", "original_mse_cos")):
        assert abs(_torch(ours, p, t) - _torch(orig, p, t)) > 1e-3, (ours, orig)
    # the original spot Pearson is blind to a per-spot shift of the prediction, ours is not
    shifted = p + np.arange(len(p))[:, None] * 5.0
    assert _torch("original_pearson", shifted, t) == pytest.approx(_torch("original_pearson", p, t), rel=1e-9)
    assert abs(_torch("pearson", shifted, t) - _torch("pearson", p, t)) > 1e-3


def test_huber_switches_to_linear_beyond_delta():
    p, t = np.array([[0.0, 0.0]]), np.array([[0.5, 3.0]])
    assert _torch("huber", p, t) == pytest.approx((0.5 * 0.25 + (3.0 - 0.5)) / 2, rel=1e-12)


def test_pearson_constant_gene_is_finite():
    p = P.copy()
    p[:, 0] = 1.0  # constant prediction for a gene: r = 0 for it, no NaN
    v = _torch("pearson", p, T)
    rs = [0.0] + [np.corrcoef(p[:, g], T[:, g])[0, 1] for g in range(1, 4)]
    assert np.isfinite(v) and v == pytest.approx(1.0 - np.mean(rs), abs=1e-6)


def test_poisson_exponentiates_once():
    p, t = np.log(np.full((2, 2), 3.0)), np.full((2, 2), 3.0)
    # rate 3, count 3: NLL (without log(3!)) = 3 - 3 log 3 (a double exp would give e^3 - 3*3)
    assert _torch("poisson", p, t) == pytest.approx(3.0 - 3.0 * np.log(3.0), rel=1e-9)


def test_losses_backprop_and_pickle():
    for name, fn in LOSSES.items():
        p = torch.tensor(P, requires_grad=True)
        fn(p, torch.tensor(np.abs(T))).backward()
        assert torch.isfinite(p.grad).all(), name
        assert pickle.loads(pickle.dumps(fn)) is fn  # module-level functions: DDP spawn / Ray can ship them


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("smooth_l2")
