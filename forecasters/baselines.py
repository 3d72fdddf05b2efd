"""Baselines trained by the same harness as the Titans variants (module, data, RevIN, loss, trainer).

- ``dlinear``: DLinear-style (Zeng et al. 2023): a moving average splits each channel of the window
  into trend and remainder; two linear maps L -> H, shared across channels, add up to the forecast.
- ``patchtst``: PatchTST-style (Nie et al. 2023): :class:`TitansForecastModel` (RevIN, channel
  independence, patch tokens, flatten head) with a plain transformer backbone instead of Titans blocks.

:func:`build_forecast_model` turns a ``variant`` name into the network, so the LightningModule and
the CLI select a baseline exactly as they select a Titans variant (``--model.variant dlinear``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from forecasters.model import RevIN, TitansForecastModel
from titans_ts.backbone import VARIANTS

ModelName = Literal["mac", "mag", "mal", "lmm", "patchtst", "dlinear"]
BASELINES: tuple[str, ...] = ("patchtst", "dlinear")
MODEL_NAMES: tuple[str, ...] = (*VARIANTS, *BASELINES)


class DLinear(nn.Module):
    """Window [batch, L, C] -> forecast [batch, H, n_targets] (or [..., n_outputs]) by two linear maps.

    Channel independent with weights shared across channels (DLinear's ``individual=False``). With
    ``revin`` each window is normalised first, as for every model of this harness. Returns
    ``(forecast, [])``: there is no memory state, the empty list keeps the Titans model's signature.
    """

    def __init__(
        self,
        n_channels: int,
        lookback: int,
        horizon: int,
        n_targets: int | None = None,
        moving_avg: int = 25,
        revin: bool = True,
        n_outputs: int = 1,
    ) -> None:
        super().__init__()
        n_targets = n_channels if n_targets is None else n_targets
        if moving_avg < 1 or moving_avg % 2 == 0:
            raise ValueError(f"moving_avg must be an odd integer >= 1 (a centred window), got {moving_avg}")
        if not 1 <= n_targets <= n_channels:
            raise ValueError(f"n_targets must be in [1, n_channels={n_channels}], got {n_targets}")
        self.n_channels, self.lookback, self.horizon, self.n_targets = n_channels, lookback, horizon, n_targets
        self.moving_avg, self.n_outputs = moving_avg, n_outputs
        self.revin = RevIN(n_channels) if revin else None
        self.seasonal = nn.Linear(lookback, horizon * n_outputs)
        self.trend = nn.Linear(lookback, horizon * n_outputs)

    def trend_of(self, series: Tensor) -> Tensor:
        """Centred moving average along the last axis, the ends padded by repeating the edge values."""
        half = (self.moving_avg - 1) // 2
        padded = F.pad(series, (half, half), mode="replicate")
        return F.avg_pool1d(padded, self.moving_avg, stride=1)

    def forward(self, x: Tensor, states: object = None) -> tuple[Tensor, list]:
        if x.dim() != 3 or x.shape[1:] != (self.lookback, self.n_channels):
            raise ValueError(f"expected a window of shape [batch, {self.lookback}, {self.n_channels}], got {tuple(x.shape)}")
        batch = x.shape[0]
        if self.revin is not None:
            x, mean, std = self.revin.normalize(x)
        series = x.transpose(1, 2)  # [batch, C, L]
        trend = self.trend_of(series)
        out = self.seasonal(series - trend) + self.trend(trend)  # [batch, C, H * outputs]
        out = out.view(batch, self.n_channels, self.horizon, self.n_outputs).transpose(1, 2)
        out = out[:, :, -self.n_targets :]  # targets are the last channels
        if self.revin is not None:
            out = self.revin.denormalize(out, mean, std, slice(self.n_channels - self.n_targets, None))
        return (out.squeeze(-1) if self.n_outputs == 1 else out), []


def build_forecast_model(
    variant: str,
    n_channels: int,
    lookback: int,
    horizon: int,
    n_targets: int | None = None,
    moving_avg: int = 25,
    revin: bool = True,
    n_outputs: int = 1,
    **titans_kwargs: Any,
) -> nn.Module:
    """The network for ``variant``: a Titans variant, ``patchtst`` or ``dlinear``.

    ``titans_kwargs`` are TitansForecastModel's further arguments (dim, n_layers, patch_len, ...);
    DLinear has none of them and ignores them.
    """
    if variant not in MODEL_NAMES:
        raise ValueError(f"variant must be one of {MODEL_NAMES}, got {variant!r}")
    if variant == "dlinear":
        return DLinear(n_channels, lookback, horizon, n_targets, moving_avg=moving_avg, revin=revin, n_outputs=n_outputs)
    backbone = "transformer" if variant == "patchtst" else variant
    return TitansForecastModel(n_channels, lookback, horizon, n_targets, variant=backbone, revin=revin,
                               n_outputs=n_outputs, **titans_kwargs)
