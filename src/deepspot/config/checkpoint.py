"""The checkpoint config (:class:`ModelConfig`, the typed ``config.json``), its reading and the migration of
configs written before the schema version existed."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from deepspot.config.constants import (CELL_MODELS, CheckpointError, MODEL_KINDS, SCHEMA_VERSION, TARGETS,
                                       gene_name_faults)
from deepspot.config.fields import _Fields
from deepspot.config.geometry import CellGeometry, SpotGeometry
from deepspot.config.scaler import Scaler


# --------------------------------------------------------------------------- checkpoint config


@dataclass(frozen=True)
class EncoderRef:
    """The image encoder a model was trained on: registry name and feature dim d."""

    name: str
    dim: int


@dataclass
class ModelConfig:
    """The typed ``config.json`` of a checkpoint.

    model: kind ('deepspot', 'deepcell', 'deepspot2cell', 'deepspot2cell-pooled'); model_args: the network's constructor
    arguments (``in_dim`` = encoder dim, ``n_genes`` = len(genes)); genes: output order; geometry:
    :class:`SpotGeometry` (spot models) or :class:`CellGeometry` (cell models); scaler: undone on
    every prediction; mpp: µm/px used in training (cell models); training: provenance (loss, lr,
    seed, split, epochs…); scores: held-out scores; extra: any other top-level keys, kept as they are
    (e.g. ``converted_from``).
    """

    model: str
    model_args: dict
    encoder: EncoderRef
    genes: list[str]
    geometry: SpotGeometry | CellGeometry
    scaler: Scaler | None = None
    targets: str = TARGETS
    mpp: float | None = None
    training: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def context(self) -> str:
        """The context mode (DeepSpot: 'spot'…'spot_subspot_neighbors'; cells: 'cell', 'cell_neighbors')."""
        return str(self.model_args.get("context", ""))

    @property
    def feature_mode(self) -> str:
        """How features are made: 'standard' or 'fast' (spot models trained with --fast)."""
        return self.geometry.feature_mode if isinstance(self.geometry, SpotGeometry) else "standard"

    @property
    def is_cell_model(self) -> bool:
        return self.model in CELL_MODELS

    def check_feature_mode(self, mode: str, source: str = "model") -> str:
        """Refuse to use a model with features made another way than in its training."""
        if mode != self.feature_mode:
            hint = "pass --fast" if self.feature_mode == "fast" else "drop --fast"
            raise CheckpointError(f"{source}: model was trained on {self.feature_mode!r} features, asked for "
                                  f"{mode!r} ({hint})")
        return mode

    def check_genes(self, genes, source: str = "model") -> None:
        """Every requested gene must be one the model predicts."""
        missing = [g for g in (genes or ()) if g not in set(self.genes)]
        if missing:
            lower = {str(g).lower(): g for g in self.genes}
            case = [f"{g} -> {lower[str(g).lower()]}" for g in missing if str(g).lower() in lower]
            raise CheckpointError(f"{source}: {len(missing)} requested genes are not predicted by this model "
                                  f"(e.g. {', '.join(map(str, missing[:3]))})"
                                  + (f"; did you mean {', '.join(case[:3])}?" if case else
                                     "; its panel is fixed at training: `deepspot train --add-genes` adds markers"))

    def check_encoder_dim(self, dim: int, source: str = "model") -> None:
        if int(dim) != self.encoder.dim:
            raise CheckpointError(f"{source}: model expects {self.encoder.dim}-d features from encoder "
                                  f"'{self.encoder.name}', got {int(dim)}-d features")

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "model": self.model, "model_args": dict(self.model_args),
                "encoder": {"name": self.encoder.name, "dim": self.encoder.dim}, "genes": list(self.genes),
                "geometry": self.geometry.to_dict(), "scaler": None if self.scaler is None else self.scaler.to_dict(),
                "targets": self.targets, "mpp": self.mpp, "training": dict(self.training),
                "scores": dict(self.scores), **self.extra}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Check every field (one CheckpointError naming ``source`` and the field) and build the config."""
        d = migrate(d, source)
        f = _Fields(d, source)
        kind = f.choice("model", MODEL_KINDS)
        enc = f.sub("encoder")
        encoder = EncoderRef(enc.get("name", types=str), enc.integer("dim", minimum=1))
        genes = f.get("genes", types=list, name="a list of gene names")
        if not genes or not all(isinstance(g, str) for g in genes):
            f.fail("genes", "must be a non-empty list of gene names")
        blank, dups = gene_name_faults(genes)
        if blank:
            f.fail("genes", f"has {len(blank)} empty name(s) (first at position {blank[0]})")
        if dups:
            f.fail("genes", f"has duplicates ({', '.join(map(repr, dups[:3]))}{' …' if len(dups) > 3 else ''})")
        args = f.sub("model_args")
        in_dim, n_genes = args.integer("in_dim", minimum=1), args.integer("n_genes", minimum=1)
        if in_dim != encoder.dim:
            args.fail("in_dim", f"is {in_dim} but encoder.dim is {encoder.dim}")
        if n_genes != len(genes):
            args.fail("n_genes", f"is {n_genes} but genes lists {len(genes)}")
        for key, v in args.d.items():  # sizes checked before a network of them is allocated
            bound = MAX_GENES if key == "n_genes" else MAX_MODEL_SIZE
            if isinstance(v, (int, float)) and not isinstance(v, bool) and key not in ("dropout", "lr") \
                    and (not math.isfinite(v) or abs(v) > bound):
                args.fail(key, f"is {v!r}, over the bound {bound} (the network would not fit in memory)")
        geo = f.get("geometry", types=dict, name="an object")
        try:
            geometry = (CellGeometry.from_dict(geo, source, "geometry.") if kind in CELL_MODELS
                        else SpotGeometry.from_dict(geo, source, "geometry."))
        except CheckpointError:
            raise
        except ValueError as e:
            raise CheckpointError(f"{source}: geometry {e}") from None
        scaler = d.get("scaler")
        scaler = None if not scaler else Scaler.from_dict(scaler, source, "scaler.", n_genes=len(genes))
        known = {"schema_version", "model", "model_args", "encoder", "genes", "geometry", "scaler", "targets",
                 "mpp", "training", "scores"}
        return cls(kind, dict(args.d), encoder, list(genes), geometry, scaler,
                   f.get("targets", TARGETS, str), f.number("mpp", None, positive=True),
                   dict(f.get("training", {}, dict)), dict(f.get("scores", {}, dict)),
                   {k: v for k, v in d.items() if k not in known}, SCHEMA_VERSION)

    @classmethod
    def coerce(cls, config: "ModelConfig | dict", source: str = "config") -> "ModelConfig":
        """A ModelConfig as it is, or a config dict checked and typed."""
        return config if isinstance(config, cls) else cls.from_dict(config, source)


MAX_MODEL_SIZE = 65536  # any size in model_args (hidden, heads, in_dim…)
MAX_GENES = 1_000_000


def read_config_file(folder, name: str = "config.json") -> "ModelConfig":
    """The checked :class:`ModelConfig` of checkpoint folder ``folder`` (its ``name`` file), without
    importing torch: every problem is one CheckpointError naming the file."""
    import json
    from pathlib import Path

    folder = Path(folder)
    cfg_file = folder / name
    if not folder.exists():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if not cfg_file.exists():
        raise CheckpointError(f"{folder}: not a deepspot checkpoint (no {name})")
    try:
        raw = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise CheckpointError(f"{cfg_file}: JSON nested too deeply to be a deepspot config") from None
    except OSError as e:
        raise CheckpointError(f"{cfg_file}: cannot read ({e.strerror or type(e).__name__})") from None
    return ModelConfig.from_dict(raw, source=str(cfg_file))


def migrate(d: dict, source: str = "config.json") -> dict:
    """A config dict of any schema version as the current one (a new dict; ``d`` is not changed).

    Version 1 (``format_version`` 1, or none: the checkpoints written before the typed config) differs
    only in where it kept the feature mode: at the top level (``feature_mode``) in some, in the
    geometry in the others.
    """
    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: config must be a JSON object, got {type(d).__name__}")
    version = d.get("schema_version", d.get("format_version", 1))
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{source}: schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise CheckpointError(f"{source}: schema_version {version} is newer than this deepspot reads "
                              f"({SCHEMA_VERSION}); update deepspot")
    out = {k: v for k, v in d.items() if k != "format_version"}
    args = out.get("model_args")
    if out.get("model") == "deepspot2cell" and isinstance(args, dict) and "aggregate" in args:
        out["model"] = "deepspot2cell-pooled"  # written before 'deepspot2cell' became the published architecture
    if version == 1:
        mode = out.pop("feature_mode", None)
        geo = out.get("geometry")
        if mode and isinstance(geo, dict) and "grid" in geo and not geo.get("feature_mode"):
            out["geometry"] = {**geo, "feature_mode": mode}
    out["schema_version"] = SCHEMA_VERSION
    return out
