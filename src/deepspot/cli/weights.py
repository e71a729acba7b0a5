"""``deepspot convert-weights``: published DeepSpot pickles -> safetensors + config.json, no code run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from deepspot.cli import app


@app.command("convert-weights")
def convert_weights(src: Path = typer.Argument(..., help="Published checkpoint (.pkl/.pt/.ckpt saved with torch.save)."),
                    out: Path = typer.Option(..., help="Checkpoint folder to write."),
                    genes: Optional[Path] = typer.Option(None, help="Gene list file (one per line, or csv/json), in model order."),
                    encoder: Optional[str] = typer.Option(None, help="Encoder the model was trained on (default: inferred from the feature dim)."),
                    context: Optional[str] = typer.Option(None, help="Context mode, if the file does not record it."),
                    geometry: str = typer.Option("visium", help="Spot geometry stored with the model: visium (55/100 "
                                                 "µm hex), original (the original's square pixel grid and crops) "
                                                 "or tcga (160/290 px at 20x, doubled at 40x)."),
                    spot_px: Optional[float] = typer.Option(None, help="--geometry original: spot side in px (default 100)."),
                    spacing_px: Optional[float] = typer.Option(None, help="--geometry original: spacing in px (default: the spot side).")):
    """Read a published DeepSpot checkpoint with a restricted unpickler (only tensors and known module
    classes as inert placeholders; anything else is refused) and write safetensors + JSON."""
    from deepspot.config import geometry_preset
    from deepspot.convert import convert_deepspot

    if not src.exists():
        raise FileNotFoundError(f"{src}: file not found")
    geo = geometry_preset(geometry, spot_px=spot_px, spacing_px=spacing_px).to_dict()
    path = convert_deepspot(src, out, genes=genes, encoder=encoder, context=context, geometry=geo)
    typer.echo(f"wrote {path} (model.safetensors + config.json)")
