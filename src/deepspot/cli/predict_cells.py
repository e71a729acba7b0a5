"""``deepspot predict-cells``: cell table + image + DeepCell/DeepSpot2Cell model -> cells h5ad (+ PNG).
(Training cell models is ``deepspot train --model deepcell|deepspot2cell``.)"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from deepspot.cli import app

console = Console(stderr=False)


def _split(s: Optional[str]) -> Optional[list[str]]:
    return [g.strip() for g in s.split(",") if g.strip()] if s else None


@app.command("predict-cells")
def predict_cells_cmd(
        cells: Path = typer.Argument(..., help="Cell centroids: CSV/TSV/parquet with x, y columns in level-0 pixels "
                                     "of the image (x horizontal), e.g. from a segmentation tool; an h5ad; or cell "
                                     "polygons: a GeoJSON (HEST/CellViT, px) or a Xenium cell_boundaries file (µm: "
                                     "--mpp). A model trained on bounding-box crops (--cell-crop bbox) needs polygons."),
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
    from deepspot.inference.preflight import check_out_dir

    from deepspot.io.owner import OutputFolder, safe_name

    check_out_dir(out)
    owner = OutputFolder(out, "predict-cells", legacy=lambda n: n.endswith(("_cells.h5ad", "_cells_genes.png")))
    owner.check()
    names = [safe_name(f"{image.stem}_cells.h5ad", "image name"), safe_name(f"{image.stem}_cells_genes.png")]
    import h5py
    import numpy as np

    import deepspot as ds
    from deepspot.plotting import spatial_columns

    gene_list = _split(genes)
    m = ds.load_model(model, device=device, encoder_weights=encoder_weights)
    m.config.check_genes(gene_list, str(model))
    owner.open()
    try:
        h5 = out / names[0]
        # predictions go to the h5ad block by block (never all in memory), into a temp file renamed when whole
        with owner.atomic(names[0]) as tmp:
            adata = m.predict_cells(cells, image, x_col=x_col, y_col=y_col, id_col=id_col, mpp=mpp,
                                    drop_outside=drop_outside, batch_size=batch_size, num_workers=num_workers,
                                    cache_dir=cache_dir, progress=progress, out=tmp, target=h5)
        var = adata.var["variance"].to_numpy()
        shown = gene_list or [str(adata.var_names[i]) for i in np.argsort(-var, kind="stable")[:4]]
        with h5py.File(h5, "r") as f:  # only the columns shown are read back
            spatial_columns(adata, f["X"], shown, out / names[1],
                            title=f"{m.config.model} predictions per cell on {image.name}")
    except BaseException:
        owner.abort()
        raise
    owner.record(*(n for n in names if (out / n).exists()))
    dropped = adata.uns["deepspot"]["n_dropped_outside"]
    note = f" ({dropped} outside the image dropped)" if dropped else ""
    console.print(f"{adata.n_obs} cells × {adata.n_vars} genes{note} → {h5}")
