"""Training speed on CPU: one epoch over 100k spots from cached (random) features.

    python benchmarks/train_epoch.py                         # 100k spots, d=512, spot context
    python benchmarks/train_epoch.py --context spot_subspot_neighbors --steps 50
    python benchmarks/train_epoch.py --spots 20000 --dim 1280 --n-ensemble 10

Prints, for the same bags and batch size:
1. the data path alone (gathering the batches, no model): the per-item DataLoader the trainer used
   before (one ``__getitem__`` per spot, then a collate) vs the whole-batch index sampler it uses now;
2. the AdamW step alone, unfused (before) and fused (now);
3. a training epoch through ``deepspot.training.fit.fit`` (Lightning: forward, backward, AdamW, a small
   validation pass), as seconds/epoch and spots/s. With ``--steps K`` only the first K batches are
   timed and the epoch time is extrapolated (said so in the output).

Features are random (the cost does not depend on their values); neighbours come from a Visium-like
hex grid of array coordinates, so bags have the real K = 4 diagonal neighbours (radius 1).
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepspot.geometry.neighbors import array_neighbors
from deepspot.models.bags import Bags
from deepspot.models.deepsets import CONTEXTS, DeepSpot
from deepspot.training.fit import fit, make_loader


class PerItem(Dataset):
    """The previous data path: one Python call per spot, a collate per batch."""

    def __init__(self, bags, targets, index):
        self.bags, self.targets, self.index = bags, targets, torch.as_tensor(index)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return int(self.index[i])

    def collate(self, ix):
        ix = torch.as_tensor(ix, dtype=torch.long)
        return self.bags.batch(ix), self.targets[ix]


def hex_array(n: int) -> tuple[np.ndarray, np.ndarray]:
    cols = int(np.ceil(np.sqrt(2 * n)))
    r, c = np.divmod(np.arange(2 * n), cols)
    keep = (r % 2) == (c % 2)
    return r[keep][:n], c[keep][:n]


def time_loader(dl, limit: int | None) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for k, (inputs, y) in enumerate(dl):
        n += len(y)
        if limit is not None and k + 1 >= limit:
            break
    return time.perf_counter() - t0, n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spots", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512, help="feature dim (1280 for efficientnet-lite0, 1024 for UNI)")
    ap.add_argument("--n-sub", type=int, default=3)
    ap.add_argument("--genes", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--context", default="spot", choices=CONTEXTS)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--n-ensemble", type=int, default=10)
    ap.add_argument("--precision", default="32", help="32 | bf16")
    ap.add_argument("--steps", type=int, default=None, help="time only this many training batches, extrapolate")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    n, s = a.spots, a.n_sub * a.n_sub
    t0 = time.perf_counter()
    spot = rng.standard_normal((n, a.dim), dtype=np.float32)
    sub = rng.standard_normal((n, s, a.dim), dtype=np.float32) if s else None
    row, col = hex_array(n)
    idx, mask = array_neighbors(row, col, 1)
    bags = Bags.from_numpy(spot, sub, idx, mask)
    y = rng.standard_normal((n, a.genes), dtype=np.float32)
    gb = (spot.nbytes + (sub.nbytes if sub is not None else 0)) / 2**30
    print(f"{n} spots, d={a.dim}, {s} sub-spots, K={idx.shape[1]} neighbours, {a.genes} genes: "
          f"{gb:.1f} GiB of features, built in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
    tgt = torch.as_tensor(y)
    train = np.arange(n)
    limit = None if a.steps is None else a.steps
    # 1. data path only
    old = PerItem(bags, tgt, train)
    old_dl = DataLoader(old, batch_size=a.batch_size, shuffle=True, collate_fn=old.collate,
                        generator=torch.Generator().manual_seed(0))
    new_dl = make_loader(bags, tgt, train, a.batch_size, shuffle=True, seed=0)
    for name, dl in (("per-item Dataset + collate (before)", old_dl), ("whole-batch index sampler (now)", new_dl)):
        secs, m = time_loader(dl, limit)
        print(f"data path, {name:38s}: {secs:7.2f} s for {m} spots = {m / secs:10.0f} spots/s"
              + (f" (first {limit} batches)" if limit else " (one epoch)"))
    # 2. the optimizer step alone (per batch, independent of the batch size)
    torch.manual_seed(0)
    model = DeepSpot(a.dim, a.genes, hidden=a.hidden, n_ensemble=a.n_ensemble, dropout=0.3, context=a.context)
    n_par = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for name, kw in (("AdamW (for-loop, before)", {}), ("AdamW fused (now)", {"fused": True})):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-6, **kw)
        opt.step()
        t0 = time.perf_counter()
        for _ in range(10):
            opt.step()
        print(f"optimizer step, {name:26s}: {(time.perf_counter() - t0) * 100:7.1f} ms/step ({n_par / 1e6:.1f} M parameters)")
    # 3. a training epoch through fit (Lightning)
    torch.manual_seed(0)
    model = DeepSpot(a.dim, a.genes, hidden=a.hidden, n_ensemble=a.n_ensemble, dropout=0.3, context=a.context)
    n_train = n if limit is None else min(n, limit * a.batch_size)
    tr = np.arange(n_train)
    val = np.arange(n - min(1024, n), n)  # a small validation pass, as a real epoch has one
    t0 = time.perf_counter()
    fit(model, bags, y, tr, val, batch_size=a.batch_size, max_epochs=1, patience=1, progress=False,
        precision=a.precision)
    secs = time.perf_counter() - t0
    per_epoch = secs * n / n_train
    tag = "" if n_train == n else f" (extrapolated from {n_train} spots = {limit} batches)"
    print(f"training epoch, context {a.context}, E={a.n_ensemble}, hidden {a.hidden}, batch {a.batch_size}, "
          f"precision {a.precision}: {per_epoch:.1f} s/epoch, {n / per_epoch:.0f} spots/s{tag}")


if __name__ == "__main__":
    main()
