"""What test-time augmentation (mean over the 8 dihedral views of every crop) costs and buys, on
leave-one-section-out of the bundled HER2ST sections.

    python benchmarks/tta_her2st.py [--cache-dir DIR] [--sections C2,C3,C4,C5] [--contexts spot,spot_neighbors]

For each held-out section: the models are trained exactly as ``deepspot evaluate --her2st`` trains them
(same panel, validation block, recipe, cached plain features), then the held-out section is predicted
from its plain crops (view 0) and from the mean of its 8 views (each view one more encoder pass per
crop; the views' features are cached beside the plain ones). Prints, per section and context, the mean
per-gene Pearson over the top-50 HVGs of the training split, single view and TTA, the encoder seconds
per view, and the 90 % interval coverage of both.
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import pandas as pd

from deepspot.config import invert_scaler
from deepspot.evaluation.cv import EvalConfig, _targets, _top_eval, load_samples
from deepspot.evaluation.metrics import pearson_per_gene
from deepspot.features.encoders import load_encoder
from deepspot.features.views import N_VIEWS
from deepspot.models.bags import predict_bags
from deepspot.reliability import Reliability, coverage_per_gene, head_spread, spread_to_expression
from deepspot.training.manifest import her2st_manifest
from deepspot.training.recipe import block_validation, fit_spot_model
from deepspot.training.multi_sample import sample_features, stack_bags
from deepspot.training.targets import select_panel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cache-dir", default="deepspot_tta_features")
    ap.add_argument("--sections", default="C2,C3,C4,C5")
    ap.add_argument("--contexts", default="spot,spot_neighbors")
    ap.add_argument("--out", default=None, help="CSV of the rows printed")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = EvalConfig()
    enc = load_encoder("efficientnet-lite0")
    samples = load_samples(her2st_manifest(args.data_dir))
    feats = sample_features(samples, enc, 0, cache_dir=args.cache_dir, progress=False)
    bags, owner = stack_bags(samples, feats, cfg.neighbor_radius)
    rows = []
    for held in args.sections.split(","):
        test_i = [i for i, s in enumerate(samples) if s.sample_id == held]
        train_i = [i for i in range(len(samples)) if i not in test_i]
        train_ad = {samples[i].sample_id: samples[i].adata for i in train_i}
        test_ad = {samples[i].sample_id: samples[i].adata for i in test_i}
        panel = select_panel(train_ad, n_top=cfg.n_top_genes, others=test_ad, min_fraction=cfg.min_fraction,
                             flavor=cfg.recipe.hvg_flavor)
        top = _top_eval(train_ad, panel, cfg, hvg_ranked=True)
        y = _targets(samples, panel)
        tr, va = block_validation([np.flatnonzero(owner == i) for i in train_i],
                                  [samples[i].adata.obs["array_row"].to_numpy() for i in train_i],
                                  cfg.recipe.val_fraction)
        te = np.flatnonzero(np.isin(owner, test_i))
        test = [samples[i] for i in test_i]
        view_bags, seconds = [], []
        for v in range(N_VIEWS):
            t0 = time.perf_counter()
            f = sample_features(test, enc, 0, cache_dir=args.cache_dir, progress=False, view=v)
            seconds.append(time.perf_counter() - t0)
            view_bags.append(stack_bags(test, f, cfg.neighbor_radius)[0])
        for ctx in args.contexts.split(","):
            t0 = time.perf_counter()
            model, scaler, summ = fit_spot_model(cfg.for_context(ctx), bags, y, tr, va, progress=False)
            rel = Reliability.from_dict(summ["reliability"], len(panel))
            preds, spreads = [], []
            for b in view_bags:
                with head_spread(model) as sp:
                    preds.append(invert_scaler(predict_bags(model, b), scaler))
                spreads.append(spread_to_expression(np.concatenate(sp), scaler))
            truth = y[te]
            for name, p, s in (("single view", preds[0], spreads[0]),
                               ("TTA (8 views)", np.mean(preds, axis=0), np.mean(spreads, axis=0))):
                lo, hi = rel.interval.bounds(p, s, 0.9)
                r = pearson_per_gene(p, truth)
                rows.append({"section": held, "context": ctx, "prediction": name,
                             "pearson_top50": float(np.nanmean(r[top])), "pearson_mean": float(np.nanmean(r)),
                             "coverage90": float(coverage_per_gene(lo, hi, truth).mean()),
                             "encoder_passes_per_crop": N_VIEWS if name.startswith("TTA") else 1,
                             "encoder_s_per_view": float(np.mean(seconds[1:])) if seconds[1:] else float("nan"),
                             "n_spots": int(len(te)), "fit_s": time.perf_counter() - t0})
            print(pd.DataFrame(rows[-2:]).to_string(index=False), flush=True)
    df = pd.DataFrame(rows)
    print(df.pivot_table(index=["context", "prediction"], columns="section", values="pearson_top50").to_string(
        float_format=lambda v: f"{v:.3f}"))
    if args.out:
        df.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
