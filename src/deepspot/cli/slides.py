"""``deepspot convert-slide``: any image deepspot reads -> a tiled pyramidal TIFF with its mpp (streamed)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from deepspot.cli import app

console = Console(stderr=False, soft_wrap=True)


@app.command("convert-slide")
def convert_slide_cmd(
        src: Path = typer.Argument(..., help="Image or slide to convert (PNG/JPG of any size, single-level or "
                                   "pyramidal TIFF, SVS…)."),
        out: Path = typer.Argument(..., help="The .tif to write (BigTIFF, tiled, levels halving down to one tile)."),
        mpp: Optional[float] = typer.Option(None, help="µm per pixel of SRC (required when SRC has none; "
                                            "overrides the file's)."),
        tile: int = typer.Option(512, help="Tile side in pixels (a multiple of 16)."),
        compression: str = typer.Option("jpeg", help="jpeg (quality --quality), zlib (lossless) or none."),
        quality: int = typer.Option(90, help="JPEG quality."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
        progress: bool = typer.Option(True, help="Show a progress bar.")):
    """Write SRC as a tiled pyramidal TIFF that `deepspot predict` reads with flat memory, tile by tile
    (memory: a few rows of tiles; the output appears only when complete)."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from deepspot.io.pyramid import convert_slide

    t0 = time.perf_counter()
    with Progress(TextColumn("convert"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  TimeRemainingColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task("convert", total=None)

        def tick(done, total):
            bar.update(task, completed=done, total=total)

        res = convert_slide(src, out, mpp=mpp, tile=tile, compression=compression, quality=quality,
                            overwrite=overwrite, progress=tick)
    w, h = res.levels[0]
    console.print(f"wrote {res.path}: {w}x{h} at {res.mpp:g} µm/px, {len(res.levels)} levels "
                  f"({time.perf_counter() - t0:.0f} s)", markup=False, highlight=False)
