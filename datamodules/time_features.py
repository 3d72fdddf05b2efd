"""Calendar features in the Time-Series-Library ``timeF`` encoding.

Each feature is a calendar field scaled to [-0.5, 0.5] (e.g. hour-of-day is
``hour / 23 - 0.5``). Which fields are used depends on the sampling frequency,
exactly as in Time-Series-Library's ``utils/timefeatures.py`` (itself taken from
GluonTS): an hourly series gets hour-of-day, day-of-week, day-of-month and
day-of-year; a 15-minute series also gets minute-of-hour; and so on.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pandas as pd
from pandas.tseries import offsets
from pandas.tseries.frequencies import to_offset

__all__ = ["TIME_FEATURES", "infer_freq", "normalize_freq", "time_feature_names", "time_features"]

_Feature = Callable[[pd.DatetimeIndex], np.ndarray]

#: Every known feature: name -> function of a DatetimeIndex, values in [-0.5, 0.5].
TIME_FEATURES: dict[str, _Feature] = {
    "second_of_minute": lambda idx: idx.second / 59.0 - 0.5,
    "minute_of_hour": lambda idx: idx.minute / 59.0 - 0.5,
    "hour_of_day": lambda idx: idx.hour / 23.0 - 0.5,
    "day_of_week": lambda idx: idx.dayofweek / 6.0 - 0.5,
    "day_of_month": lambda idx: (idx.day - 1) / 30.0 - 0.5,
    "day_of_year": lambda idx: (idx.dayofyear - 1) / 365.0 - 0.5,
    "month_of_year": lambda idx: (idx.month - 1) / 11.0 - 0.5,
    "week_of_year": lambda idx: (idx.isocalendar().week.to_numpy() - 1) / 52.0 - 0.5,
}

_DAY = ["day_of_week", "day_of_month", "day_of_year"]
_HOUR = ["hour_of_day", *_DAY]
_MINUTE = ["minute_of_hour", *_HOUR]
_SECOND = ["second_of_minute", *_MINUTE]

# Time-Series-Library's one-letter frequencies (and old pandas aliases) that
# pandas >= 2.2 no longer parses, mapped to their current spelling.
_LEGACY_ALIASES = {
    "s": "s", "S": "s", "t": "min", "T": "min", "h": "h", "H": "h",
    "d": "D", "D": "D", "b": "B", "B": "B", "w": "W", "W": "W",
    "m": "MS", "M": "MS", "q": "QS", "Q": "QS", "a": "YS", "A": "YS", "y": "YS", "Y": "YS",
}
_LEGACY_RE = re.compile(r"^(\d*)([A-Za-z])$")


def normalize_freq(freq: str) -> str:
    """Return a pandas offset alias for ``freq``; accepts Time-Series-Library letters ('h', 't', 'm', ...).

    Raises:
        ValueError: if ``freq`` is not a frequency pandas understands.
    """
    match = _LEGACY_RE.match(freq.strip())
    alias = f"{match.group(1)}{_LEGACY_ALIASES[match.group(2)]}" if match else freq.strip()
    try:
        return to_offset(alias).freqstr
    except ValueError as exc:
        raise ValueError(
            f"unknown frequency {freq!r}; use a pandas offset alias such as 'h', '15min', '10min' or 'D'"
        ) from exc


def time_feature_names(freq: str) -> list[str]:
    """Names of the features used for a series sampled at ``freq`` (Time-Series-Library order)."""
    offset = to_offset(normalize_freq(freq))
    if isinstance(offset, (offsets.YearBegin, offsets.YearEnd)):
        return []
    if isinstance(offset, (offsets.QuarterBegin, offsets.QuarterEnd, offsets.MonthBegin, offsets.MonthEnd,
                           offsets.BusinessMonthBegin, offsets.BusinessMonthEnd, offsets.SemiMonthBegin,
                           offsets.SemiMonthEnd)):
        return ["month_of_year"]
    if isinstance(offset, offsets.Week):
        return ["day_of_month", "week_of_year"]
    if isinstance(offset, (offsets.Day, offsets.BusinessDay, offsets.CustomBusinessDay)):
        return list(_DAY)
    if isinstance(offset, (offsets.Hour, offsets.BusinessHour, offsets.CustomBusinessHour)):
        return list(_HOUR)
    if isinstance(offset, offsets.Minute):
        return list(_MINUTE)
    if isinstance(offset, (offsets.Second, offsets.Milli, offsets.Micro, offsets.Nano)):
        return list(_SECOND)
    raise ValueError(f"no calendar features are defined for frequency {freq!r}")


def time_features(dates: pd.DatetimeIndex | pd.Series | np.ndarray, freq: str) -> np.ndarray:
    """Calendar features of ``dates`` as a float32 array shaped [len(dates), n_features]."""
    index = pd.DatetimeIndex(dates)
    names = time_feature_names(freq)
    out = np.empty((len(index), len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        out[:, j] = np.asarray(TIME_FEATURES[name](index), dtype=np.float64)
    return out


def infer_freq(dates: pd.DatetimeIndex) -> str:
    """Sampling frequency of ``dates``: pandas' inference, else the median step (for gappy series).

    Raises:
        ValueError: with fewer than two timestamps.
    """
    if len(dates) < 2:
        raise ValueError("cannot infer a frequency from fewer than two timestamps; pass freq=")
    head = dates[: min(len(dates), 10_000)]  # a prefix is enough and keeps this fast
    if len(head) >= 3:
        freq = pd.infer_freq(head)
        if freq is not None:
            return normalize_freq(freq)
    step = pd.Series(head).diff().median()
    return to_offset(pd.Timedelta(step)).freqstr
