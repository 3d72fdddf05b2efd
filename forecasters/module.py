"""TitansForecastingModule: the LightningModule that trains and evaluates a TitansForecastModel."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from forecasters.checkpointing import capture_rng_states, restore_rng_states
from forecasters.baselines import ModelName, build_forecast_model
from forecasters.validation import LRSchedule, check_checkpoint_fits, validate_hparams

LossName = Literal["mse", "mae", "quantile"]


def pinball_loss(pred: Tensor, target: Tensor, quantiles: Tensor) -> Tensor:
    """Mean quantile loss; pred [..., Q], target [...], quantiles [Q]."""
    diff = target.unsqueeze(-1) - pred
    return torch.maximum(quantiles * diff, (quantiles - 1) * diff).mean()


class TitansForecastingModule(pl.LightningModule):
    """Forecast H steps of every target channel from L past steps with a Titans backbone.

    `variant` is a Titans variant (mac, mag, mal, lmm) or a baseline trained by the same harness:
    `patchtst` (the same patch model on a plain transformer) or `dlinear` (two linear maps; of the
    architecture arguments it uses only `moving_avg` and `revin`). See :mod:`forecasters.baselines`.

    Logs `train_loss`, `val_loss`, `val_mse`, `val_mae`, `test_mse`, `test_mae` (on the scale the
    data module serves: scaled data for the benchmarks, as the literature reports). The scaler's
    statistics are kept as buffers (`target_mean`, `target_std`) so a checkpoint alone turns
    forecasts back into original units; they are taken from the data module at fit time.

    Scale-out: losses are averaged over processes (``sync_dist``) and the metrics sync themselves, so
    under DDP every rank logs the global value. ``compile=True`` runs the network through
    ``torch.compile`` inside a Trainer (compiled on the first batch; a checkpoint loaded for serving
    or export runs eagerly). Mixed precision is the Trainer's ``precision="bf16-mixed"``; the
    memory's fast-weight recurrence stays in float32 under it. ``recompute_chunks`` lowers the
    memory's training footprint on long token sequences, and ``compile_chunks`` compiles the memory's
    chunk step alone (fused kernels, a compile of about 10 s; see :class:`titans_ts.NeuralMemory`).

    ``forecast_window`` W (a divisor of ``lookback``; Titans variants only) lets the memory read all L
    values while attention and the head see the last W: e.g. ``--data.lookback 384
    --model.forecast_window 96`` reads three windows of 96 into the memory before the one forecast
    from (see :class:`forecasters.model.TitansForecastModel`), without gradient unless ``past_gradient``.

    ``ema_decay`` (e.g. 0.998) trains with an exponential moving average of the weights, Lightning's
    ``EMAWeightAveraging``: validation, checkpoint choice and the weights a fit ends with are the average's,
    and a checkpoint keeps the raw weights as ``current_model_state`` so a fit resumes exactly. As a
    hyperparameter it reaches YAML configs and ``TitansForecaster(model_kwargs={"ema_decay": ...})``.

    ``linear_skip_lr`` gives the linear skip (``linear_skip=True``) its own AdamW rate, scheduled like
    ``lr``. The skip is a linear model, which trains best alone at a higher rate (1e-3 on ETTh1/ETTh2)
    than the attention and memory layers beside it (1e-4), and it stops when they do.
    """

    def __init__(
        self,
        n_channels: int = 7,
        lookback: int = 96,
        horizon: int = 96,
        n_targets: int | None = None,
        variant: ModelName = "mac",
        dim: int = 64,
        n_layers: int = 2,
        heads: int = 4,
        memory_depth: int = 2,
        chunk_size: int = 16,
        max_lr: float = 0.1,
        max_grad_norm: float | None = 1.0,
        recompute_chunks: int | None = None,
        compile_chunks: bool = False,
        forget_bias: float = -6.0,
        window: int = 32,
        segment_len: int = 32,
        n_persistent: int = 4,
        ff_mult: float = 2.0,
        dropout: float = 0.1,
        patch_len: int = 16,
        patch_stride: int = 8,
        channel_independent: bool = True,
        revin: bool = True,
        linear_skip: bool = False,
        forecast_window: int | None = None,
        past_gradient: bool = False,
        moving_avg: int = 25,
        loss: LossName = "mse",
        quantiles: tuple[float, ...] = (0.1, 0.5, 0.9),
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        linear_skip_lr: float | None = None,
        lr_schedule: LRSchedule = "cosine",
        ema_decay: float | None = None,
        compile: bool = False,
        cosine_schedule: bool | None = None,
    ) -> None:
        if cosine_schedule is not None:  # the switch lr_schedule replaced: checkpoints saved with it still load
            warnings.warn("cosine_schedule is deprecated: use lr_schedule='cosine' or lr_schedule='constant'",
                          DeprecationWarning, stacklevel=2)
            lr_schedule = "cosine" if cosine_schedule else "constant"
        super().__init__()
        self.save_hyperparameters(ignore=["cosine_schedule"])
        validate_hparams(self.hparams)  # before any layer is built, with messages that name the fix
        n_targets = n_channels if n_targets is None else n_targets
        self.model = build_forecast_model(
            variant, n_channels, lookback, horizon, n_targets, moving_avg=moving_avg, dim=dim, n_layers=n_layers, heads=heads,
            memory_depth=memory_depth, chunk_size=chunk_size, max_lr=max_lr, max_grad_norm=max_grad_norm,
            recompute_chunks=recompute_chunks, compile_chunks=compile_chunks, forget_bias=forget_bias,
            window=window, segment_len=segment_len, n_persistent=n_persistent, ff_mult=ff_mult, dropout=dropout,
            patch_len=patch_len, patch_stride=patch_stride, channel_independent=channel_independent, revin=revin,
            linear_skip=linear_skip, forecast_window=forecast_window,
            past_gradient=past_gradient, n_outputs=len(quantiles) if loss == "quantile" else 1,
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
        # Compiled in a Trainer stage only (setup, unlike configure_model, is not run by
        # load_from_checkpoint): a module loaded for serving, pickling or torch.export stays eager.
        if self.hparams.get("compile") and getattr(self.model, "_compiled_call_impl", None) is None:
            self.model.compile()

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
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # A finite loss can still overflow in backward; stop before the step writes NaN into the weights.
        grads = [(name, p.grad) for name, p in self.named_parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([torch.linalg.vector_norm(g) for _, g in grads]).sum()):
            name = next(name for name, g in grads if not torch.isfinite(g).all())
            raise FloatingPointError(
                f"the gradient of {name} became non-finite at step {self.global_step} (epoch {self.current_epoch}); "
                f"lower the learning rate (lr={self.hparams.lr}) or max_lr, or set max_grad_norm"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = next((k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()),
                   None)
        if bad is not None:
            raise FloatingPointError(f"refusing to write a checkpoint whose weight {bad} is NaN or inf (step "
                                     f"{self.global_step}); lower the learning rate (lr={self.hparams.lr}) or max_lr")
        # The random generators, so a resumed fit draws the same batches and dropout masks as an uninterrupted one.
        checkpoint["rng_states"] = capture_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(checkpoint, self.hparams, set(self.state_dict()))
        if self._fitting() and "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])
        if not self._fitting() and self.hparams.get("ema_decay") is not None:
            # The average is already the state_dict; the callback's state only resumes a fit, and outside fit the
            # module adds no callback, so Lightning would warn that the checkpoint's EMAWeightAveraging is missing.
            checkpoint.get("callbacks", {}).pop(EMAWeightAveraging.__qualname__, None)

    def _fitting(self) -> bool:
        """Whether a Trainer is running ``fit`` with this module (not validate/test/predict, not outside a Trainer)."""
        return self._trainer is not None and self.trainer.state.fn == "fit"

    def _evaluate(self, batch: tuple[Tensor, ...], mse: MeanSquaredError, mae: MeanAbsoluteError, stage: str) -> None:
        x, y = batch[0], batch[1]
        out = self.model(x)[0]
        pred = self._point(out).contiguous()
        mse.update(pred, y)
        mae.update(pred, y)
        self.log(f"{stage}_loss", self._loss(out, y), batch_size=x.shape[0], sync_dist=True)
        self.log(f"{stage}_mse", mse, prog_bar=True, batch_size=x.shape[0])
        self.log(f"{stage}_mae", mae, prog_bar=True, batch_size=x.shape[0])

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, self.val_mse, self.val_mae, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, self.test_mse, self.test_mae, "test")

    def predict_step(self, batch: tuple[Tensor, ...] | Tensor, batch_idx: int) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not torch.isfinite(x).all():
            raise ValueError(f"predict batch {batch_idx} contains NaN or inf inputs, which would give NaN forecasts; "
                             "clean or impute the data first (the data modules take fill_method='ffill' or 'interpolate')")
        pred = self(x)
        return {"forecast": pred, "forecast_original_units": self.to_original_units(pred)}

    def configure_callbacks(self) -> list[pl.Callback]:
        # Fit only: in validate/test/predict the average is already the weights, and the callback would warn on loading.
        if self.hparams.get("ema_decay") is None or not self._fitting():
            return []
        return [EMAWeightAveraging(decay=self.hparams.ema_decay)]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW's groups: weight decay on the matrices only (as in nanoGPT and most transformer recipes).

        Decaying the vectors would pull norm gains and RevIN's affine scale toward 0 and the memory's
        gate biases toward 0 (a forget rate of sigmoid(0) = 50% a token instead of ``forget_bias``'s).
        With ``linear_skip_lr`` the linear skip's weight and bias form groups of their own at that rate.
        """
        skip = getattr(self.model, "linear_skip", None)
        skip_lr = self.hparams.get("linear_skip_lr")
        own_rate = {id(p) for p in skip.parameters()} if skip is not None and skip_lr is not None else set()
        trained = [p for p in self.parameters() if p.requires_grad]
        groups = []
        for lr, params in ((self.hparams.lr, [p for p in trained if id(p) not in own_rate]),
                           (skip_lr, [p for p in trained if id(p) in own_rate])):
            groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay, "lr": lr},
                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
        return [group for group in groups if group["params"]]

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.hparams.lr)
        schedule = self.hparams.lr_schedule
        if schedule == "halving":
            # The long-horizon literature's harness (Time-Series-Library's "type1"): half the rate after every epoch.
            scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
        elif schedule == "cosine" and self._trainer is not None and self.trainer.max_epochs and self.trainer.max_epochs >= 1:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        else:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
