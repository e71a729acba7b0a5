"""The demos.

- :func:`run_demo` (``deepspot demo``, ``--quick``): train DeepSpot (``ds.train``) on the bundled Xenium lung H&E (cells
  pooled into pseudo-spots), score it on a held-out side of the image next to a ridge baseline, predict the whole
  image (``Model.predict_slide``), write h5ad + PNG.
- :func:`run_her2st_demo` (``deepspot demo --her2st``): real spots. Through the public API
  (``ds.train``, ``Model.score``, ``Model.predict_slide``): train on three HER2ST sections, score the
  fourth next to ridge on the same features, predict the whole held-out section on a virtual grid,
  write h5ad + PNG.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from deepspot import plotting
from deepspot import api
from deepspot.config import GridSpec, SpotGeometry
from deepspot.config import output_names as names
from deepspot.evaluation.holdout import score_table
from deepspot.features.encoders import load_encoder
from deepspot.geometry.grid import pool_cells
from deepspot.inference.predict import spot_table
from deepspot.io.datasets import ncbi858
from deepspot.io.outputs import write_csv, write_h5ad
from deepspot.io.slides import open_slide


def run_demo(out_dir: str | Path = "deepspot_demo", data_dir=None, spot_px: float = 120.0, spacing_px: float = 120.0,
             encoder_name: str = "efficientnet-lite0", encoder_weights=None, context: str = "spot_subspot_neighbors",
             max_epochs: int | None = None, patience: int | None = None, seed: int = 2024, progress: bool = True, echo=print,
             tissue: str = "otsu") -> dict:
    """Run the demo into ``out_dir`` (new, empty, or a previous result of this demo); the data is resolved
    before anything is written, and if the demo fails only what it wrote is removed."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    _owner(out, "demo").check()  # a file, or a folder of other files: refused before any work
    cells, image, meta = ncbi858(data_dir)
    encoder = load_encoder(encoder_name, weights=encoder_weights)
    with _output_folder(out, "demo"):
        return _run(out, t0, cells, image, meta, encoder, encoder_weights, spot_px, spacing_px, context, max_epochs,
                    patience, seed, progress, echo, tissue)


# what a demo writes at the top of its folder (a folder of these, from before run records, is a previous result):
# config.output_names.DEMO_FILES


def _owner(out: Path, command: str):
    from deepspot.io.owner import OutputFolder

    return OutputFolder(out, command, legacy=names.is_demo_file)


@contextlib.contextmanager
def _output_folder(out: Path, command: str = "demo"):
    """Own ``out`` for a demo (:class:`~deepspot.io.owner.OutputFolder`): a new or empty folder, or a previous
    result of the same demo; a folder of other files is refused before any work. If the block fails, only
    what this run wrote is removed (and the folders it made, once empty); on success its entries are recorded."""
    owner = _owner(out, command).open()
    before = set(owner.entries())
    try:
        yield out
    except BaseException:
        owner.written = [n for n in owner.entries() if n not in before]
        owner.abort()
        raise
    owner.record(*(n for n in owner.entries() if n not in before or n in owner.previous))


def _run(out, t0, cells, image, meta, encoder, encoder_weights, spot_px, spacing_px, context, max_epochs, patience,
         seed, progress, echo, tissue) -> dict:
    with open_slide(image) as slide:
        width, height = slide.dimensions
    geometry = SpotGeometry(GridSpec(spot_px, spacing_px, layout="hex", unit="px"), n_sub=3, neighbor_radius=1)
    spots, cell_to_spot = pool_cells(cells, width, height, geometry.grid)
    echo(f"[demo] {cells.n_obs} cells of {meta.get('sample', 'NCBI858')} pooled into {spots.n_obs} pseudo-spots "
         f"(hex grid, diameter {spot_px:g} px, spacing {spacing_px:g} px; units: pixels, the image has no mpp); "
         f"{int((cell_to_spot >= 0).sum())} cells fall inside a spot")
    cache, model_dir = out / names.DEMO_FEATURES, out / names.DEMO_CHECKPOINT
    # the public API's training (ds.train): features, fit, held-out scores, the checkpoint in model_dir
    model = api.train(spots, image, out=model_dir, encoder=encoder.name, encoder_weights=encoder_weights,
                      geometry=geometry, context=context, max_epochs=max_epochs, patience=patience, seed=seed,
                      cache_dir=cache, progress=progress, log_dir=out / names.DEMO_LOGS)
    res = model.result
    table = score_table(res.scores)
    write_csv(table, out / names.DEMO_SCORES)
    echo(f"[demo] held-out: right-most 30% of the image ({len(res.split[2])} spots); per-gene Pearson across "
         f"held-out spots, mean over {res.scores['deepspot']['n_genes_scored']} genes "
         f"(the others are constant there):")
    echo(table.to_string(float_format=lambda v: f"{v:.4f}"))
    import numpy as np

    from deepspot.evaluation.cv import noise_band

    test = res.split[2]
    band = noise_band(res.pred[test], res.targets[test], np.arange(res.targets.shape[1]))
    echo(f"[demo] noise band: DeepSpot's own held-out predictions with the spots shuffled score up to {band:.4f} "
         f"(95th percentile of 100 shuffles); on {len(test)} held-out spots a difference smaller than that is "
         f"noise. This demo is a pipeline check (200 cells), not a benchmark: `deepspot demo --her2st` is the "
         f"one on real spots.")
    # the public API's prediction (Model.predict_slide): the whole image on the model's grid, in memory
    adata = model.predict_slide(image, tissue=tissue, cache_dir=cache, progress=progress, num_workers=0,
                                library_id=meta.get("sample", "NCBI858"))
    h5 = write_h5ad(adata, out / names.DEMO_PREDICTIONS)
    write_csv(spot_table(adata), out / names.DEMO_SPOTS)
    png = out / names.DEMO_PNG
    plotting.spatial(adata, n_genes=4, path=png, crop=True, alpha=0.6,
                     title=f"DeepSpot on {meta.get('sample', 'NCBI858')}: virtual grid, {adata.n_obs} spots "
                           f"of {spot_px:g} px (most variable predicted genes)")
    rel_png = reliability_figure(adata, out / names.DEMO_RELIABILITY)
    secs = time.perf_counter() - t0
    echo(f"[demo] predicted {adata.n_obs} in-tissue grid spots × {adata.n_vars} genes; the whole demo took {secs:.0f} s")
    echo(f"[demo] wrote {h5}, {png}, " + (f"{rel_png}, " if rel_png else "") + f"{out / names.DEMO_SPOTS}, "
         f"{out / names.DEMO_SCORES}, {model_dir}/ (checkpoint), {cache}/ (feature cache), {out / names.DEMO_LOGS}/ (training log)")
    return {"scores": res.scores, "adata": adata, "model_dir": model_dir, "png": png, "h5ad": h5, "seconds": secs,
            "reliability_png": rel_png}


# --------------------------------------------------------------------------- HER2ST


HER2ST_TRAIN = ("C2", "C3", "C4")
HER2ST_TEST = "C5"
# markers a biologist asks for first on HER2+ breast cancer (tumour/HER2 amplicon, epithelium, immune, stroma);
# the top HVGs of these sections contain none of them, so the demo adds them to the panel
HER2ST_MARKERS = ("ERBB2", "GRB7", "EPCAM", "KRT19", "CD74", "COL1A1")


def run_her2st_demo(out_dir: str | Path = "deepspot_demo_her2st", data_dir=None,
                    encoder_name: str = "efficientnet-lite0", encoder_weights=None, context: str = "spot_neighbors",
                    train_sections=HER2ST_TRAIN, test_section: str = HER2ST_TEST, n_top_genes: int = 250,
                    markers=HER2ST_MARKERS, max_epochs: int | None = None, patience: int | None = None, seed: int = 2024,
                    n_plot: int = 4, progress: bool = True, echo=print) -> dict:
    """Train on HER2ST ``train_sections``, score ``test_section`` next to ridge (PCA-256 + ridge on the
    same spot features), predict the whole held-out section on a virtual grid (the model's geometry:
    100 µm spots at the array's pitch), write ``predictions.h5ad``, ``predicted_genes.png``,
    ``scores.csv``, ``<section>_score.png`` and the checkpoint ``model/`` into ``out_dir``.

    ``context``: what each spot sees. The default, ``spot_neighbors`` (the spot crop + its 8 array
    neighbours' crops: one encoder pass per spot), keeps the demo within minutes on 2 CPU cores;
    ``spot_subspot_neighbors`` adds 9 sub-spot crops per spot (10 encoder passes per spot). The
    feature cache is ``out_dir/features`` (a rerun reuses it). Returns the scores, the prediction and
    the seconds of each step."""
    import pandas as pd

    import deepspot as ds
    from deepspot.io.outputs import write_csv, write_h5ad
    from deepspot.training.manifest import her2st_manifest, load_sample

    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    out = Path(out_dir)
    _owner(out, "demo --her2st").check()  # a file, or a folder of other files: refused before any work
    sections = [*train_sections, test_section]
    if test_section in train_sections or len(set(sections)) != len(sections):
        raise ValueError(f"the held-out section {test_section} must not be a training section ({train_sections})")
    t = time.perf_counter()
    samples = {s.sample_id: load_sample(s) for s in her2st_manifest(data_dir, sections=sections)}
    train, test = [samples[s] for s in train_sections], samples[test_section]
    secs["read data"] = time.perf_counter() - t
    echo(f"[her2st] HER2ST patient C (Andersson et al. 2021): {len(train)} sections to train on "
         f"({', '.join(f'{s.sample_id} {s.adata.n_obs} spots' for s in train)}), {test_section} held out "
         f"({test.adata.n_obs} spots); legacy ST spots, 100 µm, ~{test.mpp:.3f} µm/px")
    markers = [g for g in (markers or ()) if all(g in s.adata.var_names for s in samples.values())]
    echo(f"[her2st] chosen: context {context!r}, encoder {encoder_name}, top {n_top_genes} HVGs"
         + (f" + markers {', '.join(markers)}" if markers else "") + ", crops of "
         f"one spot ({test.spot_px:.0f} px)" + (" + 9 sub-spots" if "subspot" in context else "")
         + ("; neighbours: the 8 adjacent array spots" if "neighbor" in context else ""))
    with _output_folder(out, "demo --her2st"):
        cache = out / names.DEMO_FEATURES
        t = time.perf_counter()
        model = ds.train(train, out=out / names.DEMO_CHECKPOINT, encoder=encoder_name, encoder_weights=encoder_weights,
                         context=context, n_top_genes=n_top_genes, add_genes=markers or None,
                         max_epochs=max_epochs, patience=patience,
                         seed=seed, cache_dir=cache, progress=progress, log_dir=out / names.DEMO_LOGS)
        secs["train"] = time.perf_counter() - t
        tr = model.config.training
        echo(f"[her2st] trained on {tr['n_train_spots']} spots, early stopping on {tr['n_val_spots']} "
             f"({tr['split']}); best epoch {tr['best_epoch']} of {tr['epochs']}; encoding "
             f"{tr['seconds']['features']:.0f} s, fitting {tr['seconds']['training']:.0f} s")
        t = time.perf_counter()
        per_gene, summary = model.score([test], cache_dir=cache, progress=progress, plots=out, ridge_train=train)
        seen_gene, seen = model.score(train, cache_dir=cache, progress=progress, ridge_train=train)  # in-sample
        per_gene, summary = pd.concat([per_gene, seen_gene]), pd.concat([summary, seen])
        secs["score"] = time.perf_counter() - t
        table = her2st_score_table(summary, test_section)
        write_csv(table, out / names.DEMO_SCORES)
        write_csv(per_gene.set_index(["sample_id", "gene"]), out / names.DEMO_PER_GENE)
        echo(f"[her2st] per-gene Pearson across each section's spots, mean over the {len(model.genes)} panel genes "
             f"and over that section's top-50 HVGs; ridge fitted on the training sections' features; noise95: "
             f"what DeepSpot's own predictions score with the spots shuffled (95th percentile of 100 shuffles):")
        echo(table.to_string(float_format=lambda v: f"{v:.3f}"))
        t = time.perf_counter()
        pred = model.predict_slide(test.image, mpp=test.mpp, cache_dir=cache, progress=progress,
                                   library_id=test_section, num_workers=0)
        secs["predict section"] = time.perf_counter() - t
        t = time.perf_counter()
        held = per_gene[per_gene["sample_id"] == test_section].set_index("gene")["pearson"]
        best = held.dropna().sort_values(ascending=False).index[:n_plot].tolist()
        h5 = write_h5ad(pred, out / names.DEMO_PREDICTIONS)
        png = out / names.DEMO_PNG
        from deepspot import plotting

        plotting.spatial(pred, genes=best, path=png, crop=True, alpha=0.8, ncols=2,
                         units="predicted log1p(counts per 10k)",
                         titles={g: f"{g} (held-out r = {held[g]:.2f})" for g in best},
                         title=f"DeepSpot on {test_section} (held out): virtual grid, {pred.n_obs} spots of 100 µm")
        rel_png = reliability_figure(pred, out / names.DEMO_RELIABILITY)
        secs["write + plot"] = time.perf_counter() - t
        secs["total"] = time.perf_counter() - t0
        g = pred.uns["deepspot"]
        echo(f"[her2st] predicted {pred.n_obs} in-tissue spots of a {g['grid_layout']} virtual grid "
             f"({g['grid_spots']} grid spots; spot {g['spot_diameter_px']:.0f} px, pitch {g['spacing_px']:.0f} px) "
             f"× {pred.n_vars} genes; plotted the {len(best)} best held-out genes")
        echo("[her2st] seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
        echo(f"[her2st] {int(pred.var['reliable'].sum())} of {pred.n_vars} genes are reliable (validation Pearson "
             f"above its noise band); {rel_png or 'no interval'}")
        echo(f"[her2st] wrote {h5}, {png}, {out / names.score_plot(test_section)}, {out / names.DEMO_SCORES}, "
             f"{out / names.DEMO_PER_GENE}, {out / names.DEMO_CHECKPOINT}/ (checkpoint), {out / names.DEMO_FEATURES}/ (feature cache), "
             f"{out / 'logs'}/ (training log)")
    return {"scores": table, "per_gene": per_gene, "adata": pred, "model": model, "png": png, "h5ad": h5,
            "seconds": secs, "genes_plotted": best}


def reliability_figure(pred, path):
    """The most reliable gene's predicted map next to its interval width, and the gene panel as
    validation-Pearson bars with their noise band, in one PNG; None when the prediction has no interval."""
    if "lower" not in pred.layers or "val_pearson" not in pred.var or pred.var["val_pearson"].isna().all():
        return None
    from matplotlib.figure import Figure

    from deepspot import plotting
    from deepspot.io.outputs import write_figure

    fig = Figure(figsize=(16, 4.8), layout="constrained")  # colour bars and the bar chart's labels never overlap
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.6]})
    plotting.uncertainty(pred, axes=axes[:2], crop=True, alpha=0.8)
    plotting.gene_panel(pred, ax=axes[2], top=40)
    write_figure(fig, path)
    return path


def her2st_score_table(summary, test_section: str):
    """One row per section: role, spots, DeepSpot vs ridge mean per-gene Pearson (panel genes, top-50 HVGs)."""
    import pandas as pd

    top = next(c for c in summary.columns if c.startswith("pearson_mean_top"))
    rows = []
    for _, r in summary.iterrows():
        rows.append({"section": r["sample_id"],
                     "role": "held out" if r["sample_id"] == test_section else "trained on (in-sample)",
                     "spots": int(r["n_spots"]),
                     "deepspot_r": r["pearson_mean_model_genes"], "ridge_r": r["ridge_pearson_mean_model_genes"],
                     "deepspot_r_top50": r[top], "ridge_r_top50": r[f"ridge_{top}"],
                     "noise95": r["noise_band_model_genes"]})
    return pd.DataFrame(rows).set_index("section")
