"""Training throughput against accuracy: batch size and optimizer settings of the spot recipe.

    OMP_NUM_THREADS=1 python benchmarks/train_batch.py --cache-dir DIR      # ~20 min on 1 core
    python benchmarks/train_batch.py --only "bs 64, lr 1e-3;bs 256, lr 1e-3" --skip-steps   # one setting

Two tables, each from this one command:

1. Step cost, per batch size and AdamW implementation (``fused`` = one kernel over all parameters,
   ``foreach`` = multi-tensor, ``for-loop`` = one tensor at a time): forward + backward and the
   optimizer step timed apart (medians over ``--steps`` interleaved steps) on the recipe's network
   (hidden 256, 5 heads, mean pools, full context) with 1280-d features (efficientnet-lite0) and 4
   neighbours, and the epoch time they imply for ``--epoch-spots`` spots.
2. HER2ST leave-one-section-out (the four bundled sections of one patient: an optimistic stand-in for a
   patient split) for each (batch size, lr) setting, everything else the recipe's default: mean
   per-gene Pearson over the top-50 HVGs of each held-out section, the CV mean, epochs run and the
   measured seconds per epoch. The settings differ only in batch size and lr, so the CV mean decides.

The fused and foreach AdamW compute the same update (up to float rounding), so table 2 runs the
recipe's optimizer (fused) only; table 1 says what the others would cost.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import numpy as np
import pandas as pd
import torch

# (label, batch size, lr): the recipe's default first; lr kept or scaled by sqrt(batch/64)
SETTINGS = [
    ("bs 64, lr 1e-3", 64, 1e-3),
    ("bs 256, lr 2e-3 (sqrt)", 256, 2e-3),
    ("bs 1024, lr 1e-3", 1024, 1e-3),
    ("bs 1024, lr 4e-3 (sqrt)", 1024, 4e-3),
]
OPTIMIZERS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def step_costs(batches: list[int], dim: int, genes: int, steps: int, epoch_spots: int) -> pd.DataFrame:
    """Median ms of forward+backward and of the AdamW step, per (batch size, optimizer), interleaved."""
    from deepspot.models.losses import get_loss
    from deepspot.training.recipe import SpotRecipe

    r = SpotRecipe()
    from deepspot.models.deepsets import DeepSpot

    torch.manual_seed(0)
    loss_fn = get_loss(r.loss)
    rows = []
    for b in batches:
        models = {k: DeepSpot(dim, genes, hidden=r.hidden, n_ensemble=r.n_ensemble, dropout=r.dropout,
                              subspot_pool=r.subspot_pool, neighbor_pool=r.neighbor_pool).train()
                  for k in OPTIMIZERS}
        opts = {k: torch.optim.AdamW(m.parameters(), lr=r.lr, weight_decay=r.weight_decay, **OPTIMIZERS[k])
                for k, m in models.items()}
        x = dict(spot=torch.randn(b, dim), subspots=torch.randn(b, 9, dim), subspot_mask=torch.ones(b, 9, dtype=bool),
                 neighbors=torch.randn(b, 4, dim), neighbor_mask=torch.ones(b, 4, dtype=bool))
        y = torch.randn(b, genes)
        fb = {k: [] for k in OPTIMIZERS}
        st = {k: [] for k in OPTIMIZERS}
        for i in range(steps + 1):  # the first round warms up
            for k in OPTIMIZERS:  # interleaved: load changes hit every variant alike
                t0 = time.perf_counter()
                loss = loss_fn(models[k](**x), y)
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                t1 = time.perf_counter()
                opts[k].step()
                t2 = time.perf_counter()
                if i:
                    fb[k].append(t1 - t0)
                    st[k].append(t2 - t1)
        n_par = sum(p.numel() for p in models["fused"].parameters())
        for k in OPTIMIZERS:
            f, s = statistics.median(fb[k]), statistics.median(st[k])
            rows.append({"batch": b, "optimizer": k, "params_M": n_par / 1e6, "fwd+bwd ms": 1e3 * f,
                         "step ms": 1e3 * s, "step share": s / (f + s), "spots/s": b / (f + s),
                         f"epoch s ({epoch_spots // 1000}k spots)": epoch_spots / b * (f + s)})
    return pd.DataFrame(rows)


def loso(samples, feats, settings, n_top_genes: int) -> pd.DataFrame:
    from deepspot.evaluation.cv import EvalConfig, evaluate, section_table
    from deepspot.training.recipe import SpotRecipe

    rows = []
    ctx = "spot_subspot_neighbors"
    for label, bs, lr in settings:
        t0 = time.perf_counter()
        cfg = EvalConfig(recipe=SpotRecipe(batch_size=bs, lr=lr), contexts=(ctx,), n_top_genes=n_top_genes)
        res = evaluate(samples, cfg=cfg, features=feats)
        per = section_table(res.scores)[f"deepspot {ctx}"]
        fits = [f["fit"][ctx] for f in res.folds]
        epochs = [int(f["epochs"]) for f in fits]
        sec_ep = [f["seconds"] / max(int(f["epochs"]), 1) for f in fits]
        row = {"setting": label, **{k: v for k, v in per.items()}, "epochs (per fold)": "/".join(map(str, epochs)),
               "s/epoch": float(np.mean(sec_ep)), "fit s (4 folds)": sum(f["seconds"] for f in fits)}
        rows.append(row)
        print(f"  {label}: " + " ".join(f"{k} {v:.3f}" for k, v in per.items())
              + f"; epochs {row['epochs (per fold)']}; {time.perf_counter() - t0:.0f} s", flush=True)
    return pd.DataFrame(rows).set_index("setting")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cache-dir", default="deepspot_ablation_features", help="HER2ST feature stores (reused)")
    ap.add_argument("--n-top-genes", type=int, default=250)
    ap.add_argument("--only", default=None, help="semicolon-separated setting labels (default: all)")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per (batch, optimizer)")
    ap.add_argument("--epoch-spots", type=int, default=100_000)
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--skip-loso", action="store_true")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    t_all = time.perf_counter()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}",
          flush=True)
    fmt = lambda v: f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}"  # noqa: E731
    if not args.skip_steps:
        print("[1] step cost per batch size and AdamW implementation", flush=True)
        t = step_costs([64, 256, 1024], 1280, args.n_top_genes, args.steps, args.epoch_spots)
        print(t.to_string(index=False, float_format=fmt), flush=True)
    if not args.skip_loso:
        from deepspot.evaluation.cv import load_samples
        from deepspot.features.encoders import load_encoder
        from deepspot.training.manifest import her2st_manifest
        from deepspot.training.multi_sample import sample_features

        print("[2] HER2ST leave-one-section-out per (batch size, lr)", flush=True)
        samples = load_samples(her2st_manifest(args.data_dir))
        feats = sample_features(samples, load_encoder("efficientnet-lite0"), 3, cache_dir=args.cache_dir,
                                progress=False)
        wanted = None if not args.only else {s.strip() for s in args.only.split(";")}
        settings = [s for s in SETTINGS if wanted is None or s[0] in wanted]
        table = loso(samples, feats, settings, args.n_top_genes)
        print("\nHER2ST leave-one-section-out, efficientnet-lite0 features, recipe defaults except batch size and "
              "lr; mean per-gene Pearson over the top-50 HVGs")
        print(table.to_string(float_format=fmt))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
