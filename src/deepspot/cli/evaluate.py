"""``deepspot evaluate``: patient-level cross-validation of DeepSpot next to PCA-256 + ridge."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import typer
from rich.console import Console

from deepspot.cli import app
from deepspot.training.recipe import SpotRecipe

EVAL_FILES = ("scores.csv", "summary.csv", "per_gene.csv", "evaluation.json", "evaluation.png", "logs", "features")

# the recipe's defaults, read without building one (its checks import torch; --help must not)
_R = SimpleNamespace(**{f.name: f.default for f in fields(SpotRecipe)})

console = Console(stderr=False, soft_wrap=True)  # tables are not re-wrapped at 80 columns in logs

HER2ST_NOTE = ("HER2ST: four serial sections of ONE patient, each treated as a 'patient' "
               "(leave-one-section-out): an optimistic stand-in for a true patient split")


def _csv(s: Optional[str]) -> Optional[list[str]]:
    return [g.strip() for g in s.split(",") if g.strip()] if s else None


def recipe_from_options(preset: str, options: dict) -> SpotRecipe:
    """The preset's recipe with the options that differ from our defaults (an option left at its
    default takes the preset's value; None = not given)."""
    from deepspot.training.recipe import spot_preset

    return spot_preset(preset, **{k: v for k, v in options.items() if v is not None and v != getattr(_R, k)})


@app.command()
def evaluate(
    manifest: Optional[Path] = typer.Option(None, help="CSV: sample_id, patient_id, image, expression "
                                            "[, mpp, format, positions, spot_diameter_um, alignment]."),
    her2st: bool = typer.Option(False, "--her2st", help="Use the bundled HER2ST sections C2–C5 instead of a manifest."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder holding her2st/ (else $DEEPSPOT_DATA_DIR, a checkout's shared/data, the user cache; downloaded once if missing)."),
    out: Path = typer.Option(Path("deepspot_evaluation"), help="Output folder (CSV tables, PNG, JSON)."),
    encoder: str = typer.Option("efficientnet-lite0", help="Encoder name (see `deepspot encoders`)."),
    encoder_weights: Optional[Path] = typer.Option(None, help="Local weights for the encoder."),
    folds: str = typer.Option("lopo", help="'lopo' (leave one patient out) or a number of patient-level folds."),
    preset: str = typer.Option("deepspot", help="Training preset: deepspot (ours) or original (the original's "
                               "training and its 5,000 seurat_v3 HVGs); options left at their default take "
                               "the preset's."),
    n_top_genes: Optional[int] = typer.Option(None, help="Top-N HVGs of each training split (ignored with --genes); "
                                              "default: the preset's (deepspot: 250, original: 5000)."),
    genes: Optional[str] = typer.Option(None, help="Comma-separated gene panel instead of HVGs."),
    on_missing: str = typer.Option("error", help="Panel gene missing from a sample: error | intersect."),
    contexts: str = typer.Option("all", help="DeepSpot context modes, comma-separated, or 'all'."),
    n_sub: int = typer.Option(3, help="Sub-spot grid n (n×n)."),
    loss: str = typer.Option(_R.loss), lr: float = typer.Option(_R.lr),
    weight_decay: float = typer.Option(_R.weight_decay), batch_size: int = typer.Option(_R.batch_size),
    max_epochs: int = typer.Option(_R.max_epochs), patience: int = typer.Option(_R.patience),
    hidden: int = typer.Option(_R.hidden), n_ensemble: int = typer.Option(_R.n_ensemble),
    dropout: float = typer.Option(_R.dropout),
    subspot_pool: str = typer.Option(_R.subspot_pool, help="Sub-spot pooling: mean | sum | max."),
    neighbor_pool: str = typer.Option(_R.neighbor_pool, help="Neighbour pooling: mean | max | sum."),
    input_proj: int = typer.Option(_R.input_proj or 0, help="Standardise + PCA the encoder features to this many "
                                                       "dims inside the model (0, the default: raw features)."),
    monitor: str = typer.Option(_R.monitor, help="Early stopping on val_pearson or val_loss."),
    scaler: str = typer.Option(_R.scaler, help="Target scaler fitted on training spots: none | standard | minmax."),
    oversample: bool = typer.Option(_R.oversample, help="Leiden-cluster oversampling of the training spots."),
    precision: str = typer.Option("32", help="32 | bf16 | fp16 (fp16 becomes bf16 on CPU)."),
    loggers: str = typer.Option("csv", help="Training curves under <out>/logs: csv, tensorboard, csv,tensorboard or none."),
    seed: int = typer.Option(_R.seed),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache (default: <out>/features)."),
    num_workers: int = typer.Option(0, help="DataLoader workers for reading crops."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    cells: bool = typer.Option(False, help="The manifest's rows are cells: pool them into 55 µm pseudo-spots "
                                           "(Xenium always is; spot data is never pooled otherwise)."),
):
    """Leave-one-patient-out (or k-fold by patient) scores of DeepSpot's four context modes and ridge."""
    from deepspot.evaluation.cv import EvalConfig, evaluate as run_eval, load_samples, section_table
    from deepspot.features.encoders import load_encoder
    from deepspot.models.deepsets import CONTEXTS
    from deepspot.training.manifest import her2st_manifest, read_manifest

    from deepspot.io.owner import OutputFolder

    if (manifest is None) == (not her2st):
        raise ValueError("give either --manifest FILE or --her2st")
    owner = OutputFolder(out, "evaluate", legacy=lambda n: n in EVAL_FILES).check()
    specs = her2st_manifest(data_dir) if her2st else read_manifest(manifest)
    note = HER2ST_NOTE if her2st else ""
    if note:
        console.print(f"[yellow]note:[/yellow] {note}")
    ctx = CONTEXTS if contexts.strip().lower() == "all" else tuple(_csv(contexts) or ())
    k = "lopo" if folds.strip().lower() in ("lopo", "loo") else int(folds)
    from deepspot.training.recipe import preset_panel

    given = dict(loss=loss, lr=lr, weight_decay=weight_decay, batch_size=batch_size, max_epochs=max_epochs,
                 patience=patience, hidden=hidden, n_ensemble=n_ensemble, dropout=dropout, subspot_pool=subspot_pool,
                 neighbor_pool=neighbor_pool, input_proj=input_proj or None, monitor=monitor,
                 scaler=scaler, oversample=oversample or None, seed=seed)
    recipe = recipe_from_options(preset, given)
    n_top, min_fraction = preset_panel(preset, n_top_genes, fallback_n_top=250)
    cfg = EvalConfig(recipe=recipe, contexts=ctx, folds=k, n_top_genes=n_top, genes=_csv(genes),
                     on_missing=on_missing, n_sub=n_sub, min_fraction=min_fraction, precision=precision)
    samples = load_samples(specs, cells=cells)
    console.print(f"{len(samples)} samples, {len({s.patient_id for s in samples})} patients, "
                  f"{sum(s.adata.n_obs for s in samples)} spots")
    enc = load_encoder(encoder, weights=encoder_weights)
    owner.open()
    try:
        res = run_eval(samples, enc, cfg, cache_dir=cache_dir or out / "features", out_dir=out, progress=progress,
                       echo=lambda m: console.print(m, soft_wrap=True), num_workers=num_workers, note=note,
                       loggers=None if loggers.strip().lower() == "none" else _csv(loggers))
    except BaseException:
        owner.written = [n for n in EVAL_FILES if n not in owner.previous and (out / n).exists()]
        owner.abort()
        raise
    owner.record(*(n for n in EVAL_FILES if (out / n).exists()))
    console.print(res.summary.to_string(float_format=lambda v: f"{v:.4f}"), soft_wrap=True)
    console.print("\nper held-out sample: mean per-gene Pearson over the top-50 HVGs of the training split",
                  soft_wrap=True)
    console.print(section_table(res.scores).to_string(float_format=lambda v: f"{v:.3f}"), soft_wrap=True)
    if "coverage" in res.scores and res.scores["coverage"].notna().any():
        for col, what in (("coverage", f"mean coverage of the {cfg.interval:.0%} conformal interval (share of "
                                        "held-out spots whose truth lies inside, mean over genes)"),
                          ("reliability_spearman", "Spearman across genes of the stored val_pearson vs the "
                                                   "held-out Pearson")):
            t = section_table(res.scores[res.scores["method"].str.startswith("deepspot")], col)
            console.print(f"\nper held-out sample: {what}", soft_wrap=True)
            console.print(t.to_string(float_format=lambda v: f"{v:.3f}"), soft_wrap=True)
    console.print(f"{res.seconds:.0f} s; wrote {out / 'summary.csv'}, {out / 'scores.csv'}, "
                  f"{out / 'per_gene.csv'}, {out / 'evaluation.png'}")
