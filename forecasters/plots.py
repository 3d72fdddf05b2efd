"""Figures for runs: forecasts against the truth, and a comparison of runs.

matplotlib is imported inside the functions and used through its object-oriented API with the Agg
canvas, so nothing here changes the global pyplot backend or needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["comparison_figure", "forecast_figure"]


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to fig: savefig works without pyplot
    return fig


def forecast_figure(
    history: np.ndarray,
    truth: np.ndarray,
    forecast: np.ndarray,
    window_indices: Sequence[int] | None = None,
    title: str = "forecasts",
    channel: str = "target",
) -> Figure:
    """One panel per window: the lookback, the true future and the forecast of one channel.

    Args:
        history: [n, L] inputs of the channel.
        truth: [n, H] true future values.
        forecast: [n, H] point forecasts.
        window_indices: index of each window in its split (for the panel titles).
        title: figure title.
        channel: channel name for the y axis.
    """
    history, truth, forecast = (np.asarray(a, dtype=float) for a in (history, truth, forecast))
    if history.ndim != 2 or truth.shape != forecast.shape or truth.ndim != 2 or len(history) != len(truth):
        raise ValueError(f"expected history [n, L] and truth, forecast [n, H]; got {history.shape}, "
                         f"{truth.shape}, {forecast.shape}")
    n, lookback = history.shape
    horizon = truth.shape[1]
    indices = list(window_indices) if window_indices is not None else list(range(n))
    fig = _new_figure(10, 2.4 * n)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    past, future = np.arange(-lookback, 0), np.arange(horizon)
    for ax, h, t, f, index in zip(axes, history, truth, forecast, indices):
        mse = float(np.mean((f - t) ** 2))
        ax.plot(past, h, color="0.4", lw=1, label="history")
        ax.plot(future, t, color="tab:blue", lw=1.2, label="truth")
        ax.plot(future, f, color="tab:orange", lw=1.2, label="forecast")
        ax.axvline(0, color="0.7", lw=0.8, ls="--")
        ax.set_title(f"test window {index} (MSE in these units: {mse:.3g})", fontsize=9)
        ax.set_ylabel(channel)
    axes[0].legend(loc="upper left", fontsize=8, ncols=3)
    axes[-1].set_xlabel("steps relative to the forecast start")
    fig.suptitle(title)
    return fig


def comparison_figure(table: pd.DataFrame, metric: str = "test_mse") -> Figure:
    """Horizontal bars of ``metric`` per run, labelled dataset / variant / H (and run name)."""
    if metric not in table.columns:
        raise ValueError(f"no column {metric!r} in the table; columns: {list(table.columns)}")
    rows = table[table[metric].notna()]
    if rows.empty:
        raise ValueError(f"no run has a {metric} value to chart (did the runs finish their test?)")
    labels = [
        f"{r.dataset} / {r.variant} / H={r.horizon:g} ({r.run_id})" if r.horizon == r.horizon
        else f"{r.dataset} / {r.variant} ({r.run_id})"
        for r in rows.itertuples()
    ]
    fig = _new_figure(9, 1.2 + 0.35 * len(rows))
    ax = fig.subplots()
    values = rows[metric].astype(float).to_numpy()
    positions = np.arange(len(rows))[::-1]
    ax.barh(positions, values, color="tab:blue")
    ax.set_yticks(positions, labels, fontsize=8)
    for pos, value in zip(positions, values):
        ax.text(value, pos, f" {value:.4f}", va="center", fontsize=8)
    ax.set_xlabel(metric)
    ax.set_xlim(0, values.max() * 1.2)
    ax.set_title(f"{metric} per run (lower is better)")
    return fig
