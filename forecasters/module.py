"""TitansForecastingModule: the LightningModule that trains and evaluates a TitansForecastModel."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from forecasters.model import TitansForecastModel
from titans_ts.backbone import Variant

LossName = Literal["mse", "mae", "quantile"]


def pinball_loss(pred: Tensor, target: Tensor, quantiles: Tensor) -> Tensor:
    """Mean quantile loss; pred [..., Q], target [...], quantiles [Q]."""
    diff = target.unsqueeze(-1) - pred
    return torch.maximum(quantiles * diff, (quantiles - 1) * diff).mean()


class TitansForecastingModule(pl.LightningModule):
    """Forecast H steps of every target channel from L past steps with a Titans backbone.

    Logs `train_loss`, `val_loss`, `val_mse`, `val_mae`, `test_mse`, `test_mae` (on the scale the
    data module serves: scaled data for the benchmarks, as the literature reports). The scaler's
    statistics are kept as buffers (`target_mean`, `target_std`) so a checkpoint alone turns
    forecasts back into original units; they are taken from the data module at fit time.
    """

    def __init__(
        self,
        n_channels: int = 7,
        lookback: int = 96,
        horizon: int = 96,
        n_targets: int | None = None,
        variant: Variant = "mac",
        dim: int = 64,
        n_layers: int = 2,
        heads: int = 4,
        memory_depth: int = 2,
        chunk_size: int = 16,
        max_lr: float = 0.1,
        max_grad_norm: float | None = 1.0,
        window: int = 32,
        segment_len: int = 32,
        n_persistent: int = 4,
        ff_mult: float = 2.0,
        dropout: float = 0.1,
        patch_len: int = 16,
        patch_stride: int = 8,
        channel_independent: bool = True,
        revin: bool = True,
        loss: LossName = "mse",
        quantiles: tuple[float, ...] = (0.1, 0.5, 0.9),
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        cosine_schedule: bool = True,
    ) -> None:
        super().__init__()
        if loss not in ("mse", "mae", "quantile"):
            raise ValueError(f"loss must be 'mse', 'mae' or 'quantile', got {loss!r}")
        if loss == "quantile":
            if not quantiles or any(not 0.0 < q < 1.0 for q in quantiles) or 0.5 not in quantiles:
                raise ValueError(f"quantiles must lie in (0, 1) and include 0.5 (the point forecast), got {quantiles}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.save_hyperparameters()
        n_targets = n_channels if n_targets is None else n_targets
        self.model = TitansForecastModel(
            n_channels, lookback, horizon, n_targets, variant=variant, dim=dim, n_layers=n_layers, heads=heads,
            memory_depth=memory_depth, chunk_size=chunk_size, max_lr=max_lr, max_grad_norm=max_grad_norm,
            window=window, segment_len=segment_len, n_persistent=n_persistent, ff_mult=ff_mult, dropout=dropout,
            patch_len=patch_len, patch_stride=patch_stride, channel_independent=channel_independent, revin=revin,
            n_outputs=len(quantiles) if loss == "quantile" else 1,
        )
        self.register_buffer("quantile_levels", torch.tensor(sorted(quantiles)) if loss == "quantile" else torch.zeros(0))
        self.register_buffer("target_mean", torch.zeros(n_targets))
        self.register_buffer("target_std", torch.ones(n_targets))
        self.val_mse, self.val_mae = MeanSquaredError(), MeanAbsoluteError()
        self.test_mse, self.test_mae = MeanSquaredError(), MeanAbsoluteError()

    # --- forecasting -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Point forecast [batch, H, n_targets] (the median when trained with a quantile loss)."""
        return self._point(self.model(x)[0])

    def predict_quantiles(self, x: Tensor) -> Tensor:
        """[batch, H, n_targets, Q] at `quantile_levels`, sorted so quantiles never cross."""
        if self.hparams.loss != "quantile":
            raise ValueError("this model was not trained with loss='quantile'; it has no quantile forecasts")
        return self.model(x)[0].sort(dim=-1).values

    def to_original_units(self, y: Tensor) -> Tensor:
        """Undo the data module's scaling of the target channels (last axis, or the one before quantiles)."""
        if y.dim() == 4:
            return y * self.target_std[:, None] + self.target_mean[:, None]
        return y * self.target_std + self.target_mean

    def _point(self, out: Tensor) -> Tensor:
        if self.hparams.loss != "quantile":
            return out
        median = int((self.quantile_levels == 0.5).nonzero()[0])
        return out.sort(dim=-1).values[..., median]

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.hparams.loss == "quantile":
            return pinball_loss(out, y, self.quantile_levels)
        if self.hparams.loss == "mae":
            return (out - y).abs().mean()
        return (out - y).square().mean()

    # --- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "target_mean"):
            self.set_scaler(datamodule.target_mean, datamodule.target_std)

    def on_fit_start(self) -> None:
        # a validate()/test() before fit leaves the metric states as inference tensors; renew them
        for metric in (self.val_mse, self.val_mae, self.test_mse, self.test_mae):
            metric.reset()

    def set_scaler(self, mean: Any, std: Any) -> None:
        """Store the target channels' scaler statistics (arrays of n_targets values)."""
        mean = torch.as_tensor(mean, dtype=self.target_mean.dtype).reshape(-1)
        std = torch.as_tensor(std, dtype=self.target_std.dtype).reshape(-1)
        if mean.numel() != self.target_mean.numel() or std.numel() != self.target_std.numel():
            raise ValueError(f"scaler statistics for {mean.numel()} channels, the model has {self.target_mean.numel()} targets")
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        loss = self._loss(self.model(x)[0], y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} at step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}); lower the learning rate (lr={self.hparams.lr}) or max_lr, or set max_grad_norm"
            )
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def _evaluate(self, batch: tuple[Tensor, ...], mse: MeanSquaredError, mae: MeanAbsoluteError, stage: str) -> None:
        x, y = batch[0], batch[1]
        out = self.model(x)[0]
        pred = self._point(out).contiguous()
        mse.update(pred, y)
        mae.update(pred, y)
        self.log(f"{stage}_loss", self._loss(out, y), batch_size=x.shape[0])
        self.log(f"{stage}_mse", mse, prog_bar=True, batch_size=x.shape[0])
        self.log(f"{stage}_mae", mae, prog_bar=True, batch_size=x.shape[0])

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, self.val_mse, self.val_mae, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, self.test_mse, self.test_mae, "test")

    def predict_step(self, batch: tuple[Tensor, ...] | Tensor, batch_idx: int) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        pred = self(x)
        return {"forecast": pred, "forecast_original_units": self.to_original_units(pred)}

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if not self.hparams.cosine_schedule or self._trainer is None or not self.trainer.max_epochs or self.trainer.max_epochs < 1:
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
