"""Forecasters: the Lightning module over a Titans backbone (and the sktime estimator on top of it)."""

from forecasters.model import RevIN, TitansForecastModel
from forecasters.module import TitansForecastingModule

__all__ = ["RevIN", "TitansForecastModel", "TitansForecaster", "TitansForecastingModule"]


def __getattr__(name: str):
    # the sktime estimator is imported on first use: importing sktime takes a while
    if name == "TitansForecaster":
        from forecasters.sktime import TitansForecaster

        return TitansForecaster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
