"""Sliding-window dataset and a LightningDataModule for one multivariate series.

The series is validated, scaled with statistics of the training part only, stored
once as a C-contiguous float32 array ``data`` of shape [T, C], and every split is a
row-slice *view* of it. A window is two more views (``data[i:i+L]`` and
``data[i+L:i+L+H]``), so memory does not grow with the number of windows.

Channel order follows Time-Series-Library: the feature columns in file order with
the target moved last, so channel ``-1`` is always the target.

Feature modes (``features``):

* ``"M"``: x and y have all C channels (multivariate -> multivariate).
* ``"S"``: x and y have the target channel only (univariate).
* ``"MS"``: x has all C channels, y only the target, shaped [H, 1]. Time-Series-Library
  feeds all channels, lets the model output all of them and scores only the last one
  (``f_dim = -1``); returning the target alone as y is the same metric and makes
  ``n_targets == 1`` explicit for models and forecasters.
"""

from __future__ import annotations

import ctypes
import operator
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from pandas.tseries.frequencies import to_offset
from sklearn.preprocessing import StandardScaler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .time_features import infer_freq, normalize_freq, time_feature_names, time_features

__all__ = ["FEATURE_MODES", "FILL_METHODS", "TimeSeriesDataModule", "WindowDataset", "check_int", "read_csv"]


Features = Literal["M", "S", "MS"]
FillMethod = Literal["ffill", "interpolate"]
FEATURE_MODES: tuple[str, ...] = ("M", "S", "MS")
FILL_METHODS: tuple[str, ...] = ("ffill", "interpolate")
SPLITS: tuple[str, ...] = ("train", "val", "test")

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, Tensor)
_T = TypeVar("_T")


class WindowDataset(Dataset[tuple[Tensor, ...]]):
    """Windows ``(x, y)`` = (``data[i:i+L]``, ``data[i+L:i+L+H]``) over a [T, C] float32 array.

    Items are tensors that share memory with ``data`` (no copy per window; the
    DataLoader's collate makes the batch). With ``marks`` (calendar features,
    [T, F]) an item is ``(x, y, x_mark, y_mark)``.

    Args:
        data: float32 array [T, C]; kept by reference.
        lookback: L, the input length.
        horizon: H, the forecast length.
        target_channels: columns of ``data`` that form y (default: all).
        marks: optional float32 array [T, F] aligned with ``data``.
    """

    def __init__(
        self,
        data: np.ndarray,
        lookback: int,
        horizon: int,
        target_channels: slice | None = None,
        marks: np.ndarray | None = None,
    ) -> None:
        if data.ndim != 2 or data.dtype != np.float32:
            raise ValueError(f"data must be a float32 array shaped [T, C], got {data.dtype} {data.shape}")
        if marks is not None and (marks.ndim != 2 or len(marks) != len(data) or marks.dtype != np.float32):
            raise ValueError(f"marks must be a float32 array shaped [{len(data)}, F], got {marks.dtype} {marks.shape}")
        self.data = data
        self.marks = marks
        self.lookback = lookback
        self.horizon = horizon
        self.target_channels = target_channels
        self._len = max(0, len(data) - lookback - horizon + 1)
        self._make_views()

    def _make_views(self) -> None:
        # torch.from_numpy shares the buffer; slicing these tensors is cheaper than
        # wrapping a fresh numpy slice on every __getitem__.
        self._x = torch.from_numpy(self.data)
        self._y = self._x if self.target_channels is None else self._x[:, self.target_channels]
        self._marks = None if self.marks is None else torch.from_numpy(self.marks)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        i = operator.index(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"window {index} out of range for {self._len} windows")
        mid = i + self.lookback
        end = mid + self.horizon
        if self._marks is None:
            return self._x[i:mid], self._y[mid:end]
        return self._x[i:mid], self._y[mid:end], self._marks[i:mid], self._marks[mid:end]

    # Pickle only the numpy arrays (e.g. for spawned DataLoader workers): the tensors
    # are views of them and would otherwise be serialized as second copies.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_x", "_y", "_marks"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._make_views()


def read_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """``pd.read_csv`` that falls back to latin-1 for files that are not UTF-8 (Weather's unit characters)."""
    try:
        return pd.read_csv(path)
    except UnicodeDecodeError:
        return pd.read_csv(path, encoding="latin-1")


def check_int(name: str, value: Any, minimum: int = 1, hint: str = "") -> int:
    """``value`` as an int >= ``minimum``; ValueError naming ``name``, the value and ``hint`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}" + (f": {hint}" if hint else ""))
    return int(value)


def _extract_dates(df: pd.DataFrame, date_column: str | None) -> tuple[pd.DatetimeIndex, str | None]:
    """Timestamps of ``df`` (from ``date_column`` or a DatetimeIndex), checked sorted and unique."""
    if date_column is not None and date_column in df.columns:
        try:
            dates = pd.DatetimeIndex(pd.to_datetime(df[date_column]))
        except (ValueError, TypeError, OverflowError) as exc:
            raise ValueError(
                f"could not parse date column {date_column!r} as timestamps ({exc}); "
                "fix its format or name the right column with date_column="
            ) from exc
        used: str | None = date_column
    elif isinstance(df.index, pd.DatetimeIndex):
        dates, used = df.index, None
    else:
        raise ValueError(
            f"missing date column {date_column!r}: the data has columns {list(df.columns)[:10]}"
            f"{' ...' if len(df.columns) > 10 else ''} and no DatetimeIndex; pass date_column=<timestamp column> "
            "or a DataFrame indexed by a DatetimeIndex"
        )
    if dates.hasnans:
        row = int(np.flatnonzero(dates.isna())[0])
        raise ValueError(f"missing timestamps ({int(dates.isna().sum())} NaT values, first at row {row}); "
                         "drop those rows or fix the date column")
    if not dates.is_monotonic_increasing:
        steps = np.diff(dates.to_numpy())
        row = int(np.flatnonzero(steps < np.timedelta64(0))[0]) + 1
        raise ValueError(
            f"timestamps are not sorted: row {row} ({dates[row]}) comes before row {row - 1} ({dates[row - 1]}); "
            "sort the data by time first (e.g. df.sort_values(date_column))"
        )
    if not dates.is_unique:
        dup = dates[dates.duplicated()][0]
        raise ValueError(
            f"duplicated timestamps ({int(dates.duplicated().sum())} rows), e.g. {dup}; drop or aggregate the "
            "duplicates first (e.g. df.drop_duplicates(date_column) or df.groupby(date_column).mean())"
        )
    return dates, used


def _check_regular(dates: pd.DatetimeIndex, date_column: str | None) -> None:
    """Refuse timestamps whose steps vary (gaps, mixed sampling): windows would span different durations."""
    if len(dates) < 3 or pd.infer_freq(dates) is not None:
        return
    steps = dates[1:] - dates[:-1]
    usual = pd.Series(steps).mode()[0]
    row = int(np.flatnonzero(steps != usual)[0]) + 1
    rule = to_offset(usual).freqstr
    index = f"df.set_index({date_column!r})" if date_column else "df"
    raise ValueError(
        f"irregular timestamps: most steps are {usual}, but row {row} ({dates[row]}) comes {steps[row - 1]} after "
        f"row {row - 1}; resample to a regular grid first (e.g. {index}.resample({rule!r}).mean(), then "
        "fill_method='interpolate' repairs the gaps) or pass allow_irregular=True"
    )


def _select_channels(
    df: pd.DataFrame,
    date_column: str | None,
    columns: Sequence[str] | None,
    target: str | None,
    features: str,
) -> tuple[list[Any], Any]:
    """Channels in Time-Series-Library order (target last) and the target's name."""
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ValueError(f"missing columns {missing} (requested in columns=); the data has {list(df.columns)}")
        candidates = [c for c in columns if c != date_column]
    else:
        candidates = [c for c in df.columns if c != date_column]
    if target is None:
        if not candidates:
            raise ValueError("the data has no feature columns besides the date column")
        target = candidates[-1]
    elif target not in df.columns:
        shown = list(df.columns)[-10:]
        raise ValueError(
            f"missing target column {target!r}; the data has {len(df.columns)} columns (last ones: {shown}); "
            "pass target=<column to forecast>"
        )
    if features == "S":
        return [target], target
    return [c for c in candidates if c != target] + [target], target


def _numeric_values(df: pd.DataFrame, channels: list[Any], fill_method: str | None) -> np.ndarray:
    """float64 [T, C] values of ``channels``; NaN/inf refused unless ``fill_method`` is set."""
    bad = [c for c in channels
           if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_complex_dtype(df[c])]
    if bad:
        dtypes = {c: str(df[c].dtype) for c in bad[:10]}
        raise ValueError(
            f"non-numeric feature columns {bad[:10]}{' ...' if len(bad) > 10 else ''} (dtypes {dtypes}); convert them "
            "(e.g. pd.to_numeric) or leave them out (columns=[...] in TimeSeriesDataModule)"
        )
    # na_value makes pandas copy the numbers twice; plain float columns already hold NaN for missing values.
    nullable = any(isinstance(df[c].dtype, pd.api.extensions.ExtensionDtype) for c in channels)
    values = (df[channels].to_numpy(dtype=np.float64, na_value=np.nan) if nullable
              else df[channels].to_numpy(dtype=np.float64))
    finite = np.isfinite(values)
    if finite.all():
        return values
    if fill_method is None:
        col_ok = finite.all(axis=0)
        bad_cols = [channels[j] for j in np.flatnonzero(~col_ok)]
        row = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise ValueError(
            f"found {int((~finite).sum())} NaN or inf values in columns {bad_cols[:10]}"
            f"{' ...' if len(bad_cols) > 10 else ''} (first at row {row}); clean the data or pass "
            "fill_method='ffill' or 'interpolate'"
        )
    # inf is treated as missing too. Leading gaps are back-filled / edge-extended,
    # which looks ahead by a few steps: acceptable for repairing gaps, documented.
    frame = pd.DataFrame(np.where(finite, values, np.nan))
    frame = frame.ffill().bfill() if fill_method == "ffill" else frame.interpolate(limit_direction="both")
    values = frame.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        empty = [channels[j] for j in np.flatnonzero(~np.isfinite(values).all(axis=0))]
        raise ValueError(f"columns {empty} have no valid values at all; drop them")
    return values


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only; a no-op elsewhere).

    pandas 3 parses each CSV column into its own small block; glibc keeps those in its heap after
    the frame is freed, so without this an 862-column file's frame stays resident beside the array.
    """
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        pass


def _scaled_float32(values: np.ndarray, mean: np.ndarray, std: np.ndarray, rows_per_slice: int = 4096) -> np.ndarray:
    """(values - mean) / std as a C-contiguous float32 array, computed in float64 a slice of rows at a time.

    Same numbers as scaling the whole array at once, without a second float64 copy of the series
    (on Traffic-sized files that copy was the largest item of the loading peak).
    """
    out = np.empty(values.shape, dtype=np.float32)
    for start in range(0, len(values), rows_per_slice):
        part = values[start : start + rows_per_slice] - mean
        part /= std
        out[start : start + rows_per_slice] = part
    return out


class _Loaded(Generic[_T]):
    """A DataModule attribute computed by ``_load()``; reading it loads the data first."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self._private = f"_{name}"

    def __get__(self, obj: Any, objtype: type | None = None) -> _T:
        if obj is None:
            return self  # type: ignore[return-value]
        obj._ensure_loaded()
        return getattr(obj, self._private)


class _WindowDataModule(LightningDataModule):
    """Shared machinery: load, validate, scale, split, window, serve loaders.

    Subclasses implement :meth:`_read_frame` and :meth:`_split_ends`, and call
    ``save_hyperparameters()`` in their own ``__init__`` (so the hparams are exactly
    their constructor arguments, as LightningCLI and checkpoints need).
    """

    data = _Loaded[np.ndarray]("The scaled series, float32 [T, C], C-contiguous; every window is a view of it.")
    dates = _Loaded[pd.DatetimeIndex]("Timestamps of the rows of ``data``.")
    marks = _Loaded[np.ndarray | None]("Calendar features [T, F] aligned with ``data`` (None when off).")
    scaler = _Loaded[StandardScaler | None]("The sklearn scaler fit on the training part (None if ``scale=False``).")
    scaler_mean = _Loaded[np.ndarray]("Per-channel mean of x's channels (zeros if ``scale=False``).")
    scaler_std = _Loaded[np.ndarray]("Per-channel std of x's channels (population std; ones if ``scale=False``).")
    channel_names = _Loaded[list[Any]]("Names of x's channels, target last.")
    split_borders = _Loaded[dict[str, tuple[int, int]]]("Rows [start, end) of each split, lookback included.")
    time_feature_names = _Loaded[list[str]]("Names of the calendar features (empty when off).")
    #: Accept timestamps with gaps or varying steps (windows are then counted in rows, not in time).
    allow_irregular: bool = False

    def __init__(
        self,
        *,
        lookback: int,
        horizon: int,
        features: str,
        target: str | None,
        date_column: str | None,
        batch_size: int,
        num_workers: int,
        scale: bool,
        time_features: bool,
        freq: str | None,
        fill_method: str | None,
        drop_last: bool,
        pin_memory: bool,
    ) -> None:
        super().__init__()
        self.lookback = check_int("lookback", lookback, 1, "pass e.g. lookback=96")
        self.horizon = check_int("horizon", horizon, 1, "pass e.g. horizon=96")
        self.batch_size = check_int("batch_size", batch_size, 1, "pass e.g. batch_size=32")
        self.num_workers = check_int("num_workers", num_workers, 0, "pass e.g. num_workers=0")
        if features not in FEATURE_MODES:
            raise ValueError(f"unknown features mode {features!r}; use one of {list(FEATURE_MODES)} "
                             "('M' multivariate, 'S' target only, 'MS' all channels in, target out)")
        if fill_method is not None and fill_method not in FILL_METHODS:
            raise ValueError(f"unknown fill_method {fill_method!r}; use one of {list(FILL_METHODS)} or None")
        self.features = features
        self._target = target
        self.date_column = date_column
        self.scale = scale
        self.time_features = time_features
        self._freq = normalize_freq(freq) if freq is not None else None
        self.fill_method = fill_method
        self.drop_last = drop_last
        self.pin_memory = pin_memory

        self._loaded = False
        self.train_dataset: WindowDataset | None = None
        self.val_dataset: WindowDataset | None = None
        self.test_dataset: WindowDataset | None = None

    # -- subclass hooks -------------------------------------------------------------

    def _read_frame(self) -> pd.DataFrame:
        raise NotImplementedError

    def _split_ends(self, n_rows: int) -> tuple[int, int, int]:
        """Ends of the train, val and test parts; val/test start ``lookback`` rows before their part."""
        raise NotImplementedError

    def _describe(self) -> str:
        """How to name the data in error messages."""
        return "the series"

    # -- loading --------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._load()

    def _load(self) -> None:
        df = self._read_frame()
        dates, used_date_column = _extract_dates(df, self.date_column)
        if not self.allow_irregular:
            _check_regular(dates, used_date_column)
        channels, target = _select_channels(df, used_date_column, self._columns(), self._target, self.features)
        values = _numeric_values(df, channels, self.fill_method)
        del df  # a file's frame is no longer needed: free it before scaling (the peak on wide files)
        _return_freed_memory()

        L, H = self.lookback, self.horizon
        n_rows = len(values)
        a, b, c = self._split_ends(n_rows)
        if c > n_rows:
            raise ValueError(
                f"{self._describe()} has {n_rows} rows but the split protocol needs {c} "
                f"(train ends at {a}, val at {b}, test at {c}); use the complete file"
            )
        borders = {"train": (0, a), "val": (a - L, b), "test": (b - L, c)}
        for split, (start, end) in borders.items():
            if end - start - L - H + 1 < 1:
                raise ValueError(
                    f"{self._describe()} is too short: the {split} split spans {end - start} rows "
                    f"[{start}, {end}) but one window needs lookback + horizon = {L + H} rows; "
                    f"use a longer series or a smaller lookback/horizon"
                )

        if self.scale:
            # Fit on the training part only (no look-ahead); sklearn's semantics:
            # population std, and a constant channel gets scale 1 instead of 0.
            scaler = StandardScaler().fit(values[:a])
            mean = scaler.mean_.astype(np.float64)
            std = scaler.scale_.astype(np.float64)
        else:
            scaler = None
            mean = np.zeros(len(channels))
            std = np.ones(len(channels))
        # Keep only rows the protocol uses, as one C-contiguous float32 block.
        self._data = _scaled_float32(values[:c], mean, std)
        del values
        self._dates = dates[:c]
        self._scaler = scaler
        self._scaler_mean = mean
        self._scaler_std = std
        self._channel_names = list(channels)
        self._resolved_target = target
        self._split_borders = borders
        self._marks = None
        self._time_feature_names = []
        if self.time_features:
            if self._freq is None:
                self._freq = infer_freq(self._dates)
            self._time_feature_names = time_feature_names(self._freq)
            self._marks = time_features(self._dates, self._freq)
        self._loaded = True

    def _columns(self) -> Sequence[str] | None:
        return None

    # -- Lightning hooks ------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Load the series once and build the three split datasets (cheap and idempotent)."""
        self._ensure_loaded()
        if self.train_dataset is not None:
            return
        ys = slice(len(self.channel_names) - 1, None) if self.features == "MS" else None
        datasets = {}
        for split, (start, end) in self.split_borders.items():
            marks = None if self.marks is None else self.marks[start:end]
            datasets[split] = WindowDataset(self.data[start:end], self.lookback, self.horizon, ys, marks)
        self.train_dataset, self.val_dataset, self.test_dataset = (datasets[s] for s in SPLITS)

    def _loader(self, dataset: WindowDataset | None, shuffle: bool, drop_last: bool,
                sampler: Sampler[int] | None = None) -> DataLoader:
        assert dataset is not None  # setup() ran
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training windows; drops the last partial batch only if ``drop_last``."""
        self.setup()
        return self._loader(self.train_dataset, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        """Validation windows in order, last partial batch kept."""
        self.setup()
        return self._loader(self.val_dataset, shuffle=False, drop_last=False,
                            sampler=self._unpadded_rank_sampler(self.val_dataset))

    def test_dataloader(self) -> DataLoader:
        """Test windows in order, last partial batch kept."""
        self.setup()
        return self._loader(self.test_dataset, shuffle=False, drop_last=False,
                            sampler=self._unpadded_rank_sampler(self.test_dataset))

    def _unpadded_rank_sampler(self, dataset: WindowDataset | None) -> Sampler[int] | None:
        """Under multi-process training (DDP), this rank's share of an evaluation split, without padding.

        Lightning's DistributedSampler repeats up to world_size - 1 windows so that every rank gets
        as many batches; in validation and test metrics those windows would count twice. Evaluation
        synchronises no gradients, so ranks may differ by one batch and every window is scored
        exactly once (the metrics then equal a single process's). None on a single process.
        """
        trainer = self.trainer
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        # Lightning's own switch (use_distributed_sampler=False: the user shards the data) is private.
        connector = getattr(trainer, "_accelerator_connector", None)
        if not kwargs or kwargs.get("num_replicas", 1) < 2 or not getattr(connector, "use_distributed_sampler", True):
            return None
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        return UnrepeatedDistributedSampler(dataset, shuffle=False, **kwargs)

    def predict_dataloader(self) -> DataLoader:
        """The test windows, in order (for ``Trainer.predict``)."""
        return self.test_dataloader()

    # -- shapes and scaling for downstream code ----------------------------------------

    @property
    def target(self) -> Any:
        """Name of the target column (the last channel)."""
        if self._target is not None:
            return self._target
        self._ensure_loaded()
        return self._resolved_target

    @property
    def freq(self) -> str:
        """Sampling frequency (pandas alias): the given one, else inferred from the timestamps."""
        if self._freq is None:
            self._ensure_loaded()
            self._freq = infer_freq(self.dates)
        return self._freq

    @property
    def n_channels(self) -> int:
        """Channels in x."""
        self._ensure_loaded()
        return len(self.channel_names)

    @property
    def n_targets(self) -> int:
        """Channels in y (C for 'M', 1 for 'S' and 'MS')."""
        return self.n_channels if self.features == "M" else 1

    @property
    def target_names(self) -> list[Any]:
        """Names of the channels in y."""
        self._ensure_loaded()
        return list(self.channel_names) if self.features == "M" else [self.channel_names[-1]]

    @property
    def target_mean(self) -> np.ndarray:
        """Scaler mean of the channels in y."""
        self._ensure_loaded()
        return self.scaler_mean if self.features == "M" else self.scaler_mean[-1:]

    @property
    def target_std(self) -> np.ndarray:
        """Scaler std of the channels in y."""
        self._ensure_loaded()
        return self.scaler_std if self.features == "M" else self.scaler_std[-1:]

    @property
    def n_time_features(self) -> int:
        """Width of x_mark / y_mark (0 when ``time_features`` is off)."""
        self._ensure_loaded()
        return len(self.time_feature_names)

    def _stats_for(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        # x-space first, then y-space; a width of 1 is the target alone in any mode.
        if width == self.n_channels:
            return self.scaler_mean, self.scaler_std
        if width == self.n_targets:
            return self.target_mean, self.target_std
        if width == 1:
            return self.scaler_mean[-1:], self.scaler_std[-1:]
        raise ValueError(
            f"last dimension is {width}, expected {self.n_channels} (channels of x), {self.n_targets} "
            "(channels of y) or 1 (the target); reshape to [..., channels]"
        )

    def inverse_transform(self, values: ArrayOrTensor) -> ArrayOrTensor:
        """Undo the scaling of an array or tensor shaped [..., C] (x or y channels, or [..., 1] for the target)."""
        return self._apply(values, inverse=True)

    def transform(self, values: ArrayOrTensor) -> ArrayOrTensor:
        """Scale an array or tensor in original units, shaped like for :meth:`inverse_transform`."""
        return self._apply(values, inverse=False)

    def _apply(self, values: ArrayOrTensor, inverse: bool) -> ArrayOrTensor:
        self._ensure_loaded()
        if values.ndim == 0:
            raise ValueError("expected an array shaped [..., channels], got a scalar")
        mean, std = self._stats_for(values.shape[-1])
        if isinstance(values, Tensor):
            dtype = values.dtype if values.is_floating_point() else torch.get_default_dtype()
            m = torch.as_tensor(mean, dtype=dtype, device=values.device)
            s = torch.as_tensor(std, dtype=dtype, device=values.device)
            values = values.to(dtype)
            return values * s + m if inverse else (values - m) / s
        arr = np.asarray(values)
        dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64
        arr = arr.astype(dtype, copy=False)
        m, s = mean.astype(dtype), std.astype(dtype)
        return arr * s + m if inverse else (arr - m) / s


class TimeSeriesDataModule(_WindowDataModule):
    """Windows of lookback L and horizon H over any multivariate series (CSV file or DataFrame).

    The split follows Time-Series-Library's custom-dataset protocol: ``n_train =
    int(N * train_ratio)``, ``n_test = int(N * test_ratio)``, ``n_val = N - n_train -
    n_test``; val starts at ``n_train - L`` and test at ``N - n_test - L`` so their
    first windows see real history. ``borders=(train_end, val_end, test_end)``
    replaces the ratios with fixed row borders (the ETT protocol). The scaler is fit
    on the training part only. Items are ``(x, y)`` float32 tensors [L, C] and [H, C_y],
    plus ``(x_mark, y_mark)`` calendar features when ``time_features`` is on.

    Args:
        path: CSV file (for the CLI). Exactly one of ``path`` and ``df`` must be given.
        df: DataFrame with a ``date_column`` or a DatetimeIndex (library use).
        lookback: L, input length.
        horizon: H, forecast length.
        target: column to forecast; ``None`` means the last feature column.
        features: 'M' (all -> all), 'S' (target -> target) or 'MS' (all -> target).
        date_column: timestamp column; when absent a DatetimeIndex is used.
        columns: feature columns to use (default: all but the date column).
        train_ratio: training share when ``borders`` is not given.
        test_ratio: test share when ``borders`` is not given (val gets the rest).
        borders: fixed ends of the train, val and test parts, in rows.
        batch_size: batch size of all loaders.
        num_workers: DataLoader workers (0: load in the main process, which is fast enough).
        scale: standardize with the training statistics.
        time_features: add calendar features (x_mark, y_mark) to each item.
        freq: sampling frequency for the calendar features (default: inferred).
        fill_method: repair NaN/inf with 'ffill' (then back-fill) or 'interpolate'
            (linear); ``None`` refuses such data.
        drop_last: drop the last partial training batch.
        pin_memory: DataLoader ``pin_memory``.
        allow_irregular: accept timestamps with gaps or varying steps; by default such data is refused
            (resample it to a regular grid first).
    """

    def __init__(
        self,
        path: str | None = None,
        df: pd.DataFrame | None = None,
        lookback: int = 96,
        horizon: int = 96,
        target: str | None = None,
        features: Features = "M",
        date_column: str | None = "date",
        columns: list[str] | None = None,
        train_ratio: float = 0.7,
        test_ratio: float = 0.2,
        borders: tuple[int, int, int] | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        scale: bool = True,
        time_features: bool = False,
        freq: str | None = None,
        fill_method: FillMethod | None = None,
        drop_last: bool = False,
        pin_memory: bool = False,
        allow_irregular: bool = False,
    ) -> None:
        self.allow_irregular = allow_irregular
        super().__init__(
            lookback=lookback, horizon=horizon, features=features, target=target, date_column=date_column,
            batch_size=batch_size, num_workers=num_workers, scale=scale, time_features=time_features,
            freq=freq, fill_method=fill_method, drop_last=drop_last, pin_memory=pin_memory,
        )
        # The DataFrame stays out of hparams: it would be logged and pickled into checkpoints.
        self.save_hyperparameters(ignore=["df"])
        if (path is None) == (df is None):
            raise ValueError("give exactly one data source: path=<CSV file> or df=<DataFrame>")
        if df is not None and not isinstance(df, pd.DataFrame):
            raise ValueError(f"df must be a pandas DataFrame, got {type(df).__name__}")
        if borders is None:
            if not (0 < train_ratio < 1 and 0 < test_ratio < 1 and train_ratio + test_ratio < 1):
                raise ValueError(
                    f"need 0 < train_ratio, 0 < test_ratio and train_ratio + test_ratio < 1 "
                    f"(val gets the rest), got {train_ratio} and {test_ratio}"
                )
        else:
            if len(borders) != 3 or not all(isinstance(v, (int, np.integer)) for v in borders) \
                    or not 0 < borders[0] < borders[1] < borders[2]:
                raise ValueError(f"borders must be 3 increasing positive row counts (train_end, val_end, test_end), "
                                 f"got {borders!r}")
        self.path = Path(path) if path is not None else None
        self.df = df
        self.columns = list(columns) if columns is not None else None
        self.train_ratio = train_ratio
        self.test_ratio = test_ratio
        self.borders = tuple(int(v) for v in borders) if borders is not None else None

    def _read_frame(self) -> pd.DataFrame:
        if self.df is not None:
            return self.df
        assert self.path is not None
        if not self.path.is_file():
            raise FileNotFoundError(f"no such CSV file: {self.path.resolve()}")
        return read_csv(self.path)

    def _describe(self) -> str:
        return str(self.path) if self.path is not None else "the DataFrame"

    def _columns(self) -> Sequence[str] | None:
        return self.columns

    def _split_ends(self, n_rows: int) -> tuple[int, int, int]:
        if self.borders is not None:
            return self.borders  # type: ignore[return-value]
        n_train = int(n_rows * self.train_ratio)
        n_test = int(n_rows * self.test_ratio)
        return n_train, n_rows - n_test, n_rows
