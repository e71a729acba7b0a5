"""``deepspot tcga``: the original's published TCGA predictions (a Hugging Face dataset): list, download, read."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from deepspot.cli import app

console = Console(stderr=False, soft_wrap=True)
tcga_app = typer.Typer(no_args_is_help=True, help="The published TCGA predicted-expression dataset (Hugging Face): "
                                                  "list its slides, download one and read it into AnnData.")
app.add_typer(tcga_app, name="tcga")

_REPO = typer.Option(None, "--repo-id", help="Hugging Face dataset (default: the original's, "
                                             "nonchev/TCGA_digital_spatial_transcriptomics).")
_SOURCE = typer.Option(None, "--source", help="A local copy laid out like the dataset (metadata_*.csv + "
                                              "<dataset>/<slide_type>/<sample>.h5ad.gz) instead of the hub.")
_META = typer.Option(None, "--metadata", help="Metadata CSV name (default: the latest metadata_*.csv).")


@tcga_app.command("list")
def list_slides(dataset: Optional[str] = typer.Option(None, help="Only this cohort, e.g. TCGA_SKCM."),
                n: int = typer.Option(10, help="Rows to show."),
                repo_id: Optional[str] = _REPO, source: Optional[Path] = _SOURCE, metadata: Optional[str] = _META):
    """The slides of the dataset: counts per cohort and slide type, then the first rows."""
    from deepspot.io import tcga

    meta = tcga.metadata(repo_id or tcga.REPO_ID, filename=metadata, local_dir=source)
    if dataset:
        meta = meta[meta["dataset"] == dataset]
        if meta.empty:
            raise ValueError(f"--dataset {dataset}: no slides of that cohort in the metadata")
    counts = meta.groupby(["dataset", "slide_type"]).agg(slides=("sample_id", "size"), spots=("n_spots", "sum"))
    console.print(f"{meta.attrs.get('source', '')}: {len(meta)} slides, {int(meta['n_spots'].sum())} spots",
                  markup=False, highlight=False)
    console.print(counts.to_string(), markup=False, highlight=False)
    console.print(meta[["dataset", "slide_type", "sample_id", "n_spots"]].head(n).to_string(index=False),
                  markup=False, highlight=False)


@tcga_app.command("download")
def download(sample: str = typer.Argument(..., help="sample_id, or a prefix of it no other slide shares."),
             out: Path = typer.Option(Path("."), help="Folder for <sample_id>.h5ad (decompressed)."),
             repo_id: Optional[str] = _REPO, source: Optional[Path] = _SOURCE, metadata: Optional[str] = _META):
    """Download one slide's predictions (into the Hugging Face cache), write it as <out>/<sample_id>.h5ad and
    say what it holds."""
    from deepspot.io import tcga
    from deepspot.io.owner import OutputFolder, safe_name

    repo = repo_id or tcga.REPO_ID
    owner = OutputFolder(out, "tcga download", shared=True, legacy=lambda n: False).check()
    meta = tcga.metadata(repo, filename=metadata, local_dir=source)
    row = tcga.find(meta, sample)
    name = safe_name(f"{row['sample_id']}.h5ad", "sample_id", meta.attrs.get("source"))
    target = owner.check_target(name)
    gz = tcga.download(str(row["sample_id"]), repo_id=repo, local_dir=source, meta=meta)
    owner.open()
    try:
        a = tcga.read(gz, out=target)
    except BaseException:
        owner.abort()
        raise
    owner.record(name)
    console.print(f"{row['dataset']} {row['slide_type']} {row['sample_id']}: {a.n_obs} spots × {a.n_vars} genes; "
                  f"obs: {', '.join(map(str, a.obs.columns[:8])) or '-'}; obsm: {', '.join(a.obsm.keys()) or '-'}",
                  markup=False, highlight=False)
    console.print(f"wrote {target} (from {gz})", markup=False, highlight=False)
