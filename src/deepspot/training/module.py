"""Lightning wrapper: the loop around a model from ``deepspot.models`` (math stays there)."""
from __future__ import annotations

import lightning as L
import torch

from deepspot.models.losses import get_loss


def mean_pearson_per_gene(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over genes of the Pearson r across spots, (N,G),(N,G) -> (); genes constant on either side
    are left out (0 when none is left)."""
    p = pred - pred.mean(dim=0)
    t = target - target.mean(dim=0)
    den = p.norm(dim=0) * t.norm(dim=0)
    ok = den > 1e-12
    if not bool(ok.any()):
        return pred.new_zeros(())
    return ((p * t).sum(dim=0)[ok] / den[ok]).mean()


class BagRegressor(L.LightningModule):
    """Trains any bag model ``model(**inputs) -> (B,G)`` on batches ``(inputs, target)``."""

    def __init__(self, model: torch.nn.Module, loss: str = "mse", lr: float = 1e-4, weight_decay: float = 1e-6):
        super().__init__()
        self.model = model
        self.loss_name, self.loss_fn = loss, get_loss(loss)
        self.lr, self.weight_decay = lr, weight_decay
        self._val: list = []

    def forward(self, **inputs):
        return self.model(**inputs)

    def _step(self, batch, stage: str):
        inputs, target = batch
        pred = self.model(**inputs)
        loss = self.loss_fn(pred, target)
        self.log(f"{stage}_loss", loss, prog_bar=True, on_epoch=True, on_step=False, batch_size=target.shape[0])
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        pred = self.model(**inputs)
        self._val.append((pred.detach().float(), target.detach().float()))
        loss = self.loss_fn(pred, target)
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, on_step=False, batch_size=target.shape[0])
        return loss

    def on_validation_epoch_start(self):
        self._val = []

    def on_validation_epoch_end(self):
        # per-gene Pearson across ALL validation spots (not per batch): the score the evaluation reports
        if not self._val:
            return
        pred = torch.cat([p for p, _ in self._val])
        target = torch.cat([t for _, t in self._val])
        self._val = []
        self.log("val_pearson", mean_pearson_per_gene(pred, target), prog_bar=True, on_epoch=True)

    def configure_optimizers(self):
        # fused AdamW: one kernel over all parameters instead of ~10 element-wise passes per tensor; on CPU
        # with the default batch of 64 spots the unfused step cost more than forward + backward (~25x slower)
        try:
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):  # a device/dtype without the fused kernel
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
