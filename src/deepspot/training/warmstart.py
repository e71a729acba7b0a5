"""Start training from a trained DeepSpot (``deepspot train --init-from MODEL``, ``ds.train(init_from=)``).

A checkpoint written by ``deepspot train`` or by ``deepspot convert`` (a published model) gives the
starting weights:

- the same genes (as a set; any order) -> the whole network continues, with the checkpoint's target
  scaler (its head predicts in that scaler's units), rows of the head reordered to the new panel;
- other genes (new ones, or fewer) -> phi (and a fitted input projection) are kept, the gene head
  (rho) starts fresh for the new panel, and the target scaler is fitted on the new training spots.

The architecture (hidden size, ensemble, pooling, context, input projection) is the checkpoint's, so the
recipe's architecture options are replaced by it. ``freeze='phi'`` trains only the head. The encoder
must be the checkpoint's (same name and feature dim): features of another encoder mean nothing to phi,
so any other is refused with a message naming both.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepspot.config import CheckpointError, ModelConfig, Scaler

log = logging.getLogger(__name__)

FREEZE = ("none", "phi")
ARCH_FIELDS = ("hidden", "n_ensemble", "dropout", "context", "subspot_pool", "neighbor_pool", "input_proj")


def _norm(name: str) -> str:
    return str(name).strip().lower()


@dataclass
class WarmStart:
    """A checkpoint to start from, read and checked against the encoder of the new run."""

    path: Path
    network: torch.nn.Module
    config: ModelConfig
    freeze: str = "none"

    @property
    def context(self) -> str:
        return self.network.context

    def continues(self, genes) -> bool:
        """Whether the new panel is the checkpoint's (as a set): then the head continues too."""
        return sorted(map(str, genes)) == sorted(map(str, self.config.genes))

    def recipe(self, recipe):
        """``recipe`` with the checkpoint's architecture (what the network will be)."""
        a = self.network.config()
        arch = {"hidden": a["hidden"], "n_ensemble": a["n_ensemble"], "dropout": a["dropout"],
                "context": a["context"], "subspot_pool": a["subspot_pool"], "neighbor_pool": a["neighbor_pool"],
                "input_proj": a.get("input_proj")}
        changed = {k: (getattr(recipe, k), v) for k, v in arch.items() if getattr(recipe, k) != v}
        if changed:
            log.info("--init-from %s: the checkpoint's architecture replaces the recipe's (%s)", self.path,
                     ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
        return dataclasses.replace(recipe, **arch)

    def scaler(self, genes, fitted: Scaler | None) -> Scaler | None:
        """The target scaler of the run: the checkpoint's (rows in ``genes`` order) when the head continues,
        else ``fitted`` (fitted on the new training spots)."""
        if not self.continues(genes):
            return fitted
        old = self.config.scaler
        if old is None:
            return None
        pos = [list(self.config.genes).index(g) for g in genes]
        pick = lambda v: None if v is None else np.asarray(v)[pos]  # noqa: E731
        return Scaler(old.kind, pick(old.a), pick(old.b), pick(old.lo), pick(old.hi))

    def build(self, genes) -> torch.nn.Module:
        """A network for ``genes``: the checkpoint's weights where they apply (see the module doc), phi frozen
        when asked. Seeded by the caller (the new head's initialisation)."""
        from deepspot.models.deepsets import DeepSpot

        args = dict(self.network.config(), n_genes=len(genes))
        model = DeepSpot(**args)
        old = self.network.state_dict()
        new = model.state_dict()
        if self.continues(genes):
            pos = torch.as_tensor([list(self.config.genes).index(g) for g in genes], dtype=torch.long)
            for k, v in old.items():
                if k == "rho.linear.weight":
                    v = v[..., pos]
                elif k == "rho.linear.bias":
                    v = v[..., pos]
                new[k] = v.clone()
            kept = "all weights (same genes)"
        else:
            for k, v in old.items():
                if not k.startswith("rho."):
                    new[k] = v.clone()
            kept = f"phi; a new gene head for {len(genes)} genes"
        model.load_state_dict(new, strict=True)
        if self.freeze == "phi":
            for name, p in model.named_parameters():
                if not name.startswith("rho."):
                    p.requires_grad_(False)
        log.info("--init-from %s: kept %s%s", self.path, kept, "; phi frozen" if self.freeze == "phi" else "")
        return model

    def provenance(self, genes) -> dict:
        """What the checkpoint records about where its training started."""
        return {"path": str(self.path), "encoder": self.config.encoder.name,
                "kept": "all" if self.continues(genes) else "phi", "freeze": self.freeze,
                "genes_before": len(self.config.genes), "genes_after": len(genes)}


def read_init(path: str | Path, encoder_name: str, encoder_dim: int, freeze: str = "none") -> WarmStart:
    """Read checkpoint ``path`` to start from; the encoder of the new run must be the checkpoint's."""
    from deepspot.models.checkpoint import load_checkpoint
    from deepspot.models.deepsets import DeepSpot

    freeze = _norm(freeze or "none")
    if freeze not in FREEZE:
        raise ValueError(f"--freeze {freeze!r}: choose {' or '.join(FREEZE)}")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--init-from {path}: not a checkpoint folder (model.safetensors + config.json)")
    network, cfg = load_checkpoint(path)
    if not isinstance(network, DeepSpot) or cfg.model != "deepspot":
        raise CheckpointError(f"--init-from {path}: a {cfg.model} model; only deepspot (spot) models can be "
                              f"trained further here")
    if _norm(cfg.encoder.name) != _norm(encoder_name) or int(cfg.encoder.dim) != int(encoder_dim):
        raise CheckpointError(f"--init-from {path}: trained on encoder '{cfg.encoder.name}' ({cfg.encoder.dim}-d), "
                              f"this run uses '{encoder_name}' ({int(encoder_dim)}-d); pass --encoder "
                              f"{cfg.encoder.name} (features of another encoder mean nothing to its phi)")
    network.train()
    return WarmStart(path, network, cfg, freeze)


__all__ = ["FREEZE", "WarmStart", "read_init"]
