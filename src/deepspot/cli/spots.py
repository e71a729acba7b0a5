"""Spot commands: demo, encoders, train, predict, plot, score (the cell commands are in cli/predict_cells.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from deepspot.cli import app
from deepspot.config import ORIGINAL_SPOT_PX, describe_geometries

console = Console(stderr=False, soft_wrap=True)  # tables are not re-wrapped at 80 columns in logs


def _split(s: Optional[str]) -> Optional[list[str]]:
    return [g.strip() for g in s.split(",") if g.strip()] if s else None


@app.command()
def demo(out: Optional[Path] = typer.Option(None, help="Output folder (default: deepspot_demo, or "
                                             "deepspot_demo_her2st with --her2st)."),
         her2st: bool = typer.Option(False, "--her2st/--quick", help="--quick (default): the bundled Xenium lung "
                                     "H&E (200 cells pooled into pseudo-spots, about a minute): a pipeline check, "
                                     "not a benchmark. --her2st: train on HER2ST sections C2-C4, score C5 next to "
                                     "ridge and the noise band, predict all of C5 on a virtual grid (real 100 µm "
                                     "spots; a few minutes on 2 cores): the result that is not noise."),
         context: Optional[str] = typer.Option(None, help="Spot context (default: spot_subspot_neighbors; "
                                               "--her2st: spot_neighbors, to stay within minutes on 2 cores)."),
         data_dir: Optional[Path] = typer.Option(None, help="Folder with ncbi858/ or her2st/ (else $DEEPSPOT_DATA_DIR, a checkout's shared/data, the user cache; downloaded once if missing)."),
         encoder: str = typer.Option("efficientnet-lite0", help="Encoder name (see `deepspot encoders`)."),
         encoder_weights: Optional[Path] = typer.Option(None, help="Local weights file/folder for the encoder."),
         spot_px: float = typer.Option(120.0, help="Xenium demo: pseudo-spot diameter in pixels (the image has no mpp)."),
         spacing_px: float = typer.Option(120.0, help="Xenium demo: pseudo-spot centre-to-centre spacing in pixels."),
         max_epochs: Optional[int] = typer.Option(None, help="Default: the training recipe's."), seed: int = typer.Option(2024),
         progress: bool = typer.Option(True, help="Show progress bars.")):
    """Train on the bundled Xenium lung H&E, predict it whole, score a held-out side next to ridge and the noise
    band (a pipeline check); --her2st: train on three HER2ST sections, score the fourth, predict it whole."""
    echo = lambda msg: console.print(msg, markup=False, highlight=False)  # noqa: E731
    if her2st:
        from deepspot.demo import run_her2st_demo

        run_her2st_demo(out or Path("deepspot_demo_her2st"), data_dir=data_dir, encoder_name=encoder,
                        encoder_weights=encoder_weights, context=context or "spot_neighbors", max_epochs=max_epochs,
                        seed=seed, progress=progress, echo=echo)
        return
    from deepspot.demo import run_demo

    run_demo(out or Path("deepspot_demo"), data_dir=data_dir, spot_px=spot_px, spacing_px=spacing_px,
             encoder_name=encoder, encoder_weights=encoder_weights, context=context or "spot_subspot_neighbors",
             max_epochs=max_epochs, seed=seed, progress=progress, echo=echo)


@app.command()
def encoders():
    """List the registered encoders: feature dim, input size, output, licence, gating and where their weights
    come from."""
    from rich.table import Table

    from deepspot.features.encoders import get_spec, list_encoders

    t = Table("name", "dim", "input", "output", "licence", "gated", "weights")
    for name in list_encoders():
        s = get_spec(name)
        t.add_row(name, str(s.dim), str(s.input_size), s.output or "-", s.licence or "-",
                  "yes" if s.gated else "no", "bundled (pip)" if not s.needs_download else s.source)
    console.print(t)


@app.command()
def train(image: Optional[Path] = typer.Option(None, help="H&E image/slide the spots lie on (one-sample form)."),
          manifest: Optional[Path] = typer.Option(None, help="CSV of samples (as `deepspot evaluate` reads): one "
                                                  "model over all of them; validation blocks inside each."),
          val_samples: Optional[str] = typer.Option(None, help="--manifest: comma-separated sample ids held out "
                                                    "whole for early stopping (default: a block of every sample)."),
          val_patients: Optional[str] = typer.Option(None, help="--manifest: comma-separated patient ids whose "
                                                     "samples are held out whole for early stopping."),
          on_missing: str = typer.Option("error", help="--manifest: a panel gene missing from a sample: error | "
                                         "intersect (drop it, logged)."),
          device: str = typer.Option("cpu", help="--manifest: training device cpu | cuda | auto."),
          precision: str = typer.Option("32", help="--manifest: 32 | bf16 | fp16 (fp16 becomes bf16 on CPU)."),
          adata: Optional[Path] = typer.Option(None, help="h5ad with raw counts + positions (obsm['spatial'] x, y px), or a "
                                     "Xenium output folder (its cells registered to the image)."),
          out: Path = typer.Option(..., help="Checkpoint folder to write (safetensors + config.json)."),
          cells: bool = typer.Option(False, help="adata (or every manifest row) holds cells: pool them into "
                                     "pseudo-spots. Spot data is never pooled otherwise; Xenium always is."),
          x_col: Optional[str] = typer.Option(None, help="obs column with x (horizontal) position, if not obsm['spatial']."),
          y_col: Optional[str] = typer.Option(None, help="obs column with y (vertical) position."),
          encoder: str = typer.Option("efficientnet-lite0"), encoder_weights: Optional[Path] = typer.Option(None),
          mpp: Optional[float] = typer.Option(None, help="µm per pixel (overrides the slide's)."),
          spot_diameter: Optional[float] = typer.Option(None, help="Spot diameter (default: the one the h5ad's "
                                                        "reader recorded, e.g. 100 µm for ST; else Visium's 55 µm)."),
          spacing: Optional[float] = typer.Option(None, help="Spot pitch (default: measured from the data's array "
                                                  "coordinates where its reader recorded a spot diameter; else 100 µm)."),
          unit: str = typer.Option("um", help="Unit of spot diameter/spacing: um or px."),
          context: str = typer.Option("spot_subspot_neighbors"), n_sub: int = typer.Option(3),
          fast: bool = typer.Option(False, "--fast", help="Fast features: sub-spots from the spot's patch tokens "
                                    "(one encoder pass per spot); the model must then be used with predict --fast."),
          genes: Optional[str] = typer.Option(None, help="Comma-separated gene panel."),
          n_top_genes: Optional[int] = typer.Option(None, help="Top-N highly variable genes (default 250)."),
          add_genes: Optional[str] = typer.Option(None, help="Comma-separated genes (markers) added to the HVG "
                                                  "panel, e.g. ERBB2,EPCAM: the top HVGs often miss them."),
          loss: Optional[str] = typer.Option(None, help="Default: the training recipe's (spots: mse_pearson, "
                                            "MSE + 1 - Pearson; --preset original: mse)."),
          max_epochs: Optional[int] = typer.Option(None, help="Default: the training recipe's (spots: 40)."),
          patience: Optional[int] = typer.Option(None, help="Default: the training recipe's (spots: 8)."),
          seed: int = typer.Option(2024), cache_dir: Optional[Path] = typer.Option(None, help="Feature cache folder."),
          num_workers: int = typer.Option(0), progress: bool = typer.Option(True),
          model: str = typer.Option("deepspot", help="deepspot (spots), deepcell (cells with their counts) or "
                                    "deepspot2cell (cells pooled into pseudo-spots; trained on spot counts only; "
                                    "deepspot2cell-pooled: the per-cell DeepCell variant)."),
          cell_diameter: float = typer.Option(20.0, help="Cell models: tile side per cell, in --cell-unit."),
          cell_unit: str = typer.Option("px", help="Cell models: unit of --cell-diameter and --radius: px or um."),
          neighbors: str = typer.Option("knn", help="Cell models: neighbour rule knn | radius | none."),
          k: int = typer.Option(45, help="Cell models: number of nearest cells (knn)."),
          radius: float = typer.Option(50.0, help="Cell models: neighbour radius (radius rule), in --cell-unit."),
          cell_crop: str = typer.Option("tile", help="Cell models: tile (--cell-diameter square at the centroid) or "
                                        "bbox (each cell polygon's bounding box, squared, at least 8 --cell-unit; "
                                        "polygons from --segmentation or the Xenium folder's cell_boundaries)."),
          segmentation: Optional[Path] = typer.Option(None, help="--cell-crop bbox: cell polygons, a GeoJSON (ids as "
                                                      "the cells') or a Xenium cell_boundaries file (default: the "
                                                      "--adata Xenium folder's)."),
          aggregate: str = typer.Option("sum", help="deepspot2cell-pooled: cells to spot by sum (count space) or mean (log)."),
          preset: str = typer.Option("deepspot", help="Spot training preset: deepspot (ours) or original (the "
                                     "original's: batch 1024, 10-15 epochs, early stop on training loss, Leiden "
                                     "oversampling, top 5,000 seurat_v3 HVGs; for deepspot2cell: batch 4, 8 heads, "
                                     "<= 50 epochs, early stop on val loss, patience 5); options given override it."),
          init_from: Optional[Path] = typer.Option(None, help="Start from this checkpoint (deepspot train or convert; "
                                                   "same --encoder): same genes continue it, other genes keep phi "
                                                   "with a new gene head; its architecture is used. Without "
                                                   "--genes/--n-top-genes: its genes."),
          freeze: str = typer.Option("none", help="--init-from: none (train all) or phi (train the gene head only)."),
          hd_bin: Optional[int] = typer.Option(None, help="Visium HD: --adata is a Space Ranger HD outs folder; train "
                                               "on its square bins of this size (16 or 8 µm; geometry in µm: "
                                               "square crops of one bin, 8 µm sub-spots, neighbours within 32 µm)."),
          features_h5: Optional[Path] = typer.Option(None, help="One-sample form: spot features from a TRIDENT/HEST "
                                                     "patch-feature .h5 (coords + features) instead of the encoder; "
                                                     "patches matched to spots by position."),
          augment_views: Optional[int] = typer.Option(None, help="--manifest: also train on the first k of the 8 "
                                                      "dihedral views of every crop (1, the default: none; each view "
                                                      "is one more encoder pass per crop)."),
          stain_jitter: Optional[float] = typer.Option(None, help="--manifest: HED stain jitter (±sigma per channel, "
                                                       "e.g. 0.05) of the augmented crops (default 0: none).")):
    """Train DeepSpot (spots), DeepCell or DeepSpot2Cell (cells) on one image; prints held-out scores."""
    from deepspot.inference.preflight import check_gene_list, check_out_dir, check_slide

    check_out_dir(out)  # a file, or a folder that cannot be written: refused before any data is read
    check_gene_list(_split(genes), "--genes")
    check_gene_list(_split(add_genes), "--add-genes")
    grid_given = spot_diameter is not None or spacing is not None or unit != "um"
    if model == "deepspot" and (cell_crop != "tile" or segmentation is not None):
        raise ValueError("--cell-crop and --segmentation are options of the cell models (deepcell, deepspot2cell)")
    if manifest is not None and features_h5 is not None:
        raise ValueError("--features-h5 is one sample's file; with --manifest give each sample's file in the "
                         "manifest's features_h5 column")
    if manifest is not None:  # a bad CSV is reported before torch is imported (tens of seconds)
        from deepspot.training.manifest import read_manifest

        read_manifest(manifest)
    from deepspot.models.checkpoint import checkpoint_folder

    checkpoint_folder(out).check()  # a folder holding anything but a previous checkpoint: refused, never emptied
    if image is not None and manifest is None and hd_bin is None:  # slide and mpp checked before counts are read
        # (a spot grid left to the data may take the mpp its reader recorded: checked once the counts are read;
        # Visium HD: the mpp comes from the bins' scalefactors, read first)
        check_slide(image, mpp, needs_um=(unit == "um" and grid_given) if model == "deepspot" else cell_unit == "um")
    import deepspot as ds
    from deepspot.config import CellGeometry, GridSpec, SpotGeometry
    from deepspot.config.requests import TrainerSettings
    from deepspot.config.runtime import settings
    from deepspot.evaluation.holdout import score_table
    from deepspot.training.request import TrainJob

    if manifest is not None and (image is not None or adata is not None):
        raise ValueError("give either --manifest or --image with --adata, not both")
    if manifest is None and (image is None or adata is None):
        raise ValueError("give --image and --adata (one sample) or --manifest (several)")
    # parse -> request (checked once: names, choices, the recipe's bounds, the files it names) -> run
    many = manifest is not None  # the options of training on several samples (ignored by the one-image form)
    job = TrainJob(manifest if many else adata, image=image, model=model, out=out, encoder=encoder,
                   encoder_weights=encoder_weights, mpp=mpp, cells=cells, genes=_split(genes), n_top_genes=n_top_genes,
                   add_genes=_split(add_genes), preset=None if model != "deepspot" and preset == "deepspot" else preset,
                   init_from=init_from, freeze=freeze, features_h5=features_h5, aggregate=aggregate,
                   recipe=dict(context=context, loss=loss, max_epochs=max_epochs, patience=patience, seed=seed,
                               **(dict(augment_views=augment_views, stain_jitter=stain_jitter) if many else {})),
                   trainer=TrainerSettings(precision=precision, accelerator=device) if many else TrainerSettings(),
                   samples_options=dict(val_samples=_split(val_samples), val_patients=_split(val_patients),
                                        on_missing=on_missing) if many else {})
    if many:
        import time

        t_start = time.perf_counter()
        with settings.override(progress=progress, cache_dir=cache_dir):
            trained = ds.train(job)
        t = trained.config.training
        g = trained.config.geometry.grid
        console.print(f"trained on {t['n_train_spots']} spots of {len(t['samples'])} samples "
                      f"({', '.join(t['samples'])}); early stopping on {t['n_val_spots']} spots ({t['split']}); "
                      f"best epoch {t['best_epoch']} of {t['epochs']}, {t['monitor']} {t['best_val']:.4f}; "
                      f"geometry: {g.layout} grid, spot {g.spot_diameter:g} µm, pitch {g.spacing:g} µm; "
                      f"wrote {out}", soft_wrap=True)
        sec = t.get("seconds", {})
        console.print(f"time: reading + saving {time.perf_counter() - t_start - sum(sec.values()):.0f} s, features "
                      f"{sec.get('features', 0):.0f} s, training {sec.get('training', 0):.0f} s", soft_wrap=True)
        return
    grid = GridSpec(55.0 if spot_diameter is None else spot_diameter, 100.0 if spacing is None else spacing, unit=unit)
    if hd_bin is not None:
        from deepspot.io.visium_hd import visium_hd_geometry

        if model != "deepspot":
            raise ValueError("--hd-bin trains a spot model (--model deepspot)")
        data = ds.read.visium_hd(adata, hd_bin, image=image, mpp=mpp)
        mpp = mpp if mpp is not None else data.uns["source"]["mpp"]
        geometry = visium_hd_geometry(hd_bin, feature_mode="fast" if fast else "standard")
        console.print(f"Visium HD: {data.n_obs} in-tissue bins of {hd_bin} µm; {geometry.n_sub}x{geometry.n_sub} "
                      f"sub-spots, neighbours within {geometry.neighbor_radius} bins")
    elif model == "deepspot":
        from deepspot.training.multi_sample import recorded_geometry

        data = ds.read.counts(adata, image=image, x_col=x_col, y_col=y_col, mpp=mpp)
        mode = "fast" if fast else "standard"
        geometry = None if grid_given or cells else recorded_geometry(data, mpp, n_sub=n_sub, feature_mode=mode)
        if geometry is not None:
            g = geometry.grid
            console.print(f"geometry from {adata.name}: {g.layout} array, spot {g.spot_diameter:g} µm, pitch "
                          f"{g.spacing:g} µm (as --manifest reads it; --spot-diameter/--spacing override it)",
                          soft_wrap=True)
        geometry = geometry or SpotGeometry(grid, n_sub=n_sub, feature_mode=mode)
    else:
        data = ds.read.counts(adata, image=image, x_col=x_col, y_col=y_col, mpp=mpp)
        geometry = CellGeometry(cell_diameter, unit=cell_unit, neighbors=neighbors, k=k, radius=radius, crop=cell_crop)
        if cell_crop == "bbox":
            from deepspot.io.segmentation import attach_cell_boxes

            data = attach_cell_boxes(data, segmentation or (adata if adata.is_dir() else None), str(adata))
        console.print(f"{model}: {data.n_obs} cells; {geometry.describe()}")
    job = job.replace(samples=data, mpp=mpp, geometry=geometry, grid=grid)
    with settings.override(progress=progress, cache_dir=cache_dir, num_workers=num_workers):
        trained = ds.train(job)
    res = trained.result
    if model == "deepspot" and cells:
        console.print(f"pooled cells into {res.targets.shape[0]} pseudo-spots")
    if model.startswith("deepspot2cell"):
        console.print(f"pooled {int((res.cell_to_spot >= 0).sum())} cells into {res.spots.n_obs} pseudo-spots; "
                      f"cells of held-out spots scored against their own (held-back) counts")
    console.print(score_table(trained.scores).to_string(float_format=lambda v: f"{v:.4f}"))
    console.print(f"wrote {out}")


@app.command()
def predict(slide: Path = typer.Argument(..., help="Slide/image file (SVS, NDPI, pyramidal/OME-TIFF, JPG, PNG…)."),
            model: Path = typer.Option(..., help="Checkpoint folder."),
            out: Path = typer.Option(Path("deepspot_predictions"), help="Output folder."),
            mpp: Optional[float] = typer.Option(None, help="µm per pixel; overrides the slide's metadata (needed "
                                                "when the file has none and the model's geometry is in µm)."),
            tissue: Optional[str] = typer.Option(None, help="Tissue filter: otsu, mean_rgb (on a thumbnail), "
                                                 "tile_mean_rgb (the original's: each full-resolution tile) or "
                                                 "none; default: the geometry's (otsu for visium)."),
            geometry: Optional[str] = typer.Option(None, help=f"Spot geometry: {describe_geometries()}; default: "
                                                   "the model's."),
            spot_px: Optional[float] = typer.Option(None, help="--geometry original: spot side in px (default "
                                                    f"{ORIGINAL_SPOT_PX}, "
                                                    "or the model's if it is stored with this geometry)."),
            spacing_px: Optional[float] = typer.Option(None, help="--geometry original: spacing in px (default: "
                                                       "the spot side)."),
            min_tissue: float = typer.Option(0.1, help="Keep spots with at least this tissue fraction."),
            fast: bool = typer.Option(False, "--fast", help="Fast features (sub-spots from the spot's patch tokens); "
                                      "only for models trained with --fast."),
            layout: Optional[str] = typer.Option(None, help="Grid layout: hex (Visium) or square (Visium HD-like "
                                                 "bins); default: the model's."),
            spacing: Optional[float] = typer.Option(None, help="Centre-to-centre spacing in the model's grid unit "
                                                    "(µm); default: the model's."),
            genes: Optional[str] = typer.Option(None, help="Genes to plot (comma-separated), or 'reliable': write "
                                                "only the genes whose validation Pearson is above the noise band "
                                                "(var['reliable']) and plot the most reliable."),
            plot_genes: int = typer.Option(4, help="Without --genes: plot this many genes, the most reliable (else "
                                           "the most variable) first (0: no PNG)."),
            tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: the mean prediction over the 8 "
                                     "dihedral views of every crop (8 encoder passes per crop)."),
            interval: float = typer.Option(0.9, help="Nominal level of the per-spot, per-gene conformal interval "
                                           "(layers 'lower' / 'upper'; the model is calibrated at 0.5, 0.8, 0.9, "
                                           "0.95); 0: none. Models without a validation have none."),
            encoder_weights: Optional[Path] = typer.Option(None, help="Local weights for the model's encoder."),
            batch_size: int = typer.Option(16, help="Spots per encoder batch."),
            num_workers: Optional[int] = typer.Option(None, help="Slide-reading worker processes (default: about "
                                                      "half the cores; 0 = read in the main process)."),
            device: str = typer.Option("cpu", help="Device for the encoder and model (cpu, cuda…)."),
            cache_dir: Optional[Path] = typer.Option(None, help="Keep/reuse the feature store here."),
            overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous result of this slide "
                                           "in --out (else refused)."),
            fmt: str = typer.Option("h5ad", "--format", help="h5ad, or spatialdata: <name>.zarr with the slide "
                                    "image, spot circles and the prediction table (extra \\[spatialdata])."),
            progress: bool = typer.Option(True),
            features_h5: Optional[Path] = typer.Option(None, help="Predict at the patches of a TRIDENT/HEST "
                                                       "patch-feature .h5 (coords + features of the model's "
                                                       "encoder) instead of encoding a grid: <name>.h5ad.")):
    """Predict every in-tissue spot of a virtual grid over a slide: h5ad (or SpatialData zarr) + spots CSV + PNG
    (memory stays flat)."""
    import time
    import warnings

    from deepspot.config.requests import PredictRequest
    from deepspot.config.runtime import settings

    # parse -> request (checked once: options, the slide exists, the format, gene names) -> plan -> run
    request = PredictRequest.from_options(
        slide, genes=genes, out=out, model=model, mpp=mpp, tissue=tissue, min_tissue=min_tissue, fast=fast,
        layout=layout, spacing=spacing, geometry=geometry, spot_px=spot_px, spacing_px=spacing_px,
        batch_size=batch_size, n_plot=plot_genes, interval=interval, tta=tta, fmt=fmt, overwrite=overwrite,
        encoder_weights=encoder_weights)
    if features_h5 is not None:
        from deepspot.inference.predict_plan import require_format

        require_format(fmt)
        _predict_features_h5(request, features_h5)
        return
    from deepspot.inference.predict_plan import plan_prediction

    with settings.override(progress=progress, num_workers=num_workers, cache_dir=cache_dir, device=device):
        # before torch is imported: the output folder, the checkpoint's config, genes, the slide (opened here,
        # once, and kept open for the run), a previous result
        with plan_prediction(request, model) as plan:
            import deepspot as ds

            t0 = time.perf_counter()
            m = ds.load_model(model, device=device, encoder_weights=encoder_weights)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pred = m.predict_slide(plan)
    pred = pred.tables["table"] if fmt == "spatialdata" else pred
    info = pred.uns["deepspot"]
    notes = [f"geometry: {n}" for n in info["geometry_notes"]] + [str(n) for n in info.get("notes", [])]
    for msg in [str(w.message) for w in caught] + notes:
        typer.echo(f"deepspot: warning: {msg}", err=True)
    console.print(f"{pred.n_obs} of {info['grid_spots']} grid spots on tissue × {pred.n_vars} genes → "
                  f"{info['outputs'][0]} ({time.perf_counter() - t0:.0f} s)")


def _predict_features_h5(request, features_h5: Path) -> None:
    """`predict --features-h5`: every patch of the file predicted, no encoder run (deepspot.inference.external)."""
    import time

    from deepspot.config.output_names import prediction_files
    from deepspot.inference import preflight

    slide, model, out, mpp = request.slide, request.model, request.out, request.mpp
    overwrite, encoder_weights = request.overwrite, request.encoder_weights
    t0 = time.perf_counter()
    preflight.check_out_dir(out)
    name = prediction_files(slide.stem)[0]
    preflight.check_previous(out, [name], overwrite)
    if not features_h5.is_file():
        raise FileNotFoundError(f"{features_h5}: file not found")
    import deepspot as ds
    from deepspot.inference.external import predict_patch_file
    from deepspot.io.outputs import write_h5ad

    m = ds.load_model(model, encoder_weights=encoder_weights)
    _, mpp_used = preflight.check_slide(slide, mpp, needs_um=preflight.needs_um(m.config))
    pred = predict_patch_file(m, features_h5, mpp=mpp_used)
    path = write_h5ad(pred, Path(out) / name)
    console.print(f"{pred.n_obs} patches of {features_h5.name} ({pred.uns['deepspot']['patch_px']:g} px) × "
                  f"{pred.n_vars} genes → {path} ({time.perf_counter() - t0:.0f} s)")


@app.command()
def plot(h5ad: Path = typer.Argument(..., help="Predictions (.h5ad)."),
         genes: Optional[str] = typer.Option(None, help="Comma-separated genes (default: the most variable)."),
         out: Optional[Path] = typer.Option(None, help="PNG path (default: beside the h5ad)."),
         reliability: bool = typer.Option(False, "--reliability", help="Also draw, for the first gene (default: the "
                                          "most reliable), its map next to its interval width "
                                          "(<out>_interval.png) and the gene panel as validation-Pearson bars "
                                          "with their noise band (<out>_panel.png).")):
    """Plot predicted genes over the H&E thumbnail (default: the most reliable genes, else the most variable)."""
    if not h5ad.exists():
        raise FileNotFoundError(f"{h5ad}: file not found")
    import anndata as ad

    import deepspot as ds

    path = out or h5ad.with_suffix(".png")
    try:
        a = ad.read_h5ad(h5ad)
    except Exception as e:  # noqa: BLE001 - h5py / anndata name the codec, not the file
        raise ValueError(f"{h5ad}: not a readable h5ad ({type(e).__name__}); plot takes the .h5ad that "
                         f"predict wrote") from None
    cell = "cell" in str(a.uns.get("deepspot", {}).get("values", ""))
    ds.pl.spatial(a, genes=_split(genes), path=path, crop=True,
                  units="predicted log1p(counts per 10k)" + (" per cell" if cell else ""),
                  title=f"DeepSpot predictions on {next(iter(a.uns.get('spatial', {})), h5ad.stem)}: "
                        f"{a.n_obs} {'cells' if cell else 'spots'}")
    console.print(f"wrote {path}")
    if reliability:
        first = (_split(genes) or [None])[0]
        p1 = path.with_name(path.stem + "_interval.png")
        ds.pl.uncertainty(a, gene=first, path=p1)
        p2 = path.with_name(path.stem + "_panel.png")
        ds.pl.gene_panel(a, path=p2)
        console.print(f"wrote {p1} and {p2}")


@app.command()
def score(model: Path = typer.Option(..., help="Checkpoint folder written by `deepspot train`."),
          manifest: Path = typer.Option(..., help="CSV of annotated samples to score on (as `evaluate` reads)."),
          out: Path = typer.Option(..., help="Folder for per_gene.csv and summary.csv."),
          encoder_weights: Optional[Path] = typer.Option(None), cache_dir: Optional[Path] = typer.Option(None),
          baseline: Optional[str] = typer.Option(None, help="'ridge' (PCA-256 + ridge fitted on the spot features "
                                                 "of the manifest the model was trained from) or a training "
                                                 "manifest to fit it on; scored beside the model."),
          progress: bool = typer.Option(True),
          features_h5: Optional[Path] = typer.Option(None, help="Folder of TRIDENT/HEST patch-feature files, "
                                                     "<sample_id>.h5 (or <image stem>.h5) per sample, used instead "
                                                     "of the encoder.")):
    """Predict at the annotated spots of each sample and score per gene against its counts."""
    import time

    from deepspot.config import output_names as names
    from deepspot.config.requests import ScoreRequest
    from deepspot.config.runtime import settings
    from deepspot.training.manifest import read_manifest

    # parse -> request (checked once) -> run
    request = ScoreRequest(manifest, out=out, model=model, baseline=baseline, features_h5=features_h5,
                           encoder_weights=encoder_weights)
    specs = read_manifest(manifest)  # a bad CSV is reported before torch and the model are loaded
    if features_h5 is not None and any(s.features_h5 is not None for s in specs):
        raise ValueError(f"--features-h5: {manifest.name} names each sample's file in its features_h5 column; use "
                         f"that column (or drop it and give the folder), not both")
    import deepspot as ds
    from deepspot.io.outputs import write_csv
    from deepspot.io.owner import OutputFolder

    t0 = time.perf_counter()
    owner = OutputFolder(out, "score", legacy=names.is_score_file).check()
    m = ds.load_model(model, encoder_weights=encoder_weights)
    m._require(cells=False)  # a cell model is refused before any sample is read or encoded
    m._ridge_train(request)  # --baseline ridge without a recorded training manifest: refused before any work
    owner.open()
    mine = lambda: [p.name for p in out.iterdir() if names.is_score_file(p.name)]  # noqa: E731
    try:
        with settings.override(progress=progress, cache_dir=cache_dir or out / names.SCORE_FEATURES):
            per_gene, summary = m.score(request)
        write_csv(per_gene.set_index(["sample_id", "gene"]), out / names.SCORE_PER_GENE)
        write_csv(summary.set_index("sample_id"), out / names.SCORE_SUMMARY)
    except BaseException:
        owner.written = [n for n in mine() if n not in owner.previous]
        owner.abort()
        raise
    owner.record(*mine())
    console.print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"), soft_wrap=True)
    console.print(f"wrote {out / names.SCORE_PER_GENE}, {out / names.SCORE_SUMMARY} and a PNG per sample "
                  f"({out / names.score_plot('<sample_id>')}) in {time.perf_counter() - t0:.0f} s", soft_wrap=True)
