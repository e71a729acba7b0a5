"""Cell-level commands: ``predict-cells`` (cell table + image + DeepCell/DeepSpot2Cell model -> cells h5ad),
and the cell half of ``train --model deepcell|deepspot2cell``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from deepspot.cli import app

console = Console(stderr=False)


def _split(s: Optional[str]) -> Optional[list[str]]:
    return [g.strip() for g in s.split(",") if g.strip()] if s else None


def train_cells(kind: str, image: Path, cells, out: Path, *, encoder: str, encoder_weights: Optional[Path],
                mpp: Optional[float], cell_diameter: float, cell_unit: str, neighbors: str, k: int, radius: float,
                aggregate: str, spot_diameter: float, spacing: float, unit: str, genes: Optional[list[str]],
                n_top_genes: Optional[int], loss: str, max_epochs: int, patience: int, seed: int,
                cache_dir: Optional[Path], num_workers: int, progress: bool) -> None:
    """``deepspot train --model deepcell|deepspot2cell``: train, print held-out scores, write the checkpoint.

    cells: AnnData of raw counts per cell with obsm['spatial'] (x, y) px of ``image``.
    """
    from deepspot.demo import score_table
    from deepspot.features.encoders import load_encoder
    from deepspot.geometry.grid import GridSpec
    from deepspot.inference.cells import CELL_MODELS, CellGeometry
    from deepspot.models.checkpoint import save_checkpoint
    from deepspot.training.cells import train_cell_model, train_spot2cell_from_cells

    if kind not in CELL_MODELS:
        raise ValueError(f"unknown model {kind!r}; choose deepspot, {' or '.join(CELL_MODELS)}")
    geometry = CellGeometry(cell_diameter, unit=cell_unit, neighbors=neighbors, k=k, radius=radius)
    enc = load_encoder(encoder, weights=encoder_weights)
    common = dict(geometry=geometry, mpp=mpp, genes=genes, n_top_genes=n_top_genes, loss=loss, max_epochs=max_epochs,
                  patience=patience, seed=seed, num_workers=num_workers, progress=progress,
                  cache_dir=cache_dir or out.parent / f".{out.name}-features")
    console.print(f"{kind}: {cells.n_obs} cells; {geometry.describe()}")
    if kind == "deepcell":
        res = train_cell_model(image, cells, enc, **common)
    else:
        grid = GridSpec(spot_diameter, spacing, unit=unit)
        res = train_spot2cell_from_cells(image, cells, enc, grid, aggregate=aggregate, **common)
        console.print(f"pooled {int((res.cell_to_spot >= 0).sum())} cells into {res.spots.n_obs} pseudo-spots; "
                      f"cells of held-out spots scored against their own (held-back) counts")
    save_checkpoint(out, res.model, res.config)
    console.print(score_table(res.scores).to_string(float_format=lambda v: f"{v:.4f}"))
    console.print(f"wrote {out}")


@app.command("predict-cells")
def predict_cells_cmd(
        cells: Path = typer.Argument(..., help="Cell centroids: CSV/TSV/parquet with x, y columns in level-0 pixels "
                                     "of the image (x horizontal), e.g. from a segmentation tool; or an h5ad."),
        image: Path = typer.Option(..., help="H&E image/slide the cells lie on."),
        model: Path = typer.Option(..., help="DeepCell or DeepSpot2Cell checkpoint folder."),
        out: Path = typer.Option(Path("deepspot_cells"), help="Output folder."),
        x_col: str = typer.Option("x", help="Column with the x (horizontal) centroid."),
        y_col: str = typer.Option("y", help="Column with the y (vertical) centroid."),
        id_col: Optional[str] = typer.Option(None, help="Column with cell ids (default: cell_id if present, else row number)."),
        mpp: Optional[float] = typer.Option(None, help="µm per pixel; overrides the slide's (needed for µm geometry)."),
        drop_outside: bool = typer.Option(False, help="Drop (and report) cells outside the image instead of refusing."),
        genes: Optional[str] = typer.Option(None, help="Genes to plot (comma-separated; default: the most variable)."),
        encoder_weights: Optional[Path] = typer.Option(None, help="Local weights for the model's encoder."),
        batch_size: int = typer.Option(16, help="Cell tiles per encoder batch."),
        num_workers: int = typer.Option(0, help="Slide-reading worker processes."),
        device: str = typer.Option("cpu", help="Device for the encoder and model (cpu, cuda…)."),
        cache_dir: Optional[Path] = typer.Option(None, help="Keep/reuse the cell feature store here."),
        progress: bool = typer.Option(True)):
    """Predict the expression of every cell of a centroid table: cells h5ad (+ PNG of a few genes)."""
    from deepspot.features.encoders import load_encoder
    from deepspot.inference.cells import check_cell_model, predict_cells, read_cell_table
    from deepspot.io.outputs import write_h5ad
    from deepspot.models.checkpoint import load_checkpoint, read_config
    from deepspot.plotting import plot_genes

    if not image.exists():
        raise FileNotFoundError(f"{image}: file not found")
    gene_list = _split(genes)
    cfg = read_config(model)
    check_cell_model(cfg, model)
    ids, xy = read_cell_table(cells, x_col=x_col, y_col=y_col, id_col=id_col)
    enc = load_encoder(cfg["encoder"]["name"], weights=encoder_weights)
    net, cfg = load_checkpoint(model, genes=gene_list, feature_dim=enc.dim)
    adata = predict_cells(image, xy, net, cfg, enc, cell_ids=ids, mpp=mpp, batch_size=batch_size,
                          num_workers=num_workers, cache_dir=cache_dir, device=device, progress=progress,
                          drop_outside=drop_outside)
    h5 = write_h5ad(adata, out / f"{image.stem}_cells.h5ad")
    plot_genes(adata, genes=gene_list, path=out / f"{image.stem}_cells_genes.png",
               title=f"{cfg['model']} predictions per cell (log1p normalised)")
    dropped = adata.uns["deepspot"]["n_dropped_outside"]
    note = f" ({dropped} outside the image dropped)" if dropped else ""
    console.print(f"{adata.n_obs} cells × {adata.n_vars} genes{note} → {h5}")
