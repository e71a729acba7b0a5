"""The fixed vocabularies every stage checks against (model kinds, units, rules, presets), the gene-name check
and the two errors meant for the user."""
from __future__ import annotations

SCHEMA_VERSION = 2
FEATURE_MODES = ("standard", "fast")
SPOT_MODELS = ("deepspot",)
CELL_MODELS = ("deepcell", "deepspot2cell", "deepspot2cell-pooled")
MODEL_KINDS = SPOT_MODELS + CELL_MODELS  # the one list of model kinds (models/registry.py binds each to its class)
EXTERNAL_ENCODER = "external"  # features made outside deepspot (a model converted with --feature-dim)
NEIGHBOR_RULES = ("knn", "radius", "none")
SCALERS = ("standard", "minmax")
UNITS = ("um", "px")
# a spot grid may also be in "px20x": pixels at 20x (~0.5 µm/px), doubled on a 40x slide (the original's TCGA rule)
GRID_UNITS = UNITS + ("px20x",)
GRID_ORIGINS = ("edge", "original")
GRID_LAYOUTS = ("hex", "square")  # hex: Visium's offset rows; square: Visium HD-like bins
SUBSPOT_RULES = ("split", "floor")
TISSUE_RULES = ("otsu", "mean_rgb", "tile_mean_rgb", "none")
GEOMETRY_PRESETS = ("visium", "original", "tcga")
TARGETS = "normalize_total(1e4) + log1p"


def gene_name_faults(genes) -> tuple[list[int], list[str]]:
    """The one rule for a list of gene names (a checkpoint's genes, a user's --genes): (positions of empty
    names, names repeated, in the order of their first repeat). Both empty: the list is fine."""
    blank = [i for i, g in enumerate(genes) if not str(g).strip()]
    seen, dups = set(), []
    for g in genes:
        if g in seen and g not in dups:
            dups.append(g)
        seen.add(g)
    return blank, dups


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be used; the message names the file (and field) and the reason."""


class MppError(ValueError):
    """A slide's µm per pixel is unknown or invalid where one is needed."""
