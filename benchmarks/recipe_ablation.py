"""Leave-one-section-out on the bundled HER2ST sections: the training recipe's default against each of its
choices reverted, one at a time, to the published value (default context; the same cached features).

    python benchmarks/recipe_ablation.py [--cache-dir DIR] [--data-dir DIR] [--n-top-genes 250]

Prints mean per-gene Pearson over the top-50 HVGs of each fold's training split, per held-out section,
next to ridge (PCA-256) on the same features and the shuffled-prediction noise band.
"""
from __future__ import annotations

import argparse
import logging
import time

import pandas as pd

from deepspot.evaluation.cv import NOISE, RIDGE, EvalConfig, evaluate, load_samples, sample_features, section_table
from deepspot.features.encoders import load_encoder
from deepspot.training.manifest import her2st_manifest
from deepspot.training.recipe import SpotRecipe

# each row: what changes relative to the default recipe (the published value of that choice)
ABLATIONS = {
    "default recipe": {},
    "input projection: standardise + PCA-256": {"input_proj": 256},
    "no target scaler": {"scaler": None},
    "sum sub-spots / max neighbours (published)": {"subspot_pool": "sum", "neighbor_pool": "max"},
    "max neighbours": {"neighbor_pool": "max"},
    "dropout 0.3 (published)": {"dropout": 0.3},
    "hidden 512 x 10 heads (published)": {"hidden": 512, "n_ensemble": 10},
    "lr 1e-4 and wd 1e-6 (published)": {"lr": 1e-4, "weight_decay": 1e-6, "max_epochs": 200, "patience": 20},
    "early stop on val loss": {"monitor": "val_loss"},
    "loss mse (before)": {"loss": "mse"},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cache-dir", default="deepspot_ablation_features")
    ap.add_argument("--n-top-genes", type=int, default=250)
    ap.add_argument("--context", default="spot_subspot_neighbors")
    ap.add_argument("--only", default=None, help="comma-separated ablation names (default: all)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    samples = load_samples(her2st_manifest(args.data_dir))
    feats = sample_features(samples, load_encoder("efficientnet-lite0"), 3, cache_dir=args.cache_dir, progress=False)
    rows = {}
    names = list(ABLATIONS) if not args.only else [n.strip() for n in args.only.split(",")]
    for name in names:
        t0 = time.perf_counter()
        cfg = EvalConfig(recipe=SpotRecipe(**ABLATIONS[name]), contexts=(args.context,),
                         n_top_genes=args.n_top_genes)
        t = section_table(evaluate(samples, cfg=cfg, features=feats).scores)
        if not rows:
            rows[RIDGE], rows[NOISE] = t[RIDGE], t[NOISE]
        rows[name] = t[f"deepspot {args.context}"]
        print(f"{name}: " + " ".join(f"{k} {v:.3f}" for k, v in rows[name].items())
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = pd.DataFrame(rows).T
    print(f"\nHER2ST leave-one-section-out, context {args.context}, efficientnet-lite0 features; mean per-gene "
          f"Pearson over the top-50 HVGs (panel: top {args.n_top_genes})")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
