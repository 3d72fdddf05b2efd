"""TitansForecastModel: a window [batch, L, channels] -> a forecast [batch, H, channels] (plain nn.Module).

Designed for series: reversible instance normalisation (RevIN), channel independence by default
(each channel its own token sequence, weights shared) or channel mixing, patch tokens (patch_len,
patch_stride; patch_len=1 gives point tokens), a Titans backbone, and a linear head to H steps
(times the number of quantiles when a quantile loss is used). With ``linear_skip`` a linear map from
the normalised window straight to the H steps (RLinear, Li et al. 2023) is added to the head's
output, so the backbone learns what a linear forecast misses.

With ``forecast_window`` W < L the memory reads a longer past than the head sees: the first L - W
values are read into the memory one window of W at a time (each window normalised on its own, the
states carried from window to window, as the sktime forecaster streams a series), and only the last
W values are patched for attention and the head. So the head's size is that of a W-value model
while the memory has read L values. By default the earlier windows are read without gradient
(truncated back-propagation, as in stateful RNN training): the network learns to forecast from a
memory that has read the past, at the cost of a forward pass over it; the memory's learned initial
weights, where only the first window starts, then get no gradient and stay as initialised. With
``past_gradient`` the gradient flows back through the earlier windows too, so the memory also learns
what to write for later windows, at the cost of their backward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from titans_ts.backbone import VARIANTS, TitansBackbone, Variant
from titans_ts.memory import MemoryState


class RevIN(nn.Module):
    """Reversible instance normalisation (Kim et al. 2022): per window and channel."""

    def __init__(self, n_channels: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(n_channels)) if affine else None

    def normalize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean = x.mean(dim=1, keepdim=True).detach()
        std = (x.var(dim=1, keepdim=True, unbiased=False) + self.eps).sqrt().detach()
        x = (x - mean) / std
        if self.weight is not None:
            x = x * self.weight + self.bias
        return x, mean, std

    def denormalize(self, y: Tensor, mean: Tensor, std: Tensor, channels: slice) -> Tensor:
        """y [batch, H, c, outputs] for the channels `channels` of the normalised input."""
        if self.weight is not None:
            y = (y - self.bias[channels, None]) / (self.weight[channels, None] + self.eps * self.eps)
        return y * std[:, :, channels, None] + mean[:, :, channels, None]


class TitansForecastModel(nn.Module):
    def __init__(
        self,
        n_channels: int,
        lookback: int,
        horizon: int,
        n_targets: int | None = None,
        variant: Variant = "mac",
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
        n_outputs: int = 1,
        forecast_window: int | None = None,
        past_gradient: bool = False,
    ) -> None:
        super().__init__()
        n_targets = n_channels if n_targets is None else n_targets
        forecast_window = lookback if forecast_window is None else forecast_window
        for name, value in dict(n_channels=n_channels, lookback=lookback, horizon=horizon, n_targets=n_targets,
                                patch_len=patch_len, patch_stride=patch_stride, n_outputs=n_outputs,
                                forecast_window=forecast_window).items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if n_targets > n_channels:
            raise ValueError(f"n_targets ({n_targets}) cannot exceed n_channels ({n_channels})")
        if lookback % forecast_window:
            raise ValueError(f"lookback ({lookback}) must be a multiple of forecast_window ({forecast_window}): the "
                             f"memory reads the past in windows of forecast_window values; e.g. lookback="
                             f"{forecast_window * max(1, lookback // forecast_window)}")
        if forecast_window < lookback and variant not in VARIANTS:
            raise ValueError(f"forecast_window < lookback needs a memory to carry the past; variant {variant!r} has "
                             f"none: use one of {VARIANTS} or forecast_window=None")
        if patch_len > forecast_window:
            seen = "lookback" if forecast_window == lookback else "the window the head sees, forecast_window"
            raise ValueError(f"patch_len ({patch_len}) must not exceed {seen} ({forecast_window}); use a shorter patch")
        self.n_channels, self.lookback, self.horizon, self.n_targets = n_channels, lookback, horizon, n_targets
        self.forecast_window, self.past_gradient = forecast_window, past_gradient
        self.patch_len, self.patch_stride = patch_len, patch_stride
        self.channel_independent, self.n_outputs = channel_independent, n_outputs
        # PatchTST-style: pad the end by one stride so the last observations open a patch of their own
        pad = patch_stride if patch_len > 1 else 0
        self.pad = nn.ReplicationPad1d((0, pad)) if pad else nn.Identity()
        self.n_tokens = (forecast_window + pad - patch_len) // patch_stride + 1

        self.revin = RevIN(n_channels) if revin else None
        token_width = patch_len if channel_independent else patch_len * n_channels
        head_channels = 1 if channel_independent else n_channels
        self.embed = nn.Linear(token_width, dim)
        self.position = nn.Parameter(torch.randn(self.n_tokens, dim) * 0.02)
        self.backbone = TitansBackbone(
            variant, dim=dim, n_layers=n_layers, heads=heads, memory_depth=memory_depth, chunk_size=chunk_size,
            max_lr=max_lr, max_grad_norm=max_grad_norm, recompute_chunks=recompute_chunks, compile_chunks=compile_chunks,
            forget_bias=forget_bias, window=window, segment_len=segment_len,
            n_persistent=n_persistent, ff_mult=ff_mult, dropout=dropout,
        )
        self.head = nn.Sequential(nn.Flatten(-2), nn.Dropout(dropout),
                                  nn.Linear(self.n_tokens * dim, horizon * head_channels * n_outputs))
        # per channel, weights shared across channels: L values -> H steps (x n_outputs). Zero at the start,
        # so training starts from the plain model: a random init adds noise of about 0.6 (on the normalised
        # scale) to every forecast, which at the variants' lr of 1e-4 takes epochs to unlearn.
        self.linear_skip = nn.Linear(forecast_window, horizon * n_outputs) if linear_skip else None
        if self.linear_skip is not None:
            nn.init.zeros_(self.linear_skip.weight)
            nn.init.zeros_(self.linear_skip.bias)

    def forward(self, x: Tensor, states: list[MemoryState] | None = None) -> tuple[Tensor, list[MemoryState]]:
        """x [batch, L, n_channels] -> (forecast [batch, H, n_targets] or [..., n_outputs], memory states).

        With channel independence the memory states have batch * n_channels rows. With a
        ``forecast_window`` shorter than L the memory first reads the earlier windows (with gradient
        only if ``past_gradient``).
        """
        if x.dim() != 3 or x.shape[1:] != (self.lookback, self.n_channels):
            raise ValueError(
                f"expected a window of shape [batch, {self.lookback}, {self.n_channels}], got {tuple(x.shape)}; "
                "pass windows with the lookback and channels the model was built for (the same columns and "
                "features as at fit)"
            )
        *past, x = x.split(self.forecast_window, dim=1)
        if past:
            with torch.set_grad_enabled(self.past_gradient and torch.is_grad_enabled()):
                for window in past:
                    states = self._read(window, states)[2]
            if not self.past_gradient:
                states = [s.detach() for s in states]
        x, h, states, scale = self._read(x, states)
        batch = x.shape[0]
        out = self.head(h)
        if self.channel_independent:
            out = out.view(batch, self.n_channels, self.horizon, self.n_outputs).transpose(1, 2)
        else:
            out = out.view(batch, self.horizon, self.n_channels, self.n_outputs)
        if self.linear_skip is not None:
            skip = self.linear_skip(x.transpose(1, 2))  # [batch, C, H * outputs]
            out = out + skip.view(batch, self.n_channels, self.horizon, self.n_outputs).transpose(1, 2)
        out = out[:, :, -self.n_targets :]  # [batch, H, targets, outputs]; targets are the last channels
        if self.revin is not None:
            out = self.revin.denormalize(out, *scale, slice(self.n_channels - self.n_targets, None))
        return (out.squeeze(-1) if self.n_outputs == 1 else out), states

    def _read(self, x: Tensor, states: list[MemoryState] | None) -> tuple[Tensor, Tensor, list[MemoryState], tuple]:
        """One window [batch, W, C] through RevIN, patching and the backbone from `states`.

        Returns (the normalised window, the backbone's tokens, the new states, RevIN's (mean, std)).
        """
        scale: tuple = ()
        if self.revin is not None:
            x, *scale = self.revin.normalize(x)
        series = x.transpose(1, 2)  # [batch, C, W]
        if self.channel_independent:
            series = series.reshape(x.shape[0] * self.n_channels, 1, self.forecast_window)
        patches = self.pad(series).unfold(-1, self.patch_len, self.patch_stride)  # [rows, c, N, P]
        tokens = patches.permute(0, 2, 1, 3).flatten(2)  # [rows, N, c * P]
        h, states = self.backbone(self.embed(tokens) + self.position, states)
        return x, h, states, tuple(scale)
