"""The fused DeepSpot heads give the numbers of the computation they replace.

- ReLU after the median instead of before: exact (ReLU is monotone, so it commutes with the median),
  asserted bit-identical;
- the E heads as one (M, d) @ (d, E*h) matmul instead of ``baddbmm`` over an expanded input: the same
  dot products, but BLAS may block a wider matmul differently, so asserted to 1e-6 (bit-identical at the
  model sizes benchmarks/model_only.py prints, not guaranteed on every BLAS);
- rho at eval as one linear map with the mean weights instead of the mean of E heads: float
  reassociation, asserted to 1e-6 relative.
"""
from __future__ import annotations

import pytest
import torch

from deepspot.models.deepsets import DeepSpot, EnsembleLinear, Phi


def unfused_heads(lin: EnsembleLinear, x: torch.Tensor) -> torch.Tensor:
    """(..., in) -> (E, ..., out): the per-head computation the fused matmul replaced."""
    flat = x.reshape(1, -1, x.shape[-1])
    out = torch.baddbmm(lin.bias.unsqueeze(1), flat.expand(lin.weight.shape[0], -1, -1), lin.weight)
    return out.reshape(lin.weight.shape[0], *x.shape[:-1], lin.weight.shape[2])


def unfused_phi(phi: Phi, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(unfused_heads(phi.linear, x)).median(dim=0).values


def unfused_forward(model: DeepSpot, spot, subspots, subspot_mask, neighbors, neighbor_mask) -> torch.Tensor:
    """DeepSpot.forward at eval as it was computed before the fusions (mean over rho's E heads)."""
    from deepspot.models.deepsets import POOLS

    parts = [unfused_phi(model.phi, spot), POOLS[model.subspot_pool](unfused_phi(model.phi, subspots), subspot_mask),
             POOLS[model.neighbor_pool](unfused_phi(model.phi, neighbors), neighbor_mask)]
    x = torch.relu(torch.cat(parts, dim=-1))
    return unfused_heads(model.rho.linear, x).mean(dim=0)


@pytest.mark.parametrize("e", [1, 2, 5, 10])
def test_relu_after_the_median_is_bit_identical(e):
    torch.manual_seed(e)
    phi = Phi(16, 8, e, 0.3).eval()
    z = phi.linear.heads_last(torch.randn(3, 7, 16))  # (..., E, h)
    z[0, 0] = 0.0  # ties at zero, where ReLU clamps
    assert torch.equal(torch.relu(z.median(dim=-2).values), torch.relu(z).median(dim=-2).values)


@pytest.mark.parametrize("shape", [(64, 1024, 512, 10), (33, 1280, 256, 5), (5, 7, 3, 2)])
def test_fused_heads_match_baddbmm(shape):
    m, d, h, e = shape
    torch.manual_seed(0)
    lin = EnsembleLinear(e, d, h)
    x = torch.randn(m, 3, d)
    ref, got = unfused_heads(lin, x), lin(x)
    assert got.shape == ref.shape == (e, m, 3, h)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    assert torch.equal(lin.heads_last(x).movedim(-2, 0), got)
    phi = Phi(d, h, e, 0.3).eval()
    assert torch.allclose(phi(x), unfused_phi(phi, x), rtol=0, atol=1e-6 * float(ref.abs().max()))


def test_model_matches_the_unfused_computation():
    torch.manual_seed(0)
    b, d, g = 12, 96, 20
    model = DeepSpot(d, g, hidden=32, n_ensemble=10).eval()
    inputs = dict(spot=torch.randn(b, d), subspots=torch.randn(b, 9, d), subspot_mask=torch.ones(b, 9, dtype=bool),
                  neighbors=torch.randn(b, 6, d), neighbor_mask=torch.rand(b, 6) > 0.3)
    with torch.no_grad():
        got, ref = model(**inputs), unfused_forward(model, **inputs)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    assert not torch.equal(got, torch.zeros_like(got))


def test_training_forward_unchanged_and_parameter_names_kept():
    """In training the heads keep their (E, ..., h) layout, so a seeded run draws the same dropout masks and
    gets the same loss as the unfused computation; checkpoint names stay phi.linear.* / rho.linear.*."""
    torch.manual_seed(0)
    model = DeepSpot(24, 6, hidden=8, n_ensemble=5, context="spot").train()
    assert sorted(model.state_dict()) == ["phi.linear.bias", "phi.linear.weight", "rho.linear.bias",
                                          "rho.linear.weight"]
    x = torch.randn(10, 24)
    torch.manual_seed(1)
    got = model(x)
    torch.manual_seed(1)
    z = torch.relu(model.phi.dropout(unfused_heads(model.phi.linear, x))).median(dim=0).values
    ref = unfused_heads(model.rho.linear, torch.relu(model.rho.dropout(z))).mean(dim=0)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)
    got.sum().backward()
    assert model.phi.linear.weight.grad is not None and model.phi.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("e", list(range(1, 13)))
def test_lower_median_network_equals_torch_median(e):
    from deepspot.models.deepsets import lower_median

    g = torch.Generator().manual_seed(e)
    z = torch.randint(0, 4, (70, e, 5), generator=g).float()  # many ties
    assert torch.equal(lower_median(z), z.median(dim=-2).values)
    z = torch.randn(3, 70, e, 5, generator=g)
    assert torch.equal(lower_median(z, rows=16), z.median(dim=-2).values)
    assert torch.equal(lower_median(z, rows=None), z.median(dim=-2).values)
    z[1, 3, e - 1, 2] = float("nan")  # NaN propagates, as in torch.median
    got = lower_median(z)
    assert torch.isnan(got[1, 3, 2]) and torch.isnan(z.median(dim=-2).values[1, 3, 2])
    assert not torch.isnan(got[0]).any()
