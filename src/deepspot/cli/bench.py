"""``deepspot bench hest``: a HEST-Bench task folder, ridge (their protocol) and DeepSpot per fold."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from deepspot.cli import app

bench_app = typer.Typer(no_args_is_help=True, help="Public benchmarks run as published.")
app.add_typer(bench_app, name="bench")


@bench_app.command("hest")
def hest(root: Path = typer.Option(..., help="A HEST-Bench task folder (e.g. bench_data/IDC): splits/, patches/, "
                                   "adata/, var_50genes.json."),
         encoder: str = typer.Option("efficientnet-lite0", help="Encoder that embeds the patches (see `deepspot "
                                     "encoders`)."),
         encoder_weights: Optional[Path] = typer.Option(None, help="Local weights for the encoder."),
         gene_list: str = typer.Option("var_50genes.json", help="Gene list file in the task folder."),
         deepspot: bool = typer.Option(True, help="Train and score DeepSpot per fold beside ridge."),
         context: str = typer.Option("spot_neighbors", help="DeepSpot context: spot or spot_neighbors (patch "
                                     "files hold no sub-spots)."),
         max_epochs: Optional[int] = typer.Option(None, help="DeepSpot epochs (default: the recipe's)."),
         out: Optional[Path] = typer.Option(None, help="Folder for folds.csv and per_gene.csv."),
         seed: int = typer.Option(2024), progress: bool = typer.Option(False)):
    """Run one HEST-Bench task as published: per fold, ridge on PCA-256 of the patch embeddings and DeepSpot on
    the same features; prints the per-task Pearson next to the leaderboard's figure for the encoder."""
    from rich.console import Console

    console = Console(soft_wrap=True)
    if context not in ("spot", "spot_neighbors"):
        raise ValueError(f"--context {context!r}: HEST patch files hold one patch per spot (spot or spot_neighbors)")
    if out is not None:
        from deepspot.inference.preflight import check_out_dir

        check_out_dir(out)
    from deepspot.evaluation.hest_bench import run_task
    from deepspot.features.encoders import load_encoder

    enc = load_encoder(encoder, weights=encoder_weights)
    res = run_task(root, enc, gene_list=gene_list, deepspot=deepspot, context=context, max_epochs=max_epochs,
                   seed=seed, progress=progress, echo=lambda m: console.print(m, markup=False, highlight=False))
    s = res.summary
    lb = s["leaderboard"]
    console.print(f"HEST-Bench {s['task']} ({s['folds']} folds, {len(res.genes)} genes), encoder {s['encoder']}: "
                  f"mean per-gene Pearson over folds", markup=False, highlight=False)
    console.print(f"  ridge (HEST protocol)   {s['ridge']:.4f} ± {s['ridge_std']:.4f}", markup=False, highlight=False)
    if "deepspot" in s:
        console.print(f"  deepspot ({context})  {s['deepspot']:.4f} ± {s['deepspot_std']:.4f}", markup=False,
                      highlight=False)
    console.print("  leaderboard (HEST README 08.30.24, ridge): " +
                  (f"{lb:.4f}" if lb is not None else f"no published figure for {s['encoder']} on {s['task']}"),
                  markup=False, highlight=False)
    if s.get("leaderboard_note") and lb is not None:
        console.print(f"  note: {s['leaderboard_note']}", markup=False, highlight=False)
    if out is not None:
        from deepspot.io.outputs import write_csv

        write_csv(res.folds.set_index("fold"), out / "folds.csv")
        write_csv(res.per_gene.set_index(["fold", "gene"]), out / "per_gene.csv")
        console.print(f"wrote {out / 'folds.csv'} and {out / 'per_gene.csv'}", markup=False, highlight=False)
