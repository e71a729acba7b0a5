"""``deepspot predict-cohort``: predict every slide of a manifest, on Ray or in-process, resumable."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from deepspot.cli import app

console = Console(stderr=False)


@app.command("predict-cohort")
def predict_cohort(
        manifest: Path = typer.Argument(..., help="CSV with a header: path (required), id, mpp (optional)."),
        model: Path = typer.Option(..., help="Checkpoint folder."),
        out: Path = typer.Option(..., help="Output folder: <id>.h5ad, <id>_spots.csv, _state.jsonl, _summary.csv."),
        backend: str = typer.Option("ray", help="ray (one task per slide) or local (in-process loop)."),
        address: Optional[str] = typer.Option(None, help="Ray cluster address (e.g. head:6379 or 'auto'); "
                                                         "default: start a local Ray."),
        num_cpus: float = typer.Option(1.0, help="CPUs per slide task (Ray resource; also torch threads)."),
        num_gpus: float = typer.Option(0.0, help="GPUs per slide task (Ray resource; e.g. 1, or 0.5 to share)."),
        max_in_flight: Optional[int] = typer.Option(None, help="Most slide tasks submitted at once "
                                                                "(default: twice what the cluster can run)."),
        retry_failed: bool = typer.Option(False, help="Run slides that failed before again."),
        mpp: Optional[float] = typer.Option(None, help="µm per pixel for slides whose manifest row has none "
                                                       "(overrides the file's)."),
        tissue: Optional[str] = typer.Option(None, help="Tissue filter: otsu, mean_rgb, tile_mean_rgb or none "
                                             "(default: the model geometry's, otsu for ours)."),
        batch_size: int = typer.Option(16, help="Spots per encoder batch."),
        num_workers: int = typer.Option(0, help="DataLoader workers per slide (crop reading)."),
        plot_genes: int = typer.Option(0, help="Also write <id>_genes.png with the N most variable genes."),
        device: str = typer.Option("auto", help="auto (cuda when a GPU is visible), cpu or cuda."),
        autocast: Optional[str] = typer.Option(None, help="Encoder autocast dtype on GPU: bf16 or fp16."),
        encoder_weights: Optional[Path] = typer.Option(None, help="Local weights for the model's encoder "
                                                                  "(a path every worker can read)."),
        cache_dir: Optional[Path] = typer.Option(None, help="Feature cache folder (reused by reruns)."),
        new_run: bool = typer.Option(False, "--new-run", help="--out holds another run's results (other model, "
                                     "options or mpp): write this run into a new folder <out>-2, -3…"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Remove the results and state already in --out, "
                                       "then run every slide."),
        fmt: str = typer.Option("h5ad", "--format", help="h5ad, or spatialdata: <id>.zarr (slide image, spot "
                                "circles, prediction table; extra \\[spatialdata]) in place of <id>.h5ad."),
        progress: bool = typer.Option(True, help="Show a progress bar over slides.")):
    """Predict a cohort of slides: one task per slide, skips finished slides on rerun, never stops on a bad one.

    Exit code 1 when any slide failed; _summary.csv in the output folder lists every slide and its reason.
    """
    from deepspot.cli import on_interrupt
    from deepspot.config.requests import CohortRequest
    from deepspot.config.runtime import settings
    from deepspot.inference.cohort import run_cohort

    # parse -> request (checked once) -> run
    request = CohortRequest(manifest, model, out, backend=backend, address=address, num_cpus=num_cpus,
                            num_gpus=num_gpus, max_in_flight=max_in_flight, retry_failed=retry_failed, mpp=mpp,
                            tissue=tissue, batch_size=batch_size, num_workers=num_workers, plot_genes=plot_genes,
                            device=device, autocast=autocast, encoder_weights=encoder_weights, cache_dir=cache_dir,
                            new_run=new_run, overwrite=overwrite, fmt=fmt)
    on_interrupt(f"slides finished so far are kept in {out} (rerun the same command to resume); "
                 f"no partial files")
    with settings.override(progress=progress):
        s = run_cohort(request, echo=console.print)
    spots = sum(r.n_spots for r in s.ran if r.ok)
    console.print(f"ran {len(s.ran)} slides in {s.seconds:.1f} s ({spots} spots); "
                  f"{s.n_done} done in total, {len(s.failures)} failed → {s.out_dir}")
    if s.failures:
        console.print(f"[red]{len(s.failures)} slide(s) failed:[/red]")
        for f in s.failures:
            console.print(f"  {f['id']}: {f['error']}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(1)  # (typer.Exit is swallowed by main()'s standalone_mode=False)
