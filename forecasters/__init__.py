"""Forecasters: the Lightning module over a Titans backbone (and the sktime estimator on top of it)."""

from forecasters.model import RevIN, TitansForecastModel
from forecasters.module import TitansForecastingModule

__all__ = ["RevIN", "TitansForecastModel", "TitansForecastingModule"]
