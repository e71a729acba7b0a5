"""``deepspot convert-weights``: published DeepSpot / DeepCell / DeepSpot2Cell files -> safetensors + config.json,
no code run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from deepspot.cli import app
from deepspot.config import ORIGINAL_SPOT_PX, describe_geometries


@app.command("convert-weights")
def convert_weights(src: Path = typer.Argument(..., help="Published checkpoint (.pkl/.pt/.ckpt saved with torch.save)."),
                    out_arg: Optional[Path] = typer.Argument(None, metavar="[OUT]", help="Checkpoint folder to write."),
                    out: Optional[Path] = typer.Option(None, "--out", help="Checkpoint folder to write (or give it as OUT)."),
                    genes: Optional[Path] = typer.Option(None, help="Gene list in model order: one per line, csv/json, or "
                                                         "the original's gene table (info_highly_variable_genes.csv)."),
                    encoder: Optional[str] = typer.Option(None, help="Encoder the model was trained on (default: inferred "
                                                          "from the feature dim)."),
                    feature_dim: Optional[int] = typer.Option(None, help="For features made outside deepspot: their "
                                                              "size; the model then predicts from given features only."),
                    kind: Optional[str] = typer.Option(None, help="deepspot | deepcell | deepspot2cell, where a state "
                                                       "dict does not say."),
                    context: Optional[str] = typer.Option(None, help="Context mode, if the file does not record it."),
                    geometry: Optional[str] = typer.Option(None, help="DeepSpot: spot geometry stored with the model: "
                                                           f"{describe_geometries('visium')}."),
                    spot_px: Optional[float] = typer.Option(None, help="--geometry original: spot side in px "
                                                            f"(default {ORIGINAL_SPOT_PX})."),
                    spacing_px: Optional[float] = typer.Option(None, help="--geometry original: spacing in px (default: the spot side).")):
    """Read a published DeepSpot, DeepCell or DeepSpot2Cell checkpoint with a restricted unpickler (only tensors
    and known module classes as inert placeholders; anything else is refused) and write safetensors + JSON."""
    from deepspot.config import geometry_preset
    from deepspot.convert import convert_checkpoint

    if (out is None) == (out_arg is None):
        raise ValueError("give the checkpoint folder to write once: as OUT or as --out")
    if not src.exists():
        raise FileNotFoundError(f"{src}: file not found")
    from deepspot.models.checkpoint import checkpoint_folder

    checkpoint_folder(out or out_arg).check()
    geo = None
    if geometry is not None or spot_px is not None or spacing_px is not None:
        geo = geometry_preset(geometry or "visium", spot_px=spot_px, spacing_px=spacing_px).to_dict()
    path = convert_checkpoint(src, out or out_arg, genes=genes, encoder=encoder, context=context, kind=kind,
                              feature_dim=feature_dim, geometry=geo)
    typer.echo(f"wrote {path} (model.safetensors + config.json)")
