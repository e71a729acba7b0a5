"""The demo: train DeepSpot on the bundled Xenium lung H&E (cells pooled into pseudo-spots), score it
on a held-out side of the image next to a ridge baseline, predict the whole image, write h5ad + PNG."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from deepspot import plotting
from deepspot.config import GridSpec, SpotGeometry
from deepspot.evaluation.holdout import score_holdout, score_table
from deepspot.features.encoders import load_encoder
from deepspot.geometry.grid import pool_cells
from deepspot.inference.predict import predict_image, spot_table
from deepspot.io.datasets import ncbi858
from deepspot.io.outputs import write_csv, write_h5ad
from deepspot.io.slides import open_slide
from deepspot.models.checkpoint import save_checkpoint
from deepspot.training.spots import train_spot_model


def run_demo(out_dir: str | Path = "deepspot_demo", data_dir=None, spot_px: float = 120.0, spacing_px: float = 120.0,
             encoder_name: str = "efficientnet-lite0", encoder_weights=None, context: str = "spot_subspot_neighbors",
             max_epochs: int | None = None, patience: int | None = None, seed: int = 2024, progress: bool = True, echo=print,
             tissue: str = "otsu") -> dict:
    """Run the demo into ``out_dir``; the data is resolved before anything is written, and a folder this
    call created is removed again if the demo fails."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out is an existing file, not a folder")
    cells, image, meta = ncbi858(data_dir)
    encoder = load_encoder(encoder_name, weights=encoder_weights)
    made = [p for p in [out, *out.parents] if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run(out, t0, cells, image, meta, encoder, spot_px, spacing_px, context, max_epochs, patience, seed,
                    progress, echo, tissue)
    except BaseException:
        if made:
            shutil.rmtree(out, ignore_errors=True)
            for p in made[1:]:
                try:
                    p.rmdir()
                except OSError:
                    break
        raise


def _run(out, t0, cells, image, meta, encoder, spot_px, spacing_px, context, max_epochs, patience, seed, progress,
         echo, tissue) -> dict:
    with open_slide(image) as slide:
        width, height = slide.dimensions
    geometry = SpotGeometry(GridSpec(spot_px, spacing_px, layout="hex", unit="px"), n_sub=3, neighbor_radius=1)
    spots, cell_to_spot = pool_cells(cells, width, height, geometry.grid)
    echo(f"[demo] {cells.n_obs} cells of {meta.get('sample', 'NCBI858')} pooled into {spots.n_obs} pseudo-spots "
         f"(hex grid, diameter {spot_px:g} px, spacing {spacing_px:g} px; units: pixels, the image has no mpp); "
         f"{int((cell_to_spot >= 0).sum())} cells fall inside a spot")
    cache = out / "features"
    res = train_spot_model(image, spots, encoder, geometry, context=context, max_epochs=max_epochs, patience=patience,
                           seed=seed, cache_dir=cache, progress=progress, log_dir=out / "logs")
    score_holdout(res)
    model_dir = save_checkpoint(out / "model", res.model, res.config)
    table = score_table(res.scores)
    write_csv(table, out / "scores.csv")
    echo(f"[demo] held-out: right-most 30% of the image ({len(res.split[2])} spots); per-gene Pearson across "
         f"held-out spots, mean over {res.scores['deepspot']['n_genes_scored']} genes "
         f"(the others are constant there):")
    echo(table.to_string(float_format=lambda v: f"{v:.4f}"))
    adata = predict_image(image, res.model, res.config, encoder, tissue=tissue, cache_dir=cache,
                          progress=progress, library_id=meta.get("sample", "NCBI858"))
    h5 = write_h5ad(adata, out / "predictions.h5ad")
    write_csv(spot_table(adata), out / "spots.csv")
    png = out / "predicted_genes.png"
    plotting.spatial(adata, n_genes=4, path=png, title="DeepSpot predictions (log1p normalised expression)")
    secs = time.perf_counter() - t0
    echo(f"[demo] predicted {adata.n_obs} in-tissue grid spots × {adata.n_vars} genes; the whole demo took {secs:.0f} s")
    echo(f"[demo] wrote {h5}, {png}, {model_dir}/ (checkpoint), {out / 'scores.csv'}")
    return {"scores": res.scores, "adata": adata, "model_dir": model_dir, "png": png, "h5ad": h5, "seconds": secs}
