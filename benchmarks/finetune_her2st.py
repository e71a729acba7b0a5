"""Warm start on HER2ST: does starting from a model trained elsewhere help on a new section?

A model is trained on sections C2-C4 (the HER2ST demo's recipe: context spot_neighbors, top-250 HVGs,
efficientnet-lite0). Section C5 is cut in two halves by its array columns: the left half is the
fine-tuning data, the right half is scored. Rows, scored on the same right half of C5 (mean per-gene
Pearson across its spots, over the 250 panel genes and over that half's top-50 HVGs):

- no fine-tuning: the C2-C4 model as it is;
- fine-tuned (whole network): ``init_from`` the C2-C4 model, trained on the left half;
- fine-tuned, phi frozen: the same, only the gene head trains;
- from scratch on the left half: the same recipe and genes, random initialisation;
- ridge (PCA-256 + ridge on the same spot features) fitted on C2-C4, and on the left half.

Early stopping in the fine-tuning and from-scratch runs watches the top 20 % of the array rows of the
left half (never the scored half). Each trained row is repeated over ``--seeds``; the table gives the
mean and the spread (min-max).

    python benchmarks/finetune_her2st.py --out DIR [--cache-dir DIR] [--seeds 2024,2025,2026]

Writes DIR/base (the C2-C4 checkpoint), DIR/finetune.csv (one row per run) and prints the table.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd


def half(sample, left: bool, suffix: str):
    """The left (or right) half of a sample's spots by array column, as a new Sample."""
    from deepspot.training.manifest import Sample, SampleSpec

    col = sample.adata.obs["array_col"].to_numpy().astype(float)
    cut = np.median(col)
    keep = col < cut if left else col >= cut
    spec = SampleSpec(**{**sample.spec.__dict__, "sample_id": f"{sample.sample_id}_{suffix}"})
    return Sample(spec, sample.adata[keep].copy(), sample.mpp, sample.spot_diameter_um, dict(sample.extra))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--seeds", default="2024,2025,2026")
    ap.add_argument("--context", default="spot_neighbors")
    ap.add_argument("--n-top-genes", type=int, default=250)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    import deepspot as ds
    from deepspot.evaluation.baseline import ridge_baseline
    from deepspot.evaluation.metrics import pearson_per_gene
    from deepspot.features.encoders import load_encoder
    from deepspot.training.manifest import her2st_manifest, load_sample
    from deepspot.training.multi_sample import sample_features, train_samples
    from deepspot.training.targets import log_normalize, rank_hvgs
    from deepspot.training.warmstart import read_init

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir) if args.cache_dir else out / "features"
    seeds = [int(s) for s in args.seeds.split(",")]
    samples = {s.sample_id: load_sample(s) for s in her2st_manifest(args.data_dir)}
    train = [samples[s] for s in ("C2", "C3", "C4")]
    tune, test = half(samples["C5"], True, "left"), half(samples["C5"], False, "right")
    print(f"C5: {tune.adata.n_obs} spots to fine-tune on (left half), {test.adata.n_obs} scored (right half)",
          flush=True)
    enc = load_encoder("efficientnet-lite0")
    ds.settings.progress = False  # no progress bars in the benchmark's log
    t0 = time.perf_counter()
    base = ds.train(train, out=out / "base", context=args.context, n_top_genes=args.n_top_genes, seed=2024,
                    cache_dir=cache, progress=False)
    print(f"base model on C2-C4: {len(base.genes)} genes, {time.perf_counter() - t0:.0f} s", flush=True)
    genes = base.genes
    feats = sample_features([*train, tune, test], enc, 0, cache_dir=cache, progress=False)
    truth = log_normalize(test.adata, genes=genes)
    top = [genes.index(g) for g in rank_hvgs({test.sample_id: test.adata[:, genes]}, 50)]

    rows = []

    def record(name, seed, network=None, config=None, pred=None, seconds=0.0, epochs=None):
        if pred is None:
            _, summ, preds = _score(network, config, enc, test, feats)
            pred = preds[test.sample_id]
        r = pearson_per_gene(pred, truth)
        rows.append({"run": name, "seed": seed, "pearson_panel": float(np.nanmean(r)),
                     "pearson_top50": float(np.nanmean(r[top])), "seconds": round(seconds, 1), "epochs": epochs})
        print(f"{name} seed {seed}: panel {rows[-1]['pearson_panel']:.3f}, top-50 {rows[-1]['pearson_top50']:.3f}"
              f" ({seconds:.0f} s)", flush=True)

    record("no fine-tuning (C2-C4 model)", 2024, base.network, base.config)
    for label, src in (("ridge fitted on C2-C4", train), ("ridge fitted on the C5 left half", [tune])):
        x = np.concatenate([feats[s.sample_id].spot for s in src])
        y = np.concatenate([log_normalize(s.adata, genes=genes) for s in src])
        record(label, None, pred=ridge_baseline(x, y, feats[test.sample_id].spot))
    for seed in seeds:
        for name, init in (("fine-tuned from C2-C4 (whole network)", "none"),
                           ("fine-tuned from C2-C4 (phi frozen)", "phi"),
                           ("from scratch on the C5 left half", None)):
            t = time.perf_counter()
            warm = None if init is None else read_init(out / "base", enc.name, enc.dim, freeze=init)
            res = train_samples([tune], enc, genes=genes, features=feats, context=args.context, seed=seed,
                                init=warm)
            record(name, seed, res.model, res.config, seconds=time.perf_counter() - t, epochs=res.fit_summary["epochs"])
    df = pd.DataFrame(rows)
    df.to_csv(out / "finetune.csv", index=False)
    g = df.groupby("run", sort=False)
    table = pd.DataFrame({"runs": g.size(),
                          "pearson_panel": g["pearson_panel"].mean(), "panel_min": g["pearson_panel"].min(),
                          "panel_max": g["pearson_panel"].max(), "pearson_top50": g["pearson_top50"].mean(),
                          "top50_min": g["pearson_top50"].min(), "top50_max": g["pearson_top50"].max(),
                          "seconds": g["seconds"].mean()})
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))


def _score(network, config, enc, sample, feats):
    from deepspot.evaluation.score import score_samples

    return score_samples(network, config, enc, [sample], features=feats)


if __name__ == "__main__":
    main()
