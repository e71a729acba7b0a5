"""Patient-level cross-validation of DeepSpot next to the field's baseline.

For each fold the held-out patients' samples are never seen in training: the gene panel (top HVGs),
the target scaler, the Leiden oversampling and early stopping all use the training patients only
(early stopping on whole validation patients when there are at least two training patients).

Each held-out sample is scored on its own: per-gene Pearson across its spots (mean over all panel
genes, and over the top-50 HVGs of the training split), per-gene Spearman, MSE — for
(a) HEST-Bench's baseline, PCA-256 + ridge on the same spot features, and (b) DeepSpot in each of
its four context modes. Features are encoded once per sample and cached (``cache_dir``).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from deepspot.config import invert_scaler
from deepspot.evaluation.baseline import ridge_baseline
from deepspot.evaluation.metrics import pearson_per_gene, summarize
from deepspot.features.store import Features
from deepspot.models.bags import Bags, predict_bags
from deepspot.models.deepsets import CONTEXTS
from deepspot.reliability import DEFAULT_LEVEL, Reliability, coverage_per_gene, head_spread, spread_to_expression
from deepspot.training.manifest import Sample, SampleSpec, as_spots, load_sample
from deepspot.training.recipe import SpotRecipe, block_validation, fit_spot_model
from deepspot.training.multi_sample import sample_features, stack_bags
from deepspot.training.targets import log_normalize, rank_hvgs, select_panel

log = logging.getLogger(__name__)

RIDGE = "ridge (PCA-256)"
ORACLE = "oracle: log library size"  # uses the held-out counts: a reference, not a method
NOISE = "noise band (shuffled, 95%)"


@dataclass
class EvalConfig:
    """Everything that decides the numbers (stored beside them): the training ``recipe`` (the one
    ``deepspot train`` uses by default, :class:`deepspot.training.recipe.SpotRecipe`; its ``context`` is
    replaced by each of ``contexts`` in turn, its ``seed`` also seeds the folds, the ridge and the noise
    band) and what only evaluation decides."""

    recipe: SpotRecipe = field(default_factory=SpotRecipe)
    contexts: tuple[str, ...] = CONTEXTS
    folds: str | int = "lopo"  # leave-one-patient-out, or k patient-level folds
    n_top_genes: int | None = 250
    genes: list[str] | None = None
    on_missing: str = "error"  # panel gene missing from a sample: error | intersect
    min_fraction: float = 0.1  # HVG candidates: detected in >= this fraction of training spots
    n_top_eval: int = 50
    n_sub: int = 3
    neighbor_radius: int = 1
    precision: str = "32"
    ridge_pca: int | None = 256
    n_shuffles: int = 100  # shuffled-prediction noise band: permutations per held-out sample
    interval: float = DEFAULT_LEVEL  # nominal level of the conformal interval whose coverage is scored

    def __post_init__(self):
        if not isinstance(self.recipe, SpotRecipe):
            raise TypeError(f"recipe must be a SpotRecipe, got {type(self.recipe).__name__}")
        bad = [c for c in self.contexts if c not in CONTEXTS]
        if bad:
            raise ValueError(f"unknown context mode(s) {bad}; choose from {', '.join(CONTEXTS)}")
        if self.folds != "lopo" and (not isinstance(self.folds, int) or self.folds < 2):
            raise ValueError(f"folds must be 'lopo' or an integer >= 2, got {self.folds!r}")

    def for_context(self, context: str) -> SpotRecipe:
        """The training recipe of context mode ``context``."""
        return self.recipe.replace(context=context)


@dataclass
class EvalResult:
    scores: pd.DataFrame  # one row per (fold, held-out sample, method)
    summary: pd.DataFrame  # per method: mean and sd over held-out samples
    per_gene: pd.DataFrame  # per-gene Pearson, mean over held-out samples (genes × methods)
    folds: list[dict]
    config: dict
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- folds


def patient_folds(patients: Sequence[str], folds: str | int = "lopo", seed: int = 2024) -> list[list[str]]:
    """Held-out patients of each fold: one per fold ('lopo') or k groups of a seeded shuffle."""
    uniq = sorted(set(map(str, patients)))
    if len(uniq) < 2:
        raise ValueError(f"patient-level evaluation needs at least 2 patients, got {len(uniq)}")
    if folds == "lopo":
        return [[p] for p in uniq]
    k = int(folds)
    if k > len(uniq):
        raise ValueError(f"{k} folds but only {len(uniq)} patients")
    order = np.random.default_rng(seed).permutation(len(uniq))
    return [sorted(uniq[i] for i in order[f::k]) for f in range(k)]


# --------------------------------------------------------------------------- data


def load_samples(specs: Sequence[SampleSpec], cells: bool = False) -> list[Sample]:
    """Read every sample (checked against its image); cell data (Xenium, or every row when ``cells``) is
    pooled into pseudo-spots, spot data stays spots."""
    out = [as_spots(load_sample(s, cells=cells)) for s in specs]
    for s in out:
        s.spot_px  # noqa: B018 - fails early (naming the sample) when mpp or spot size is unknown
    return out


# --------------------------------------------------------------------------- one fold


def _targets(samples: Sequence[Sample], panel: list[str]) -> np.ndarray:
    # library size over all genes of each spot, then the panel's columns
    return np.concatenate([log_normalize(s.adata, genes=panel) for s in samples]).astype(np.float32)


def _top_eval(train: dict, panel: list[str], cfg: EvalConfig, hvg_ranked: bool, min_fraction: float = 0.0) -> np.ndarray:
    """Indices (into the panel) of the top-n HVGs of the training split (among genes detected in at least
    ``min_fraction`` of its spots when the panel is not already in that order)."""
    if hvg_ranked:
        return np.arange(min(cfg.n_top_eval, len(panel)))
    top = rank_hvgs({k: a[:, panel] for k, a in train.items()}, cfg.n_top_eval, min_fraction=min_fraction)
    pos = {g: i for i, g in enumerate(panel)}
    return np.array([pos[g] for g in top], dtype=np.int64)


def noise_band(pred: np.ndarray, true: np.ndarray, genes: np.ndarray, n: int = 100, seed: int = 0) -> float:
    """95th percentile of |mean per-gene Pearson| over ``genes`` of ``pred`` with its spots shuffled
    (``n`` permutations): what a model with no spot-to-spot signal scores by chance on this sample."""
    if n <= 0 or len(true) < 3:
        return float("nan")
    rng = np.random.default_rng(seed)
    vals = [np.nanmean(pearson_per_gene(pred[rng.permutation(len(pred))][:, genes], true[:, genes]))
            for _ in range(n)]
    return float(np.nanquantile(np.abs(vals), 0.95))


def library_oracle(sample: Sample, n_genes: int) -> np.ndarray:
    """The image-free depth oracle: every gene of a spot predicted as log1p(its total counts): (N, G).
    It uses the held-out spots' own counts, so it is a reference for how much a panel tracks depth,
    not a method."""
    lib = np.log1p(np.asarray(sample.adata.X.sum(axis=1), dtype=np.float64).ravel())
    return np.repeat(lib[:, None], n_genes, axis=1).astype(np.float32)


def run_fold(samples: Sequence[Sample], bags: Bags, owner: np.ndarray, test_patients: Sequence[str], cfg: EvalConfig,
             echo: Callable[[str], None] | None = None, log_dir=None, loggers="csv"):
    """Train on the other patients, score each held-out sample. Returns (score rows, per-gene rows, fold info).
    Progress bars: :data:`deepspot.settings`.

    Early stopping watches a spatial block of every training sample (:func:`block_validation`), so every
    training sample trains; ridge is fitted on all training spots."""
    test_s = [i for i, s in enumerate(samples) if s.patient_id in set(test_patients)]
    train_s = [i for i, s in enumerate(samples) if s.patient_id not in set(test_patients)]
    train_ad = {samples[i].sample_id: samples[i].adata for i in train_s}
    test_ad = {samples[i].sample_id: samples[i].adata for i in test_s}
    panel = select_panel(train_ad, n_top=cfg.n_top_genes, genes=cfg.genes, others=test_ad,
                         on_missing=cfg.on_missing, min_fraction=cfg.min_fraction, flavor=cfg.recipe.hvg_flavor)
    # the scored top-50 are seurat HVGs among genes in >= 10 % of the training spots whatever the panel's
    # ranking, so that runs with other panels (e.g. the original's 5,000 seurat_v3 genes) score the same genes
    hvg_panel = cfg.genes is None and cfg.n_top_genes is not None
    default_ranking = cfg.recipe.hvg_flavor == "seurat" and cfg.min_fraction == EvalConfig.min_fraction
    top = _top_eval(train_ad, panel, cfg, hvg_ranked=hvg_panel and default_ranking,
                    min_fraction=EvalConfig.min_fraction if hvg_panel and not default_ranking else 0.0)
    y = _targets(samples, panel)
    te = np.flatnonzero(np.isin(owner, test_s))
    fit_rows = np.flatnonzero(np.isin(owner, train_s))
    tr, va = block_validation([np.flatnonzero(owner == i) for i in train_s],
                              [samples[i].adata.obs["array_row"].to_numpy() for i in train_s], cfg.recipe.val_fraction)
    info = {"test_patients": list(test_patients), "test_samples": [samples[i].sample_id for i in test_s],
            "train_samples": [samples[i].sample_id for i in train_s],
            "validation": f"top {cfg.recipe.val_fraction:.0%} of the array rows of each training sample",
            "n_train_spots": int(len(tr)), "n_val_spots": int(len(va)),
            "n_test_spots": int(len(te)), "n_genes": len(panel), "panel": panel,
            "top_eval": [panel[i] for i in top], "scaler": cfg.recipe.scaler, "fit": {}}
    fold_logs = None if log_dir is None or not loggers else Path(log_dir) / f"fold-{'+'.join(test_patients)}"
    preds, reliab = {}, {}
    t0 = time.perf_counter()
    preds[RIDGE] = ridge_baseline(bags.spot[fit_rows].numpy(), y[fit_rows], bags.spot[te].numpy(),
                                  pca_dims=cfg.ridge_pca, seed=cfg.recipe.seed)
    info["fit"][RIDGE] = {"seconds": time.perf_counter() - t0}
    for ctx in cfg.contexts:
        t0 = time.perf_counter()
        model, scaler, summ = fit_spot_model(cfg.for_context(ctx), bags, y, tr, va, precision=cfg.precision,
                                             log_dir=None if fold_logs is None else fold_logs / ctx,
                                             loggers=loggers if fold_logs else None)
        rel = summ.pop("reliability", None)
        with head_spread(model) as spreads:
            preds[f"deepspot {ctx}"] = invert_scaler(predict_bags(model, bags)[te], scaler)
        if rel:
            rel = Reliability.from_dict(rel, len(panel))
            spread = None if not spreads else spread_to_expression(np.concatenate(spreads)[te], scaler)
            reliab[f"deepspot {ctx}"] = (rel, spread)
            summ["interval_mode"] = None if rel.interval is None else rel.interval.mode
            summ["spread_informative"] = None if rel.interval is None else rel.interval.spread_informative
            summ["n_reliable"] = int(rel.reliable.sum())
        info["fit"][ctx] = {**summ, "seconds": time.perf_counter() - t0}
        info.setdefault("n_train_rows", summ["n_train_rows"])  # the same for every context
        info.setdefault("leiden_clusters", summ.get("leiden_clusters"))
        if echo:
            echo(f"  fold {'+'.join(test_patients)}: {ctx}: best epoch {summ['best_epoch']} of {summ['epochs']}, "
                 f"{summ['monitor']} {summ['best_val']:.4f} ({time.perf_counter() - t0:.0f} s)")
    ref = next((m for m in (f"deepspot {c}" for c in (SpotRecipe().context, *cfg.contexts)) if m in preds), RIDGE)
    score_rows, gene_rows = [], []
    for i in test_s:
        rows = np.flatnonzero(owner[te] == i)
        s = samples[i]
        truth = y[te][rows]
        for method, p in {**preds, ORACLE: library_oracle(s, len(panel))}.items():
            p = p if method == ORACLE else p[rows]
            sc_ = summarize(p, truth, top_genes=top)
            sd_t = truth.std(axis=0)
            ok = sd_t > 0
            score_rows.append({"fold": "+".join(test_patients), "sample": s.sample_id, "patient": s.patient_id,
                               "method": method, "pearson_mean": sc_["pearson_mean"],
                               "pearson_top50": sc_.get("pearson_top", float("nan")),
                               "spearman_mean": sc_["spearman_mean"], "mse": sc_["mse"],
                               "sd_ratio": float(np.mean(p.std(axis=0)[ok] / sd_t[ok])) if ok.any() else float("nan"),
                               "n_genes_scored": sc_["n_genes_scored"], "n_spots": sc_["n_spots"],
                               **held_out_reliability(reliab.get(method), p, truth, rows, cfg.interval)})
            r = pearson_per_gene(p, truth)
            gene_rows.extend({"sample": s.sample_id, "method": method, "gene": g, "pearson": float(v)}
                             for g, v in zip(panel, r))
        every = np.arange(len(panel))
        band = noise_band(preds[ref][rows], truth, top if len(top) else every, cfg.n_shuffles, cfg.recipe.seed)
        score_rows.append({"fold": "+".join(test_patients), "sample": s.sample_id, "patient": s.patient_id,
                           "method": NOISE, "pearson_top50": band,
                           "pearson_mean": noise_band(preds[ref][rows], truth, every, cfg.n_shuffles, cfg.recipe.seed),
                           "spearman_mean": float("nan"), "mse": float("nan"), "sd_ratio": float("nan"),
                           "n_genes_scored": len(top), "n_spots": int(len(rows))})
    info["noise_band_of"] = ref
    return score_rows, gene_rows, info


def held_out_reliability(stored, pred: np.ndarray, truth: np.ndarray, rows: np.ndarray, level: float) -> dict:
    """What the reliability stored at training says on a held-out sample: the mean coverage of its
    ``level`` interval over genes (share of the sample's spots whose truth lies inside), the mean interval
    width, and the Spearman rank correlation across genes between the stored val_pearson and the held-out
    Pearson. ``stored``: (Reliability, head spread of the test spots or None), or None (ridge, oracle)."""
    nan = float("nan")
    out = {"coverage": nan, "interval_width": nan, "reliability_spearman": nan, "n_reliable": nan,
           "pearson_reliable": nan}
    if stored is None:
        return out
    rel, spread = stored
    r = pearson_per_gene(pred, truth)
    ok = np.isfinite(r) & np.isfinite(rel.val_pearson)
    if ok.sum() > 2:
        from scipy.stats import spearmanr

        out["reliability_spearman"] = float(spearmanr(rel.val_pearson[ok], r[ok]).statistic)
    keep = rel.reliable
    out["n_reliable"] = int(keep.sum())
    if keep.any():
        out["pearson_reliable"] = float(np.nanmean(r[keep]))
    if rel.interval is not None:
        lo, hi = rel.interval.bounds(pred, None if spread is None else spread[rows], level)
        out["coverage"] = float(np.mean(coverage_per_gene(lo, hi, truth)))
        out["interval_width"] = float(np.mean(hi - lo))
    return out


# --------------------------------------------------------------------------- whole evaluation


def summarize_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean and sd over held-out samples, in a fixed order (baseline first)."""
    cols = ["pearson_mean", "pearson_top50", "spearman_mean", "mse"]
    cols += [c for c in ("coverage", "interval_width", "reliability_spearman", "n_reliable", "pearson_reliable")
             if c in scores]
    g = scores.groupby("method", sort=False)[cols]
    out = g.mean().join(g.std(ddof=0).add_suffix("_sd"))
    out["n_samples"] = g.size()
    return out


def section_table(scores: pd.DataFrame, column: str = "pearson_top50") -> pd.DataFrame:
    """Held-out samples × methods of ``column`` (default: mean per-gene Pearson over the top-50 HVGs of
    each fold's training split), methods in report order, plus a mean row."""
    t = scores.pivot_table(index="sample", columns="method", values=column, aggfunc="mean", sort=False,
                           dropna=False)
    t = t[[m for m in dict.fromkeys(scores["method"]) if m in t.columns]]
    t.loc["mean"] = t.mean(axis=0)
    return t


def evaluate(samples: Sequence[Sample], encoder=None, cfg: EvalConfig | None = None,
             features: dict[str, Features] | None = None, out_dir=None, echo: Callable[[str], None] | None = None,
             batch_size_encoder: int = 16, note: str = "", loggers: str | Sequence[str] | None = "csv",
             **run) -> EvalResult:
    """Patient-level CV over ``samples``. Features: ``features`` (by sample id) or encoded with ``encoder``
    (cached under ``cache_dir``). With ``out_dir``: writes scores.csv, summary.csv, per_gene.csv,
    evaluation.png and evaluation.json there (atomically), and training curves under ``logs/`` with
    ``loggers`` ('csv', 'tensorboard', both, or None for none). ``run``: the settings of this call
    (:data:`deepspot.settings`: ``cache_dir``, ``num_workers`` (default here 0), ``progress`` (default here
    False: no bars unless asked), ``device``)."""
    from deepspot.config.runtime import settings

    run.setdefault("progress", False)
    settings.resolve(**run)  # an unknown keyword fails before any work
    cfg = cfg or EvalConfig()
    t_start = time.perf_counter()
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicated sample ids {sorted({i for i in ids if ids.count(i) > 1})}")
    timings = {}
    if features is None:
        if encoder is None:
            raise ValueError("give an encoder or precomputed features")
        n_sub = cfg.n_sub if any("subspot" in c for c in cfg.contexts) else 0
        t0 = time.perf_counter()
        with settings.override(**run):
            features = sample_features(samples, encoder, n_sub, batch_size=batch_size_encoder)
        timings["features_s"] = time.perf_counter() - t0
    missing = [i for i in ids if i not in features]
    if missing:
        raise ValueError(f"no features for samples {missing}")
    bags, owner = stack_bags(samples, features, cfg.neighbor_radius)
    folds = patient_folds([s.patient_id for s in samples], cfg.folds, cfg.recipe.seed)
    all_scores, all_genes, infos = [], [], []
    t0 = time.perf_counter()
    for k, test in enumerate(folds):
        if echo:
            echo(f"fold {k + 1}/{len(folds)}: held out {', '.join(test)}")
        with settings.override(**run):
            sr, gr, info = run_fold(samples, bags, owner, test, cfg, echo=echo,
                                    log_dir=None if out_dir is None else Path(out_dir) / "logs", loggers=loggers)
        all_scores += sr
        all_genes += gr
        infos.append(info)
    timings["training_s"] = time.perf_counter() - t0
    scores = pd.DataFrame(all_scores)
    genes = pd.DataFrame(all_genes)
    per_gene = genes.pivot_table(index="gene", columns="method", values="pearson", aggfunc="mean", sort=False)
    per_gene = per_gene[[m for m in dict.fromkeys(scores["method"]) if m in per_gene.columns]]
    summary = summarize_scores(scores)
    stored = asdict(cfg)
    del stored["recipe"]["context"]  # each of ``contexts`` replaces it
    config = {**stored, "encoder": getattr(encoder, "name", None), "samples": ids,
              "patients": sorted({s.patient_id for s in samples}), "note": note,
              "scoring": "per-gene Pearson across the spots of each held-out sample; mean over genes; "
                         "then mean (sd) over held-out samples"}
    res = EvalResult(scores, summary, per_gene, infos, config, time.perf_counter() - t_start, timings)
    if out_dir is not None:
        write_results(res, out_dir)
    return res


def write_results(res: EvalResult, out_dir) -> dict[str, Path]:
    from deepspot.io.outputs import atomic_path, write_csv

    out = Path(out_dir)
    paths = {"scores": write_csv(res.scores.set_index(["fold", "sample", "method"]), out / "scores.csv"),
             "summary": write_csv(res.summary, out / "summary.csv"),
             "per_gene": write_csv(res.per_gene, out / "per_gene.csv")}
    meta = {"config": res.config, "folds": res.folds, "seconds": res.seconds, "timings": res.timings,
            "summary": json.loads(res.summary.to_json(orient="index"))}
    with atomic_path(out / "evaluation.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1, default=str))
    paths["json"] = out / "evaluation.json"
    paths["plot"] = plot_evaluation(res, out / "evaluation.png")
    return paths


def plot_evaluation(res: EvalResult, path, reference: str | None = None) -> Path:
    """Left: mean per-gene Pearson per method (bars: mean over held-out samples; dots: each sample).
    Right: per-gene Pearson (mean over held-out samples; genes of every fold's panel), DeepSpot
    (``reference``, default its best context mode by mean Pearson) vs ridge."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from deepspot.io.outputs import write_figure

    # the oracle (uses the held-out counts) and the noise band are references, drawn as lines, not as methods
    refs = [m for m in (ORACLE, NOISE) if m in res.summary.index]
    methods = [m for m in res.summary.index if m not in refs]
    ds = [m for m in methods if m.startswith("deepspot")]
    if reference is None and ds:
        reference = max(ds, key=lambda m: np.nan_to_num(res.summary.loc[m, "pearson_mean"], nan=-np.inf))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.4, 1]})
    ax = axes[0]
    x = np.arange(len(methods))
    ax.bar(x, res.summary.loc[methods, "pearson_mean"],
           color=["#999999" if m == RIDGE else "#3b75af" for m in methods])
    for j, m in enumerate(methods):
        v = res.scores.loc[res.scores["method"] == m, "pearson_mean"].to_numpy()
        ax.scatter(np.full(len(v), j) + np.linspace(-0.15, 0.15, len(v)), v, s=14, color="black", zorder=3)
    for m, style in zip(refs, ({"color": "#c0504d", "ls": "--"}, {"color": "#7f7f7f", "ls": ":"})):
        label = ("oracle: log library size (uses the held-out counts; a reference, not a method)" if m == ORACLE
                 else "noise band: 95 % of shuffled predictions")
        ax.axhline(float(res.summary.loc[m, "pearson_mean"]), lw=1.2, label=f"{label}: "
                   f"{res.summary.loc[m, 'pearson_mean']:.3f}", **style)
    if refs:  # room above the highest bar, dot or line for the legend
        top = np.nanmax(np.r_[res.scores.loc[res.scores["method"].isin(methods), "pearson_mean"].to_numpy(),
                              res.summary["pearson_mean"].to_numpy(), 0.0])
        ax.set_ylim(top=top * 1.3 if top > 0 else None)
        ax.legend(fontsize=7, loc="upper left", frameon=False)
    ax.set_xticks(x, [m.replace("deepspot ", "DeepSpot ").replace("_", " ") for m in methods], fontsize=8,
                  rotation=30, ha="right", rotation_mode="anchor")
    ax.set_ylabel("per-gene Pearson (mean over genes)")
    ax.set_title("methods: held-out samples (dots) and their mean (bars)", fontsize=10)
    ax.axhline(0, color="black", lw=0.5)
    ax = axes[1]
    if reference is not None and RIDGE in res.per_gene:
        a, b = res.per_gene[RIDGE].to_numpy(), res.per_gene[reference].to_numpy()
        ok = np.isfinite(a) & np.isfinite(b)
        ax.scatter(a[ok], b[ok], s=8, alpha=0.6)
        lo, hi = float(np.nanmin([a[ok].min(initial=0), b[ok].min(initial=0)])), \
            float(np.nanmax([a[ok].max(initial=0), b[ok].max(initial=0)]))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_xlabel(f"{RIDGE}: per-gene Pearson")
        ax.set_ylabel(f"{reference}: per-gene Pearson")
        ax.set_title(f"{int((b[ok] > a[ok]).sum())} of {int(ok.sum())} genes better with DeepSpot "
                     f"({reference.replace('deepspot ', '')})", fontsize=10)
    fig.tight_layout()
    write_figure(fig, path)
    plt.close(fig)
    return Path(path)
