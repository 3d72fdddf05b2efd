"""Forecasters: the Lightning module over a Titans backbone (and the sktime estimator on top of it).

Imported lazily on first use, so that the console entry point (:mod:`forecasters.command`) answers
``--help`` without loading torch and Lightning.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RevIN", "TitansForecastModel", "TitansForecaster", "TitansForecastingModule"]

_HOMES = {
    "RevIN": "forecasters.model",
    "TitansForecastModel": "forecasters.model",
    "TitansForecastingModule": "forecasters.module",
    "TitansForecaster": "forecasters.sktime",  # imports sktime (seconds)
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
