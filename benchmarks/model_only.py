"""Model-only prediction from cached features: the fused DeepSpot heads against the unfused computation.

    OMP_NUM_THREADS=2 python benchmarks/model_only.py                 # ~2 min on 2 cores
    python benchmarks/model_only.py --device cuda --spots 65536        # on a GPU

For each model size (published: d=1024 UNI features, hidden 512, 10 heads, 1000 genes; recipe: d=1280
efficientnet-lite0, hidden 256, 5 heads, 250 genes) the same spots go through
``models.bags.iter_predictions`` (phi once per distinct spot of a chunk, rho at eval as one linear map)
with phi computed two ways, alternated (ABAB…, ``--reps`` each):

- before: the heads as ``baddbmm`` over an expanded input, ReLU on all E heads, then the median;
- after (the package): the heads as one (M, d) @ (d, E*h) matmul, the median, then ReLU (exact: ReLU is
  monotone, so it commutes with the median).

Prints spots/s (median and min–max over the repetitions), the largest difference between the two
predictions (0 = bit-identical), and a bound: the same chunks' matmuls alone (phi's and rho's).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager

import numpy as np
import torch


def unfused_phi(phi, x):
    """phi as computed before the fusions: (E, ..., h) by baddbmm, ReLU on every head, median over heads."""
    lin = phi.linear
    flat = x.reshape(1, -1, x.shape[-1])
    z = torch.baddbmm(lin.bias.unsqueeze(1), flat.expand(lin.weight.shape[0], -1, -1), lin.weight)
    z = z.reshape(lin.weight.shape[0], *x.shape[:-1], lin.weight.shape[2])
    return torch.relu(z).median(dim=0).values


@contextmanager
def unfused(model):
    model.phi.forward = lambda x: unfused_phi(model.phi, x)
    try:
        yield
    finally:
        del model.phi.forward


def setup(n: int, d: int, h: int, e: int, genes: int, device: str):
    from deepspot.features.store import Features
    from deepspot.geometry.grid import GridSpec, make_grid
    from deepspot.geometry.neighbors import array_neighbors
    from deepspot.models.deepsets import DeepSpot

    torch.manual_seed(0)
    model = DeepSpot(d, genes, hidden=h, n_ensemble=e).eval().to(device)
    side = int(np.sqrt(n) * 1.2) + 2
    g = make_grid(side * 100.0, side * 100.0, GridSpec(55, 100, unit="px"))[:n]
    idx, mask = array_neighbors(g["array_row"].to_numpy(), g["array_col"].to_numpy(), 1)
    rng = np.random.default_rng(0)
    src = Features(rng.standard_normal((len(g), d), dtype=np.float32),
                   rng.standard_normal((len(g), 9, d), dtype=np.float32))
    return model, src, idx, mask


def run(model, src, idx, mask, device, batch):
    from deepspot.models.bags import iter_predictions

    t = time.perf_counter()
    y = np.concatenate([p for _, p in iter_predictions(model, src, idx, mask, batch_size=batch, device=device)])
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t, y


@torch.no_grad()
def matmul_bound(model, src, idx, mask, device, batch) -> float:
    """Seconds for the chunks' matmuls alone: phi over the distinct spots and the sub-spots, rho."""
    lin, rho = model.phi.linear, model.rho.linear
    e, i, o = lin.weight.shape
    w = lin.weight.permute(1, 0, 2).reshape(i, e * o).contiguous()
    wr = rho.weight.mean(dim=0)
    t = time.perf_counter()
    n = len(src)
    for a in range(0, n, batch):
        b = min(a + batch, n)
        need = np.unique(np.concatenate([np.arange(a, b), idx[a:b][mask[a:b]]]))
        f = torch.from_numpy(src.spot_rows(need)).to(device)
        s = torch.from_numpy(src.subspot_range(a, b)).to(device).reshape(-1, i)
        f @ w, s @ w
        torch.randn(b - a, wr.shape[0], device=device) @ wr
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spots", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=512, help="spots per prediction chunk")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="published,recipe")
    args = ap.parse_args()
    sizes = {"published": (1024, 512, 10, 1000), "recipe": (1280, 256, 5, 250)}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, load average "
          f"{os.getloadavg()[0]:.1f}; {args.spots} spots, chunks of {args.batch}, {args.reps} alternated reps",
          flush=True)
    rows = []
    for name in args.sizes.split(","):
        d, h, e, g = sizes[name]
        model, src, idx, mask = setup(args.spots, d, h, e, g, args.device)
        times = {"before": [], "after": []}
        outs = {}
        for r in range(args.reps + 1):  # round 0 warms up
            for label in ("before", "after"):
                if label == "before":
                    with unfused(model):
                        s, y = run(model, src, idx, mask, args.device, args.batch)
                else:
                    s, y = run(model, src, idx, mask, args.device, args.batch)
                if r:
                    times[label].append(s)
                outs[label] = y
        bound = statistics.median(matmul_bound(model, src, idx, mask, args.device, args.batch) for _ in range(3))
        diff = float(np.abs(outs["before"] - outs["after"]).max())
        rate = {k: [args.spots / s for s in v] for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in rate.items()}
        rows.append((f"{name} (d={d}, h={h}, E={e}, G={g})", med, rate, diff, args.spots / bound))
    print(f"\n{'model':<36} {'before spots/s':>22} {'after spots/s':>22} {'speed-up':>9} {'max |diff|':>11} "
          f"{'matmul bound':>13}")
    for name, med, rate, diff, bound in rows:
        f = lambda k: f"{med[k]:,.0f} ({min(rate[k]):,.0f}-{max(rate[k]):,.0f})"  # noqa: E731
        print(f"{name:<36} {f('before'):>22} {f('after'):>22} {med['after'] / med['before']:>8.2f}x "
              f"{diff:>11.1e} {bound:>13,.0f}")
    print("max |diff| 0 = bit-identical predictions; matmul bound = spots/s of the matmuls alone")


if __name__ == "__main__":
    main()
