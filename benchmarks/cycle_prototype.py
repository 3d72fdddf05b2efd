"""Prototype, not part of the library: residual cycle forecasting (CycleNet, Lin et al. 2024) on any model here.

    .venv/bin/python benchmarks/cycle_prototype.py --resume --set data.time_features=true --models mac \
        --datasets etth1 --seeds 0 --horizons 720 --experiment titans-ts-cycle-study --workdir DIR \
        --out DIR/cycle_24.json       # one cell: 5-11 minutes here at load 2, as benchmarks/accuracy.py
    .venv/bin/python benchmarks/cycle_prototype.py --quick --set data.time_features=true ...  # smoke pass, ~20 s

Before the library takes a feature that needs a new input (each window's place in the daily cycle)
through its data modules, LightningModule, sktime estimator and MLflow model, this script measures
whether validation wants it. It runs ``benchmarks/accuracy.py`` (every argument passes through) with
each network's RevIN (the Titans variants', PatchTST- and DLinear-style) replaced by one that also
takes out a learned cycle: a profile of 24 steps per channel (``CYCLE_LEN=168`` in the environment:
a week), zero at the start, is subtracted from each normalised window, indexed by the hour of each
step, and added back to the forecast before RevIN is undone. So the backbone and the linear skip
model the residual. The hour is read back from the data module's calendar features
(``data.time_features=true``; hourly data only: ETTh1, ETTh2), which the training and evaluation
steps hand to the network before calling it. The cycle adds CYCLE_LEN x channels weights (168 on
ETTh1), decayed with the other matrices. Findings: ``benchmarks/STUDIES.md``, "A learned daily cycle".
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forecasters.baselines import DLinear  # noqa: E402
from forecasters.model import RevIN, TitansForecastModel  # noqa: E402
from forecasters.module import TitansForecastingModule  # noqa: E402

CYCLE_LEN = int(os.environ.get("CYCLE_LEN", "24"))
if CYCLE_LEN not in (24, 168):
    raise SystemExit(f"CYCLE_LEN must be 24 (a day of hours) or 168 (a week), got {CYCLE_LEN}")


class CycleRevIN(RevIN):
    """RevIN that also takes out a learned cycle; ``phase`` [batch] is the cycle position of each window's first step."""

    def __init__(self, n_channels: int, lookback: int) -> None:
        super().__init__(n_channels)
        self.cycle = nn.Parameter(torch.zeros(CYCLE_LEN, n_channels))
        self.lookback = lookback
        self.phase: Tensor | None = None

    def _profile(self, start: int, length: int) -> Tensor:
        if self.phase is None:
            raise RuntimeError("the cycle needs each window's phase: call the network through a training or "
                               "evaluation step, or set revin.phase")
        steps = torch.arange(start, start + length, device=self.cycle.device)
        return self.cycle[(self.phase[:, None] + steps) % CYCLE_LEN]  # [batch, length, C]

    def normalize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, mean, std = super().normalize(x)
        return x - self._profile(0, x.shape[1]), mean, std

    def denormalize(self, y: Tensor, mean: Tensor, std: Tensor, channels: slice) -> Tensor:
        y = y + self._profile(self.lookback, y.shape[1])[:, :, channels, None]
        return super().denormalize(y, mean, std, channels)


def phase_of(x_mark: Tensor) -> Tensor:
    """Cycle position of each window's first step from timeF features [batch, L, F] of hourly data."""
    hour = torch.round((x_mark[:, 0, 0] + 0.5) * 23).long()  # hour_of_day = hour / 23 - 0.5
    if CYCLE_LEN == 24:
        return hour
    return hour + 24 * torch.round((x_mark[:, 0, 1] + 0.5) * 6).long()  # day_of_week = day / 6 - 0.5


def with_cycle(init: Callable) -> Callable:
    def wrapped(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if getattr(self, "forecast_window", self.lookback) != self.lookback or self.revin is None:
            raise SystemExit("the prototype needs RevIN and the whole window as one (no forecast_window)")
        self.revin = CycleRevIN(self.n_channels, self.lookback)
    return wrapped


def with_phase(step: Callable) -> Callable:
    def wrapped(self: TitansForecastingModule, batch: tuple[Tensor, ...], *args: Any) -> Any:
        if isinstance(getattr(self.model, "revin", None), CycleRevIN):
            if len(batch) < 4:
                raise SystemExit("the cycle reads the hour from calendar features: add --set data.time_features=true")
            self.model.revin.phase = phase_of(batch[2])
        return step(self, batch, *args)
    return wrapped


def with_example_phase(forward: Callable) -> Callable:
    # The MLflow model's signature example calls the network outside a step: give those windows phase 0.
    def wrapped(self: TitansForecastingModule, x: Tensor) -> Tensor:
        revin = getattr(self.model, "revin", None)
        if isinstance(revin, CycleRevIN) and (revin.phase is None or len(revin.phase) != len(x)):
            revin.phase = torch.zeros(len(x), dtype=torch.long, device=x.device)
        return forward(self, x)
    return wrapped


def with_cycle_noted(run_cell: Callable) -> Callable:
    def wrapped(*args: Any) -> dict[str, Any]:
        return {**run_cell(*args), "prototype": f"benchmarks/cycle_prototype.py, CYCLE_LEN={CYCLE_LEN}",
                "cycle_len": CYCLE_LEN}
    return wrapped


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy

    TitansForecastModel.__init__ = with_cycle(TitansForecastModel.__init__)
    DLinear.__init__ = with_cycle(DLinear.__init__)
    TitansForecastingModule.training_step = with_phase(TitansForecastingModule.training_step)
    TitansForecastingModule._evaluate = with_phase(TitansForecastingModule._evaluate)
    TitansForecastingModule.forward = with_example_phase(TitansForecastingModule.forward)
    accuracy.run_cell = with_cycle_noted(accuracy.run_cell)
    accuracy.main()
