"""Fit a bag model with Lightning: early stopping on validation loss, best weights restored.

Data path: a batch is gathered with one tensor index per batch (``bags.batch(ix)``), never one Python
call per spot. :class:`IndexBatchSampler` yields whole index tensors (seeded shuffle per epoch) and
shards them across DDP ranks itself, so the same code runs on one process or many.

Reproducibility: the same ``seed`` (and the same model initialisation, which the caller seeds) gives
the same weights. ``fit`` leaves no process state behind except the seeded RNGs: the logger levels and
``torch``'s deterministic-algorithms flag it sets for the run are restored on return.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deepspot.config.requests import TrainRequest
from deepspot.config.runtime import settings
from deepspot.models.bags import Bags
from deepspot.training.module import BagRegressor

log = logging.getLogger(__name__)

PRECISIONS = {"32": "32-true", "fp32": "32-true", "32-true": "32-true",
              "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-true",
              "16": "16-mixed", "fp16": "16-mixed", "16-mixed": "16-mixed", "16-true": "16-true"}


def resolve_precision(precision: str, accelerator: str = "cpu") -> str:
    """Lightning precision from a short name: 32 | bf16 | fp16 (mixed) or Lightning's own names.
    fp16 autocast does not exist on CPU: there it becomes bf16-mixed, with a logged note."""
    p = PRECISIONS.get(str(precision).lower())
    if p is None:
        raise ValueError(f"unknown precision {precision!r}; choose 32, bf16 or fp16 (or {', '.join(sorted(set(PRECISIONS.values())))})")
    if p == "16-mixed" and accelerator == "cpu":
        log.warning("fp16 mixed precision is not available on CPU; using bf16-mixed")
        p = "bf16-mixed"
    return p


class BagBatches(Dataset):
    """``ds[ix]`` with ``ix`` a LongTensor of spot indices -> (model inputs, targets) of that batch."""

    def __init__(self, bags: Bags, targets: torch.Tensor, index: np.ndarray | None = None):
        self.bags, self.targets = bags, targets
        self.index = None if index is None else torch.as_tensor(np.asarray(index), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets) if self.index is None else len(self.index)

    def __getitem__(self, ix: torch.Tensor):
        ix = torch.as_tensor(ix, dtype=torch.long)
        return self.bags.batch(ix), self.targets[ix]

    def collate(self, ix: list[int]):  # per-item path, kept for callers that batch item by item
        return self[torch.as_tensor(ix, dtype=torch.long)]


def _as_is(batch):
    return batch


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class IndexBatchSampler(Sampler):
    """Yields LongTensor batches of ``index`` (shuffled per epoch with ``seed + epoch`` when ``shuffle``).

    Under DDP (torch.distributed initialised when iteration starts) every rank draws the same
    permutation and takes every ``world_size``-th batch; the batch list is padded by wrapping around so
    that all ranks run the same number of steps. ``shard=False`` gives every rank all batches (used for
    validation so that every rank sees the same validation loss).
    """

    def __init__(self, index: np.ndarray, batch_size: int, shuffle: bool = True, seed: int = 0, shard: bool = True,
                 order=None):
        self.index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        self.batch_size, self.shuffle, self.seed, self.shard = int(batch_size), shuffle, int(seed), shard
        self.order = order  # optional (index, seed) -> shuffled index, e.g. chunk-local for lazy stores
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[torch.Tensor]:
        idx = self.index
        if self.shuffle:
            if self.order is not None:
                idx = torch.as_tensor(np.asarray(self.order(idx.numpy(), self.seed + self.epoch)), dtype=torch.long)
            else:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                idx = idx[torch.randperm(len(idx), generator=g)]
        return list(torch.split(idx, self.batch_size)) if len(idx) else []

    def __iter__(self):
        batches = self._batches()
        if self.shuffle:
            self.epoch += 1  # next epoch differs even if nobody calls set_epoch
        rank, world = _dist_info() if self.shard else (0, 1)
        if world > 1 and batches:
            per_rank = math.ceil(len(batches) / world)
            batches = (batches * math.ceil(per_rank * world / len(batches)))[:per_rank * world]
            batches = batches[rank::world]
        return iter(batches)

    def __len__(self) -> int:
        n = math.ceil(len(self.index) / self.batch_size) if len(self.index) else 0
        _, world = _dist_info() if self.shard else (0, 1)
        return math.ceil(n / world) if world > 1 else n


def make_loader(bags: Bags, targets: torch.Tensor, index: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0,
                shard: bool = True) -> DataLoader:
    """A DataLoader whose items are whole batches (no per-spot __getitem__ or collate). Bags that read
    lazily (training/lazy_bags.StoreBags) may give their own shuffle as ``bags.epoch_order(index, seed)``."""
    ds = BagBatches(bags, targets)
    sampler = IndexBatchSampler(index, batch_size, shuffle=shuffle, seed=seed, shard=shard,
                                order=getattr(bags, "epoch_order", None))
    return DataLoader(ds, sampler=sampler, batch_size=None, collate_fn=_as_is)


# the metrics training/module.py logs each epoch, and whether lower or higher is better: what early stopping
# and KeepBest may monitor, and what History keeps
MONITORS = {"val_loss": "min", "val_pearson": "max", "train_loss": "min"}


class KeepBest(L.Callback):
    """Keeps a copy of the model weights at the best value of ``monitor`` (val_loss: lowest;
    val_pearson: highest mean per-gene Pearson across the validation spots; train_loss: lowest epoch
    mean of the training loss, read when the training epoch ends)."""

    def __init__(self, monitor: str = "val_loss"):
        if monitor not in MONITORS:
            raise ValueError(f"unknown monitor {monitor!r}; choose {' or '.join(MONITORS)}")
        self.monitor, self.mode = monitor, MONITORS[monitor]
        self.best = float("inf") if self.mode == "min" else -float("inf")
        self.state, self.epoch = None, -1

    def _better(self, v: float) -> bool:
        return v < self.best if self.mode == "min" else v > self.best

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and not self.monitor.startswith("train_"):
            self._update(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.monitor.startswith("train_"):
            self._update(trainer, pl_module)

    def _update(self, trainer, pl_module):
        v = trainer.callback_metrics.get(self.monitor)
        if v is not None and self._better(float(v)):
            self.best, self.epoch = float(v), trainer.current_epoch
            self.state = copy.deepcopy(pl_module.model.state_dict())

    def on_fit_end(self, trainer, pl_module):
        # restore the best weights in the process that trained (under ddp_spawn a child rank, whose weights
        # and metrics Lightning copies back to the caller) and publish the best loss and epoch with the metrics
        if self.state is not None:
            pl_module.model.load_state_dict(self.state)
            trainer.callback_metrics["best_val"] = torch.tensor(self.best)
            trainer.callback_metrics["best_epoch"] = torch.tensor(float(self.epoch))


class History(L.Callback):
    """The per-epoch metrics Lightning logged (those of ``MONITORS``), one dict per epoch, kept in memory:
    the fit summary's ``history`` (``training_curves.png`` is drawn from it)."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        m = trainer.callback_metrics
        row = {"epoch": int(trainer.current_epoch)}
        row.update({k: round(float(m[k]), 6) for k in MONITORS if k in m})
        self.rows.append(row)


def make_loggers(log_dir: str | Path | None, loggers: str | Sequence[str] | None = None):
    """Lightning loggers under ``log_dir``: 'csv' and/or 'tensorboard' (the latter only when the
    ``tensorboard`` package is importable; otherwise a warning says so and CSV is used)."""
    if log_dir is None:
        if loggers:
            raise ValueError("loggers need a log_dir")
        return False
    kinds = ["csv"] if loggers is None else ([loggers] if isinstance(loggers, str) else list(loggers))
    out = []
    for k in kinds:
        k = k.lower()
        if k == "csv":
            out.append(L.pytorch.loggers.CSVLogger(str(log_dir), name="train"))
        elif k in ("tensorboard", "tb"):
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                log.warning("TensorBoard logging needs the `tensorboard` package (pip install tensorboard); "
                            "logging to CSV in %s instead", log_dir)
                if not any(isinstance(x, L.pytorch.loggers.CSVLogger) for x in out) and "csv" not in kinds:
                    out.append(L.pytorch.loggers.CSVLogger(str(log_dir), name="train"))
                continue
            out.append(L.pytorch.loggers.TensorBoardLogger(str(log_dir), name="tensorboard"))
        else:
            raise ValueError(f"unknown logger {k!r}; choose csv or tensorboard")
    return out or False


@contextlib.contextmanager
def _scoped_process_state():
    """Restore what a Lightning run changes process-wide (logger levels, deterministic algorithms)."""
    names = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")
    levels = {n: logging.getLogger(n).level for n in names}
    det, det_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*number of training batches.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            warnings.filterwarnings("ignore", ".*AMP with fp16 is not supported on CPU.*")
            yield
    finally:
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)
        torch.use_deterministic_algorithms(det, warn_only=det_warn)


def fit(model: torch.nn.Module, bags: Bags, targets: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
        request: TrainRequest | None = None, **options) -> dict:
    """Train ``model`` in place; returns a summary (best val loss, best epoch, epochs run, precision).

    targets: (N, G) float, rows aligned with ``bags``; train_idx / val_idx index into them (train_idx may
    repeat indices, e.g. after oversampling). ``request``: a :class:`~deepspot.config.requests.TrainRequest`,
    its :class:`~deepspot.config.requests.TrainRecipe` (``loss``, ``lr``, ``weight_decay``, ``batch_size``,
    ``val_batch_size``, ``max_epochs``, ``min_epochs``, ``patience``, ``monitor``, ``min_delta``, ``seed``)
    apart from its :class:`~deepspot.config.requests.TrainerSettings` (``precision``: 32 | bf16 | fp16 or a
    Lightning name, ``accelerator``, ``devices``, ``strategy``, ``log_dir``, ``loggers``: None (CSV when
    ``log_dir`` is given), 'csv', 'tensorboard' or both); or the same fields as keyword ``options``, each
    sorted into its half. ``progress`` (a bar per epoch) overrides :data:`deepspot.settings`.
    ``monitor``: what early stopping and the kept weights follow, ``val_loss``, ``val_pearson`` (mean
    per-gene Pearson across all validation spots) or ``train_loss`` (the original's). ``min_epochs``: no
    early stop before. ``min_delta``: the smallest change of the monitor that counts as better for early
    stopping (the kept weights are still those of the best value).
    The summary's ``best_val`` is that monitor's best value.
    """
    progress = options.pop("progress", None)
    if request is not None and options:
        raise TypeError(f"fit: give a request or options ({', '.join(sorted(options))}), not both")
    request = request if request is not None else TrainRequest.of(**options)
    if progress is None:
        progress = settings.progress
    rec, tr = request.recipe, request.trainer
    loss, lr, weight_decay, batch_size, seed = rec.loss, rec.lr, rec.weight_decay, rec.batch_size, rec.seed
    max_epochs, min_epochs, patience, monitor = rec.max_epochs, rec.min_epochs, rec.patience, rec.monitor
    val_batch_size, min_delta = rec.val_batch_size, rec.min_delta
    precision, accelerator, devices, strategy = tr.precision, tr.accelerator, tr.devices, tr.strategy
    log_dir, loggers = tr.log_dir, tr.loggers
    precision = resolve_precision(precision, accelerator)
    with _scoped_process_state():
        L.seed_everything(seed, workers=True, verbose=False)
        tgt = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        train_dl = make_loader(bags, tgt, train_idx, batch_size, shuffle=True, seed=seed)
        val_dl = make_loader(bags, tgt, val_idx, val_batch_size or max(batch_size, 1024), shuffle=False, shard=False)
        module = BagRegressor(model, loss=loss, lr=lr, weight_decay=weight_decay)
        keep, history = KeepBest(monitor), History()
        callbacks = [keep, L.pytorch.callbacks.EarlyStopping(monitor, patience=patience, mode=keep.mode,
                                                              min_delta=min_delta), history]
        if progress:
            callbacks.append(L.pytorch.callbacks.RichProgressBar(leave=False))
        trainer = L.Trainer(max_epochs=max_epochs, min_epochs=min_epochs, callbacks=callbacks, logger=make_loggers(log_dir, loggers),
                            enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                            deterministic=True, precision=precision, accelerator=accelerator, devices=devices,
                            strategy=strategy, num_sanity_val_steps=0, log_every_n_steps=1,
                            use_distributed_sampler=False)
        trainer.fit(module, train_dl, val_dl)
    if keep.state is not None:
        model.load_state_dict(keep.state)
    elif "best_val" in trainer.callback_metrics:  # trained in spawned ranks: weights already copied back
        keep.best = float(trainer.callback_metrics["best_val"])
        keep.epoch = int(trainer.callback_metrics["best_epoch"])
    model.eval()
    out = {"monitor": monitor, "best_val": keep.best, "best_epoch": keep.epoch, "epochs": trainer.current_epoch,
           "precision": precision, "history": history.rows}
    if monitor == "val_loss":
        out["best_val_loss"] = keep.best
    return out
