"""Lightning wrapper: the loop around a model from ``deepspot.models`` (math stays there)."""
from __future__ import annotations

import lightning as L
import torch

from deepspot.models.losses import get_loss


class BagRegressor(L.LightningModule):
    """Trains any bag model ``model(**inputs) -> (B,G)`` on batches ``(inputs, target)``."""

    def __init__(self, model: torch.nn.Module, loss: str = "mse", lr: float = 1e-4, weight_decay: float = 1e-6):
        super().__init__()
        self.model = model
        self.loss_name, self.loss_fn = loss, get_loss(loss)
        self.lr, self.weight_decay = lr, weight_decay

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
        return self._step(batch, "val")

    def configure_optimizers(self):
        # fused AdamW: one kernel over all parameters instead of ~10 element-wise passes per tensor; on CPU
        # with the default batch of 64 spots the unfused step cost more than forward + backward (~25x slower)
        try:
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):  # a device/dtype without the fused kernel
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
