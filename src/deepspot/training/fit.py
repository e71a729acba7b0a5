"""Fit a bag model with Lightning: early stopping on validation loss, best weights restored."""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepspot.models.bags import Bags
from deepspot.training.module import BagRegressor

log = logging.getLogger(__name__)


class BagBatches(Dataset):
    """Index dataset; ``collate`` gathers the bags and targets of a batch of spot indices."""

    def __init__(self, bags: Bags, targets: torch.Tensor, index: np.ndarray):
        self.bags, self.targets, self.index = bags, targets, torch.as_tensor(np.asarray(index), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> int:
        return int(self.index[i])

    def collate(self, ix: list[int]):
        ix = torch.as_tensor(ix, dtype=torch.long)
        return self.bags.batch(ix), self.targets[ix]


class KeepBest(L.Callback):
    """Keeps a copy of the model weights at the best validation loss."""

    def __init__(self, monitor: str = "val_loss"):
        self.monitor, self.best, self.state, self.epoch = monitor, float("inf"), None, -1

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        v = trainer.callback_metrics.get(self.monitor)
        if v is not None and float(v) < self.best:
            self.best, self.epoch = float(v), trainer.current_epoch
            self.state = copy.deepcopy(pl_module.model.state_dict())


def fit(model: torch.nn.Module, bags: Bags, targets: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
        loss: str = "mse", lr: float = 1e-4, weight_decay: float = 1e-6, batch_size: int = 64,
        max_epochs: int = 200, patience: int = 20, seed: int = 2024, precision: str = "32-true",
        log_dir: str | Path | None = None, progress: bool = True, accelerator: str = "cpu",
        devices: int | str = 1, strategy: str = "auto") -> dict:
    """Train ``model`` in place; returns a summary (best val loss, epochs run).

    targets: (N, G) float, rows aligned with ``bags``; train_idx / val_idx index into them.
    """
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    L.seed_everything(seed, workers=True, verbose=False)
    tgt = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    train_ds, val_ds = BagBatches(bags, tgt, train_idx), BagBatches(bags, tgt, val_idx)
    g = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(train_ds, batch_size=batch_size, shuffle=True, collate_fn=train_ds.collate, generator=g)
    val_dl = DataLoader(val_ds, batch_size=max(batch_size, 1024), shuffle=False, collate_fn=val_ds.collate)
    module = BagRegressor(model, loss=loss, lr=lr, weight_decay=weight_decay)
    keep = KeepBest()
    callbacks = [keep, L.pytorch.callbacks.EarlyStopping("val_loss", patience=patience, mode="min")]
    if progress:
        callbacks.append(L.pytorch.callbacks.RichProgressBar(leave=False))
    logger = False
    if log_dir is not None:
        logger = L.pytorch.loggers.CSVLogger(str(log_dir), name="train")
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False, deterministic=True,
                        precision=precision, accelerator=accelerator, devices=devices, strategy=strategy,
                        num_sanity_val_steps=0, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*number of training batches.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        trainer.fit(module, train_dl, val_dl)
    if keep.state is not None:
        model.load_state_dict(keep.state)
    model.eval()
    return {"best_val_loss": keep.best, "best_epoch": keep.epoch, "epochs": trainer.current_epoch}
