"""DeepSpot model math: masking, pooling, context modes, batched vs per-spot reference, checkpoints."""
import numpy as np
import pytest
import torch

from deepspot.config import SpotGeometry
from deepspot.models.bags import Bags, predict_bags
from deepspot.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deepspot.models.deepsets import CONTEXTS, DeepSpot, masked_max, masked_mean, masked_sum


def test_pooling_equals_hand_values():
    x = torch.tensor([[[1.0, -2.0], [3.0, 5.0], [100.0, 100.0]]])  # (1,3,2), last element padded
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(masked_sum(x, mask), torch.tensor([[4.0, 3.0]]))
    assert torch.equal(masked_max(x, mask), torch.tensor([[3.0, 5.0]]))
    assert torch.equal(masked_mean(x, mask), torch.tensor([[2.0, 1.5]]))
    # an empty bag pools to zero, not -inf
    empty = torch.zeros((1, 3), dtype=torch.bool)
    assert torch.equal(masked_max(x, empty), torch.zeros(1, 2))
    assert torch.equal(masked_sum(x, empty), torch.zeros(1, 2))


@pytest.mark.parametrize("context", CONTEXTS)
def test_padded_bag_elements_change_nothing(context):
    torch.manual_seed(0)
    m = DeepSpot(8, 5, hidden=16, n_ensemble=4, context=context).eval()
    spot, sub, nbr = torch.randn(3, 8), torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    base = m(spot, sub, torch.ones(3, 4, dtype=torch.bool), nbr, torch.ones(3, 2, dtype=torch.bool))
    # add 3 padded neighbours and 2 padded sub-spots filled with large values
    sub_p = torch.cat([sub, 50 * torch.randn(3, 2, 8)], dim=1)
    nbr_p = torch.cat([nbr, 50 * torch.randn(3, 3, 8)], dim=1)
    smask = torch.cat([torch.ones(3, 4, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.bool)], 1)
    nmask = torch.cat([torch.ones(3, 2, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.bool)], 1)
    padded = m(spot, sub_p, smask, nbr_p, nmask)
    assert torch.allclose(base, padded, atol=1e-6)
    if "neighbors" in context or "subspot" in context:  # and the padding does matter when unmasked
        unmasked = m(spot, sub_p, torch.ones_like(smask), nbr_p, torch.ones_like(nmask))
        assert not torch.allclose(base, unmasked, atol=1e-3)


def test_context_modes_use_their_inputs():
    torch.manual_seed(1)
    spot, sub, nbr = torch.randn(2, 6), torch.randn(2, 9, 6), torch.randn(2, 4, 6)
    sm, nm = torch.ones(2, 9, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    for context in CONTEXTS:
        m = DeepSpot(6, 3, hidden=8, n_ensemble=3, context=context).eval()
        out = m(spot, sub, sm, nbr, nm)
        assert out.shape == (2, 3)
        changed_sub = m(spot, sub + 1, sm, nbr, nm)
        changed_nbr = m(spot, sub, sm, nbr + 1, nm)
        assert torch.allclose(out, changed_sub) == ("subspot" not in context)
        assert torch.allclose(out, changed_nbr) == ("neighbors" not in context)
    with pytest.raises(ValueError, match="unknown context"):
        DeepSpot(6, 3, context="everything")


def reference_spot_prediction(model: DeepSpot, spot, subs, nbrs):
    """Straightforward per-spot DeepSpot math, one head at a time (plain loops)."""
    W1, b1 = model.phi.linear.weight.detach(), model.phi.linear.bias.detach()
    W2, b2 = model.rho.linear.weight.detach(), model.rho.linear.bias.detach()
    E = W1.shape[0]

    def phi(v):
        heads = [torch.relu(v @ W1[e] + b1[e]) for e in range(E)]
        return torch.stack(heads).median(dim=0).values

    parts = [phi(spot)]
    if model.use_subspots:
        parts.append(sum(phi(s) for s in subs))
    if model.use_neighbors:
        parts.append(torch.stack([phi(n) for n in nbrs]).max(dim=0).values if len(nbrs)
                     else torch.zeros(model.hidden))
    z = torch.relu(torch.cat(parts))
    return torch.stack([z @ W2[e] + b2[e] for e in range(E)]).mean(dim=0)


@pytest.mark.parametrize("context", CONTEXTS)
def test_batched_prediction_equals_per_spot_reference(context):
    torch.manual_seed(2)
    rng = np.random.default_rng(0)
    n, d, s = 23, 12, 9
    spot = rng.normal(size=(n, d)).astype(np.float32)
    sub = rng.normal(size=(n, s, d)).astype(np.float32)
    # ragged neighbour sets, some empty
    nbr_lists = [sorted(rng.choice([j for j in range(n) if j != i], size=rng.integers(0, 5), replace=False))
                 for i in range(n)]
    k = max(len(v) for v in nbr_lists)
    idx = np.zeros((n, k), np.int64)
    mask = np.zeros((n, k), bool)
    for i, v in enumerate(nbr_lists):
        idx[i, :len(v)] = v
        mask[i, :len(v)] = True
    model = DeepSpot(d, 7, hidden=32, n_ensemble=10, context=context).eval()
    got = predict_bags(model, Bags.from_numpy(spot, sub, idx, mask), batch_size=5)
    sp, sb = torch.from_numpy(spot), torch.from_numpy(sub)
    want = torch.stack([reference_spot_prediction(model, sp[i], sb[i], [sp[j] for j in nbr_lists[i]])
                        for i in range(n)]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    m = DeepSpot(10, 4, hidden=8, n_ensemble=3, context="spot_neighbors").eval()
    cfg = {"model": "deepspot", "encoder": {"name": "enc", "dim": 10}, "genes": ["A", "B", "C", "D"],
           "geometry": SpotGeometry().to_dict(), "scaler": None}
    save_checkpoint(tmp_path / "ck", m, cfg)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name != ".deepspot-run.json") == ["config.json", "model.safetensors"]
    m2, cfg2 = load_checkpoint(tmp_path / "ck", genes=["B", "D"], feature_dim=10)
    assert cfg2.genes == ["A", "B", "C", "D"] and cfg2.context == "spot_neighbors"
    x, nb = torch.randn(5, 10), torch.randn(5, 3, 10)
    nm = torch.ones(5, 3, dtype=torch.bool)
    assert torch.equal(m(x, neighbors=nb, neighbor_mask=nm), m2(x, neighbors=nb, neighbor_mask=nm))
    with pytest.raises(CheckpointError, match="1024-d|expects 10-d"):
        load_checkpoint(tmp_path / "ck", feature_dim=1024)
    with pytest.raises(CheckpointError, match="not predicted by this model.*XIST"):
        load_checkpoint(tmp_path / "ck", genes=["A", "XIST"])
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")
    # no leftovers from the atomic write
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_single_spot_without_neighbours_and_train_eval_rho_agree():
    torch.manual_seed(4)
    m = DeepSpot(6, 3, hidden=8, n_ensemble=4, context="spot_subspot_neighbors").eval()
    out = m(torch.randn(1, 6), torch.randn(1, 9, 6), torch.ones(1, 9, dtype=torch.bool),
            torch.zeros(1, 0, 6), torch.zeros(1, 0, dtype=torch.bool))
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    # the collapsed eval-time rho equals the mean over heads computed head by head
    z = torch.rand(5, m.rho.linear.weight.shape[1])
    heads = torch.stack([z @ m.rho.linear.weight[e] + m.rho.linear.bias[e] for e in range(4)]).mean(0)
    torch.testing.assert_close(m.rho(z), heads, atol=1e-6, rtol=1e-5)


def test_every_model_kind_is_bound_to_its_class_once():
    from deepspot.config import CELL_MODELS, MODEL_KINDS, ModelConfig
    from deepspot.models import registry
    from deepspot.models.convert import KINDS

    assert registry.available() == sorted(MODEL_KINDS) and set(CELL_MODELS) < set(MODEL_KINDS)
    assert {k: registry._MODELS[k].__name__ for k in MODEL_KINDS} == {
        "deepspot": "DeepSpot", "deepcell": "DeepCell", "deepspot2cell": "DeepSpot2Cell",
        "deepspot2cell-pooled": "PooledDeepSpot2Cell"}
    assert KINDS == ("deepspot", "deepcell", "deepspot2cell")  # what the original published
    with pytest.raises(CheckpointError, match="model"):
        ModelConfig.from_dict({"model": "not-a-kind"})
