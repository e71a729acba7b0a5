"""Training the published DeepSpot2Cell as the original trains it.

A plain reference of the original's ``training_step`` is written here from its definition (one
``nn.Sequential`` per head; phi: Linear d->d, Dropout, ReLU, Linear d->h, Dropout, ReLU; rho: Dropout,
Linear 3h->3h, ReLU, Linear 3h->G, ReLU, Dropout(0.1); median over phi heads, mean over rho heads; the spot
is rho of the sum over the spot's in-spot cells of [phi_cell(cell), phi_spot(spot tile), mean of phi_spot over
the real neighbour tiles]; cells outside the spot are zeroed and masked; loss = MSE against the spot's
log1p(1e4 · counts / total); AdamW). From the same weights and batches, deepspot's loss, gradients and one
epoch of its training loop must give the same numbers.
"""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from deepspot.models.spot2cell import DeepSpot2Cell, SpotContextBags
from deepspot.training.fit import IndexBatchSampler, fit
from deepspot.training.targets import log_normalize

D, H, G, E = 6, 5, 4, 3


class RefDS2C(nn.Module):
    """The original DeepSpot2Cell's spot forward and training step, written from its definition."""

    def __init__(self, d, h, g, e, p=0.0, p_out=0.1):
        super().__init__()
        self.h = h

        def phi():
            return nn.Sequential(nn.Linear(d, d), nn.Dropout(p), nn.ReLU(), nn.Linear(d, h), nn.Dropout(p), nn.ReLU())

        self.phi_spot = nn.ModuleList([phi() for _ in range(e)])
        self.phi_cell = nn.ModuleList([phi() for _ in range(e)])
        self.rho = nn.ModuleList([nn.Sequential(nn.Dropout(p), nn.Linear(3 * h, 3 * h), nn.ReLU(),
                                                nn.Linear(3 * h, g), nn.ReLU(), nn.Dropout(p_out)) for _ in range(e)])

    def forward(self, x, mask, context, context_mask):
        b, c, d = x.shape
        med = lambda heads, t: torch.median(torch.stack([m(t) for m in heads], 1), 1).values  # noqa: E731
        phi_cells = med(self.phi_cell, x.reshape(-1, d)).reshape(b, c, -1)
        own = med(self.phi_spot, context[:, 0])
        nb = med(self.phi_spot, context[:, 1:].reshape(-1, d)).reshape(b, -1, self.h)
        nb = nb.masked_fill(context_mask[:, 1:].unsqueeze(-1), 0.0).sum(1)
        nb = nb / (~context_mask[:, 1:]).sum(1, keepdim=True).float().clamp(min=1)
        z = torch.cat([phi_cells, own.unsqueeze(1).expand(-1, c, -1), nb.unsqueeze(1).expand(-1, c, -1)], 2)
        z = (z * mask.unsqueeze(-1)).sum(1)
        return torch.stack([r(z) for r in self.rho], 1).mean(1)

    def training_step(self, batch):
        inside = batch["is_inside_spot"]
        pred = self(batch["cell_embeddings"] * inside.unsqueeze(-1), batch["cell_mask"] * inside,
                    batch["neighb_embeddings"], batch["neighb_masks"])
        return nn.functional.mse_loss(pred, batch["spot_expression"])


def copy_weights(ref: RefDS2C, ours: DeepSpot2Cell) -> None:
    """ours <- ref: head e of every layer of ours is layer j of ref's head e (weights transposed)."""
    with torch.no_grad():
        for name, layers in (("phi_cell", (0, 3)), ("phi_spot", (0, 3)), ("rho", (1, 3))):
            for j, pos in enumerate(layers, start=1):
                lin = getattr(getattr(ours, name), f"linear{j}")
                for e, head in enumerate(getattr(ref, name)):
                    lin.weight[e].copy_(head[pos].weight.T)
                    lin.bias[e].copy_(head[pos].bias)


def ours_grads_as_ref(ref: RefDS2C, ours: DeepSpot2Cell) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, our gradient laid out as ref's, ref's gradient) of every parameter."""
    out = []
    for name, layers in (("phi_cell", (0, 3)), ("phi_spot", (0, 3)), ("rho", (1, 3))):
        for j, pos in enumerate(layers, start=1):
            lin = getattr(getattr(ours, name), f"linear{j}")
            for e, head in enumerate(getattr(ref, name)):
                out.append((f"{name}[{e}].{pos}.weight", lin.weight.grad[e].T, head[pos].weight.grad))
                out.append((f"{name}[{e}].{pos}.bias", lin.bias.grad[e], head[pos].bias.grad))
    return out


def planted(n_spots=12, seed=0):
    """Spots on a 4 x 3 square grid holding 1, 2, 3 or 5 cells; raw counts per cell; spot = sum."""
    rng = np.random.default_rng(seed)
    sizes = np.array([1, 2, 3, 5])[np.arange(n_spots) % 4]
    c2s = np.repeat(np.arange(n_spots), sizes)
    f = rng.normal(size=(len(c2s), D)).astype(np.float32)
    counts = rng.poisson(5 * np.exp(f @ rng.normal(size=(D, G)) * 0.5)).astype(np.float32)
    rows, cols = np.divmod(np.arange(n_spots), 4)
    spots = ad.AnnData(np.stack([counts[c2s == s].sum(0) for s in range(n_spots)]),
                       obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=[f"s{i}" for i in range(n_spots)]))
    spot_f = rng.normal(size=(n_spots, D)).astype(np.float32)
    return spots, c2s, f, spot_f


def ref_batch(ix, spots, c2s, f, spot_f, targets):
    """The original's batch of spots ``ix``, built here from its definition: cells padded to the largest spot
    of the data set, one extra out-of-spot cell per spot (is_inside_spot 0: zeroed and masked), context =
    [own tile, the 8 grid neighbours] with neighb_masks True = missing."""
    rows, cols = spots.obs["array_row"].to_numpy(), spots.obs["array_col"].to_numpy()
    where = {(r, c): s for s, (r, c) in enumerate(zip(rows, cols))}
    cmax = int(np.bincount(c2s).max()) + 1
    out = {k: [] for k in ("cell_embeddings", "cell_mask", "is_inside_spot", "neighb_embeddings", "neighb_masks")}
    for s in ix:
        own = f[c2s == s]
        emb = np.zeros((cmax, D), np.float32)
        emb[:len(own)] = own
        emb[len(own)] = 10.0  # a cell outside the spot: must not count
        mask = np.zeros(cmax, np.float32)
        mask[:len(own) + 1] = 1
        inside = np.zeros(cmax, np.float32)
        inside[:len(own)] = 1
        ctx, cmask = [spot_f[s]], [False]
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if (dr, dc) != (0, 0):
                    n = where.get((rows[s] + dr, cols[s] + dc))
                    ctx.append(spot_f[n] if n is not None else np.zeros(D, np.float32))
                    cmask.append(n is None)
        for k, v in zip(out, (emb, mask, inside, np.stack(ctx), np.array(cmask))):
            out[k].append(v)
    batch = {k: torch.as_tensor(np.stack(v)) for k, v in out.items()}
    batch["spot_expression"] = torch.as_tensor(targets[ix])
    return batch


def our_bags(spots, c2s, f, spot_f):
    from deepspot.training.fit_cells import spot_context

    nidx, nmask = spot_context(spots)
    return SpotContextBags.build(f, spot_f, nidx, nmask, c2s)


def build_pair(p=0.0, p_out=0.0, seed=0):
    torch.manual_seed(seed)
    ref = RefDS2C(D, H, G, E, p=p, p_out=p_out)
    ours = DeepSpot2Cell(D, G, hidden=H, n_ensemble=E, dropout=p, dropout_out=p_out)
    copy_weights(ref, ours)
    return ref, ours


def test_spot_targets_are_the_originals_log1p_1e4_share():
    spots, *_ = planted()
    x = np.asarray(spots.X, np.float64)
    np.testing.assert_allclose(log_normalize(spots), np.log1p(1e4 * x / x.sum(1, keepdims=True)), rtol=1e-6)


def test_loss_and_gradients_equal_the_originals_training_step():
    spots, c2s, f, spot_f = planted()
    y = log_normalize(spots)
    ref, ours = build_pair()
    ref.train(), ours.train()
    ix = np.array([0, 3, 5, 6, 11])  # 1, 5, 2, 3 and 5 cells; corner and edge spots (missing neighbours)
    loss_ref = ref.training_step(ref_batch(ix, spots, c2s, f, spot_f, y))
    inputs = our_bags(spots, c2s, f, spot_f).batch(torch.as_tensor(ix))
    loss_ours = nn.functional.mse_loss(ours(**inputs), torch.as_tensor(y[ix]))
    assert loss_ref.item() > 1.0  # untrained: far from the targets, so the gradients are not small
    np.testing.assert_allclose(loss_ours.item(), loss_ref.item(), rtol=1e-6)
    loss_ref.backward(), loss_ours.backward()
    grads = ours_grads_as_ref(ref, ours)
    assert len(grads) == 2 * 2 * 3 * E and sum(int(r.abs().sum() > 0) for _, _, r in grads) > len(grads) // 2
    for name, mine, theirs in grads:
        np.testing.assert_allclose(mine, theirs, atol=1e-6, rtol=1e-5, err_msg=name)


def test_one_epoch_of_our_loop_equals_one_epoch_of_the_originals():
    spots, c2s, f, spot_f = planted()
    y = log_normalize(spots)
    ref, ours = build_pair(seed=1)
    train, val = np.arange(9), np.arange(9, 12)
    lr, bs, seed = 1e-3, 4, 7
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=1e-6)
    ref.train()
    order = list(IndexBatchSampler(train, bs, shuffle=True, seed=seed))  # the epoch's batches, in our loop's order
    assert len(order) == 3 and sorted(torch.cat(order).tolist()) == train.tolist()
    for ix in order:
        opt.zero_grad()
        ref.training_step(ref_batch(ix.numpy(), spots, c2s, f, spot_f, y)).backward()
        opt.step()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    fit(ours, our_bags(spots, c2s, f, spot_f), y, train, val, loss="mse", lr=lr, weight_decay=1e-6, batch_size=bs,
        max_epochs=1, patience=1, seed=seed, progress=False)
    moved = sum(float((ours.state_dict()[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-3  # the epoch changed the weights
    for name, layers in (("phi_cell", (0, 3)), ("phi_spot", (0, 3)), ("rho", (1, 3))):
        for j, pos in enumerate(layers, start=1):
            lin = getattr(getattr(ours, name), f"linear{j}")
            for e, head in enumerate(getattr(ref, name)):
                np.testing.assert_allclose(lin.weight[e].detach().T, head[pos].weight.detach(), atol=1e-6,
                                           err_msg=f"{name}[{e}].{pos}")
                np.testing.assert_allclose(lin.bias[e].detach(), head[pos].bias.detach(), atol=1e-6)


def test_rho_keeps_the_originals_output_dropout():
    """Every rho head's output goes through Dropout(0.1) in training (the published model's); at inference
    it does nothing."""
    torch.manual_seed(0)
    m = DeepSpot2Cell(D, 200, hidden=8, n_ensemble=1, dropout=0.0)
    assert m.dropout_out == 0.1 and "dropout_out" not in m.config()
    z = torch.randn(400, 3 * 8)
    with torch.no_grad():
        m.eval()
        clean = m.rho(z)
        m.train()
        noisy = m.rho(z)
    live = clean > 0
    assert live.sum() > 10_000
    dropped = (noisy[live] == 0).float().mean().item()
    assert 0.08 < dropped < 0.12
    kept = noisy[live] != 0
    np.testing.assert_allclose(noisy[live][kept], clean[live][kept] / 0.9, rtol=1e-5)
    assert DeepSpot2Cell(D, G, dropout_out=0.0).config()["dropout_out"] == 0.0


def test_original_drops_zero_count_spots_and_cells():
    from deepspot.training.fit_cells import original_drops

    spots, c2s, f, spot_f = planted()
    spots.X[4] = 0  # a spot without counts
    cells = ad.AnnData(np.ones((len(c2s), G), np.float32))
    cells.X[np.flatnonzero(c2s == 2)[0]] = 0  # a cell without counts
    out, info = original_drops(spots, c2s, cells)
    assert info == {"dropped_zero_count_spots": 1, "dropped_zero_count_cells": 1}
    assert (out[c2s == 4] == -1).all() and (out[c2s == 2] == [-1, 2, 2]).all()
    keep = (c2s != 4) & (c2s != 2)
    np.testing.assert_array_equal(out[keep], c2s[keep])


def test_preset_original_trains_with_the_originals_settings(tmp_path):
    import types

    from PIL import Image

    from deepspot.config import CellGeometry, GridSpec
    from deepspot.training.fit_cells import train_spot2cell_model

    spots, c2s, f, spot_f = planted()
    rows, cols = spots.obs["array_row"].to_numpy(), spots.obs["array_col"].to_numpy()
    spots.obsm["spatial"] = np.c_[60 + 120 * cols, 60 + 120 * rows].astype(float)
    xy = spots.obsm["spatial"][c2s] + np.random.default_rng(0).uniform(-20, 20, size=(len(c2s), 2))
    image = tmp_path / "he.png"
    Image.new("RGB", (480, 360), (200, 150, 180)).save(image)
    enc = types.SimpleNamespace(name="planted", dim=D)
    kw = dict(features=f, spot_features=spot_f, spot_grid=GridSpec(120, 120, "square", "px"), hidden=8,
              progress=False)
    res = train_spot2cell_model(image, spots, xy, c2s, enc, CellGeometry(), preset="original", max_epochs=2, **kw)
    t = res.config.training
    assert (t["preset"], t["batch_size"], t["lr"], t["weight_decay"], t["patience"], t["min_delta"]) == \
        ("original", 4, 1e-4, 1e-6, 5, 1e-3)
    assert t["max_epochs"] == 2 and t["dropped_zero_count_spots"] == 0
    assert (res.model.n_ensemble, res.model.dropout_p, res.model.dropout_out, res.model.hidden) == (8, 0.3, 0.1, 8)
    ours = train_spot2cell_model(image, spots, xy, c2s, enc, CellGeometry(), max_epochs=1, **kw).config.training
    assert (ours["preset"], ours["batch_size"], ours["patience"], ours["min_delta"]) == ("deepspot", 16, 20, 0.0)
    with pytest.raises(ValueError, match="no original"):
        train_spot2cell_model(image, spots, xy, c2s, enc, preset="original", model="deepspot2cell-pooled", **kw)
    with pytest.raises(ValueError, match="unknown spot-to-cell preset"):
        train_spot2cell_model(image, spots, xy, c2s, enc, preset="fast", **kw)
