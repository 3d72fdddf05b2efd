"""Tests for datamodules: protocol borders, scaling, windows, loaders, downloads, bad input, memory."""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import math
import pickle
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import datamodules as dms
from datamodules import (
    ChecksumError,
    DownloadError,
    ECLDataModule,
    ETTh1DataModule,
    ETTh2DataModule,
    ETTm1DataModule,
    ETTm2DataModule,
    TimeSeriesDataModule,
    TrafficDataModule,
    WeatherDataModule,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ETT_DIR = SHARED_DATA / "ETT-small"
needs_ett = pytest.mark.skipif(
    not (ETT_DIR / "ETTh1.csv").is_file() or not (ETT_DIR / "ETTh2.csv").is_file(),
    reason=f"real ETT files not found in {ETT_DIR} (the shared data folder is missing)",
)

L = 96
ETT_H = {"train": 8640, "val": 11520, "test": 14400}
ETT_COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
WEATHER_COLUMNS = [
    "p (mbar)", "T (degC)", "Tpot (K)", "Tdew (degC)", "rh (%)", "VPmax (mbar)", "VPact (mbar)",
    "VPdef (mbar)", "sh (g/kg)", "H2OC (mmol/mol)", "rho (g/m**3)", "wv (m/s)", "max. wv (m/s)",
    "wd (deg)", "rain (mm)", "raining (s)", "SWDR (W/m²)", "PAR (µmol/m²/s)", "max. PAR (µmol/m²/s)",
    "Tlog (degC)", "OT",
]


# -- helpers ------------------------------------------------------------------------------


@functools.cache
def _raw(name: str) -> np.ndarray:
    """Real ETT values (float64, without the date column), read independently of the package."""
    return pd.read_csv(ETT_DIR / f"{name}.csv").iloc[:, 1:].to_numpy(dtype=np.float64)


def _write_series(path: Path, columns: list[str], n_rows: int, freq: str, start: str, seed: int = 0,
                  encoding: str = "utf-8") -> np.ndarray:
    """Write a CSV in the benchmarks' schema ('date' first, 'OT' last); return its values as read back."""
    rng = np.random.default_rng(seed)
    # Different level and spread per channel, so wrong per-channel statistics would show.
    values = rng.standard_normal((n_rows, len(columns))) * rng.uniform(0.5, 5, len(columns)) \
        + rng.uniform(-10, 10, len(columns))
    df = pd.DataFrame(values, columns=columns)
    df.insert(0, "date", pd.date_range(start, periods=n_rows, freq=freq))
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, float_format="%.4f", encoding=encoding)
    return pd.read_csv(path, encoding=encoding).iloc[:, 1:].to_numpy(dtype=np.float64)


def _scaled(values: np.ndarray, n_train: int) -> np.ndarray:
    return (values - values[:n_train].mean(0)) / values[:n_train].std(0)


def _frame(n_rows: int = 400, freq: str = "h") -> pd.DataFrame:
    rng = np.random.default_rng(1)
    df = pd.DataFrame(rng.standard_normal((n_rows, 4)), columns=["a", "b", "c", "OT"])
    df.insert(0, "date", pd.date_range("2021-01-01", periods=n_rows, freq=freq))
    return df


# -- real ETTh1 / ETTh2 --------------------------------------------------------------------------


@needs_ett
@pytest.mark.parametrize("cls", [ETTh1DataModule, ETTh2DataModule])
@pytest.mark.parametrize("horizon", [96, 192, 336, 720])
def test_ett_hourly_window_counts(cls: type, horizon: int) -> None:
    dm = cls(data_dir=str(SHARED_DATA), lookback=L, horizon=horizon)
    dm.setup()
    assert len(dm.train_dataset) == 8640 - L - horizon + 1
    assert len(dm.val_dataset) == (11520 - (8640 - L)) - L - horizon + 1
    assert len(dm.test_dataset) == (14400 - (11520 - L)) - L - horizon + 1
    if horizon == 96:
        assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (8449, 2785, 2785)
    assert dm.split_borders == {"train": (0, 8640), "val": (8640 - L, 11520), "test": (11520 - L, 14400)}
    assert dm.data.shape == (14400, 7) and dm.data.dtype == np.float32


@needs_ett
@pytest.mark.parametrize("name", ["ETTh1", "ETTh2"])
def test_ett_scaler_is_fit_on_train_part_only(name: str) -> None:
    dm = dms.get_datamodule(name, data_dir=str(SHARED_DATA))
    dm.setup()
    train = _raw(name)[:8640]
    np.testing.assert_allclose(dm.scaler_mean, train.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(dm.scaler_std, train.std(axis=0), rtol=1e-12)  # population std (ddof=0)
    assert dm.channel_names == ETT_COLUMNS and dm.target == "OT"
    assert dm.n_channels == dm.n_targets == 7
    assert isinstance(dm.scaler_mean, np.ndarray) and isinstance(dm.scaler_std, np.ndarray)
    np.testing.assert_allclose(dm.target_mean, dm.scaler_mean)


@needs_ett
@pytest.mark.parametrize("horizon", [96, 720])
def test_ett_first_and_last_windows_equal_hand_sliced_arrays(horizon: int) -> None:
    dm = ETTh1DataModule(data_dir=str(SHARED_DATA), lookback=L, horizon=horizon)
    dm.setup()
    scaled = _scaled(_raw("ETTh1"), 8640)
    cases = {
        "test_first": (dm.test_dataset[0], 11520 - L),
        "test_last": (dm.test_dataset[len(dm.test_dataset) - 1], 14400 - horizon - L),
        "val_first": (dm.val_dataset[0], 8640 - L),
        "train_last": (dm.train_dataset[-1], 8640 - horizon - L),
    }
    for case, ((x, y), start) in cases.items():
        assert x.dtype == y.dtype == torch.float32, case
        np.testing.assert_allclose(x.numpy(), scaled[start:start + L], atol=1e-5, err_msg=case)
        np.testing.assert_allclose(y.numpy(), scaled[start + L:start + L + horizon], atol=1e-5, err_msg=case)


@needs_ett
def test_ett_no_window_crosses_its_split_border() -> None:
    horizon = 192
    dm = ETTh1DataModule(data_dir=str(SHARED_DATA), lookback=L, horizon=horizon)
    dm.setup()
    row_bytes = dm.data.strides[0]
    for split, (start, end) in dm.split_borders.items():
        ds = getattr(dm, f"{split}_dataset")
        # The split is exactly rows [start, end) of the shared array...
        offset = ds.data.__array_interface__["data"][0] - dm.data.__array_interface__["data"][0]
        assert offset == start * row_bytes and len(ds.data) == end - start
        assert len(ds) == end - start - L - horizon + 1
        # ...its last window ends exactly at the border, and there is no window past it.
        x, y = ds[len(ds) - 1]
        np.testing.assert_array_equal(y.numpy(), dm.data[end - horizon:end])
        with pytest.raises(IndexError):
            ds[len(ds)]
    # Val/test forecasts start exactly at their part's first row (the lookback reaches back).
    np.testing.assert_array_equal(dm.val_dataset[0][1].numpy(), dm.data[8640:8640 + horizon])
    np.testing.assert_array_equal(dm.test_dataset[0][1].numpy(), dm.data[11520:11520 + horizon])


@needs_ett
def test_ett_S_and_MS_modes() -> None:
    s = ETTh1DataModule(data_dir=str(SHARED_DATA), features="S")
    s.setup()
    x, y = s.train_dataset[0]
    assert x.shape == (L, 1) and y.shape == (96, 1)
    assert (s.n_channels, s.n_targets, s.channel_names, s.target_names) == (1, 1, ["OT"], ["OT"])
    ot = _raw("ETTh1")[:, -1]
    np.testing.assert_allclose(s.scaler_mean, [ot[:8640].mean()], rtol=1e-12)
    np.testing.assert_allclose(x[:, 0].numpy(), (ot[:L] - ot[:8640].mean()) / ot[:8640].std(), atol=1e-5)

    ms = ETTh1DataModule(data_dir=str(SHARED_DATA), features="MS")
    ms.setup()
    x, y = ms.test_dataset[5]
    assert x.shape == (L, 7) and y.shape == (96, 1)
    assert (ms.n_channels, ms.n_targets, ms.target_names) == (7, 1, ["OT"])
    np.testing.assert_array_equal(y.numpy()[:, 0], ms.data[11520 - L + 5 + L:11520 + 5 + 96, -1])
    np.testing.assert_allclose(ms.target_mean, ms.scaler_mean[-1:])
    np.testing.assert_allclose(ms.target_std, ms.scaler_std[-1:])
    # MS uses the same (all-channel) scaling as M: the target column is scaled identically.
    np.testing.assert_allclose(ms.scaler_mean[-1], s.scaler_mean[0])


@needs_ett
def test_ett_time_features() -> None:
    dm = ETTh1DataModule(data_dir=str(SHARED_DATA), time_features=True, features="MS")
    dm.setup()
    x, y, x_mark, y_mark = dm.train_dataset[0]
    assert dm.time_feature_names == ["hour_of_day", "day_of_week", "day_of_month", "day_of_year"]
    assert x_mark.shape == (L, 4) and y_mark.shape == (96, 4) and x_mark.dtype == torch.float32
    assert dm.n_time_features == 4
    # 2016-07-01 00:00 is a Friday (dayofweek 4), day 183 of a leap year.
    np.testing.assert_allclose(x_mark[0].numpy(), [-0.5, 4 / 6 - 0.5, -0.5, 182 / 365 - 0.5], atol=1e-6)
    np.testing.assert_allclose(x_mark[1, 0].item(), 1 / 23 - 0.5, atol=1e-6)
    assert float(dm.marks.min()) >= -0.5 and float(dm.marks.max()) <= 0.5
    batch = next(iter(dm.val_dataloader()))
    assert [tuple(t.shape) for t in batch] == [(32, L, 7), (32, 96, 1), (32, L, 4), (32, 96, 4)]
    # Off by default: plain pairs.
    assert len(ETTh1DataModule(data_dir=str(SHARED_DATA)).test_dataloader().dataset[0]) == 2


@needs_ett
@pytest.mark.parametrize("batch_size", [32, 64])
def test_ett_loaders_keep_last_partial_batch(batch_size: int) -> None:
    dm = ETTh1DataModule(data_dir=str(SHARED_DATA), batch_size=batch_size)
    dm.setup()
    for loader, n in [(dm.val_dataloader(), 2785), (dm.test_dataloader(), 2785), (dm.predict_dataloader(), 2785)]:
        assert len(loader) == math.ceil(n / batch_size)
    sizes = [len(x) for x, _ in dm.val_dataloader()]
    assert sum(sizes) == 2785 and sizes[-1] == (2785 % batch_size or batch_size)
    assert len(dm.train_dataloader()) == math.ceil(8449 / batch_size)
    dropping = ETTh1DataModule(data_dir=str(SHARED_DATA), batch_size=batch_size, drop_last=True)
    assert len(dropping.train_dataloader()) == 8449 // batch_size
    assert len(dropping.val_dataloader()) == math.ceil(2785 / batch_size)
    # Test windows are served in order; training windows are shuffled.
    x, _ = next(iter(dm.predict_dataloader()))
    np.testing.assert_array_equal(x[1].numpy(), dm.test_dataset[1][0].numpy())
    torch.manual_seed(0)
    x, _ = next(iter(dm.train_dataloader()))
    assert not torch.equal(x[:4], torch.stack([dm.train_dataset[i][0] for i in range(4)]))


@needs_ett
def test_ett_inverse_transform_round_trip() -> None:
    raw = _raw("ETTh1")
    dm = ETTh1DataModule(data_dir=str(SHARED_DATA))
    dm.setup()
    x, y = next(iter(dm.test_dataloader()))  # [32, L, 7], [32, H, 7]
    back = dm.inverse_transform(y)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float32 and back.shape == y.shape
    np.testing.assert_allclose(back[0].numpy(), raw[11520:11520 + 96], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dm.inverse_transform(y.numpy())[3], raw[11523:11523 + 96], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dm.transform(back), y, rtol=1e-5, atol=1e-5)
    # Target-only forecasts ([..., 1]) are mapped with the target's statistics, in any mode.
    np.testing.assert_allclose(dm.inverse_transform(y[..., -1:].numpy())[0, :, 0], raw[11520:11616, -1], atol=1e-4)
    ms = ETTh1DataModule(data_dir=str(SHARED_DATA), features="MS")
    ms.setup()
    _, y_ms = ms.test_dataset[0]
    np.testing.assert_allclose(ms.inverse_transform(y_ms).numpy()[:, 0], raw[11520:11616, -1], atol=1e-4)
    with pytest.raises(ValueError, match="last dimension is 3"):
        dm.inverse_transform(np.zeros((2, 3)))
    # Without scaling the data are in original units and inverse_transform is the identity.
    raw_dm = ETTh1DataModule(data_dir=str(SHARED_DATA), scale=False)
    np.testing.assert_allclose(raw_dm.inverse_transform(raw[:5]), raw[:5])
    np.testing.assert_allclose(raw_dm.data[:5], raw[:5], rtol=1e-6)


@needs_ett
def test_setup_is_idempotent_and_attributes_are_lazy() -> None:
    dm = ETTh1DataModule(data_dir=str(SHARED_DATA), lookback=48, horizon=24)
    # Downstream code can size a model before the Trainer calls setup().
    assert (dm.n_channels, dm.n_targets, dm.lookback, dm.horizon) == (7, 7, 48, 24)
    dm.setup("fit")
    train, data = dm.train_dataset, dm.data
    def no_reload() -> None:
        raise AssertionError("setup() read the file again")

    dm._read_frame = no_reload  # type: ignore[method-assign]
    dm.setup("test")
    dm.setup("predict")
    assert dm.train_dataset is train and dm.data is data
    assert dm.hparams["lookback"] == 48 and dm.hparams["data_dir"] == str(SHARED_DATA)


@needs_ett
def test_common_layout_and_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(dms.DATA_DIR_ENV, str(SHARED_DATA))
    dm = ETTh2DataModule()
    assert dm.data_dir == SHARED_DATA
    assert dm.find_file() == ETT_DIR / "ETTh2.csv"  # data_dir/ETT-small/ETTh2.csv
    # A flat copy in data_dir is found first.
    shutil.copy(ETT_DIR / "ETTh2.csv", tmp_path / "ETTh2.csv")
    assert ETTh2DataModule(data_dir=str(tmp_path)).find_file() == tmp_path / "ETTh2.csv"


def test_default_data_dir_honours_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(dms.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dms.default_data_dir() == tmp_path / "xdg" / "titans-ts"
    assert WeatherDataModule().data_dir == tmp_path / "xdg" / "titans-ts"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert dms.default_data_dir() == Path.home() / ".cache" / "titans-ts"


# -- synthetic files in the real schemas ------------------------------------------------------


@pytest.mark.parametrize(("cls", "layout"), [(ETTm1DataModule, "flat"), (ETTm2DataModule, "ETT-small")])
def test_ettm_protocol_is_hourly_borders_times_four(cls: type, layout: str, tmp_path: Path) -> None:
    folder = tmp_path if layout == "flat" else tmp_path / layout
    values = _write_series(folder / cls.file_name, ETT_COLUMNS, 69680, "15min", "2016-07-01")
    horizon = 336
    dm = cls(data_dir=str(tmp_path), lookback=L, horizon=horizon, time_features=True)
    dm.setup()
    tr, va, te = 4 * 8640, 4 * 11520, 4 * 14400
    assert dm.split_borders == {"train": (0, tr), "val": (tr - L, va), "test": (va - L, te)}
    assert len(dm.train_dataset) == tr - L - horizon + 1
    assert len(dm.val_dataset) == len(dm.test_dataset) == 11520 - horizon + 1
    np.testing.assert_allclose(dm.scaler_mean, values[:tr].mean(0), rtol=1e-10)
    np.testing.assert_allclose(dm.scaler_std, values[:tr].std(0), rtol=1e-10)
    scaled = _scaled(values, tr)
    x, y, x_mark, _ = dm.test_dataset[len(dm.test_dataset) - 1]
    np.testing.assert_allclose(y.numpy(), scaled[te - horizon:te], atol=1e-5)
    np.testing.assert_allclose(x.numpy(), scaled[te - horizon - L:te - horizon], atol=1e-5)
    # 15-minute data get minute-of-hour too.
    assert dm.freq == "15min" and dm.time_feature_names[0] == "minute_of_hour" and x_mark.shape == (L, 5)


@pytest.mark.parametrize(
    ("cls", "columns", "n_rows", "freq", "start"),
    [
        (ECLDataModule, [str(i) for i in range(320)] + ["OT"], 2011, "h", "2016-07-01 02:00:00"),
        (TrafficDataModule, [str(i) for i in range(861)] + ["OT"], 1003, "h", "2016-07-01 02:00:00"),
        (WeatherDataModule, WEATHER_COLUMNS, 3007, "10min", "2020-01-01 00:10:00"),
    ],
    ids=["ECL", "Traffic", "Weather"],
)
def test_ratio_protocol_70_10_20(cls: type, columns: list[str], n_rows: int, freq: str, start: str,
                                 tmp_path: Path) -> None:
    values = _write_series(tmp_path / cls.subdir / cls.file_name, columns, n_rows, freq, start)
    horizon = 96
    dm = cls(data_dir=str(tmp_path), lookback=L, horizon=horizon, features="MS", time_features=True)
    dm.setup()
    n_train, n_test = int(n_rows * 0.7), int(n_rows * 0.2)
    n_val = n_rows - n_train - n_test
    assert dm.split_borders == {
        "train": (0, n_train), "val": (n_train - L, n_train + n_val), "test": (n_rows - n_test - L, n_rows),
    }
    assert len(dm.train_dataset) == n_train - L - horizon + 1
    assert len(dm.val_dataset) == n_val - horizon + 1
    assert len(dm.test_dataset) == n_test - horizon + 1
    assert dm.channel_names == columns and dm.n_channels == len(columns) and dm.target_names == ["OT"]
    np.testing.assert_allclose(dm.scaler_mean, values[:n_train].mean(0), rtol=1e-10)
    np.testing.assert_allclose(dm.scaler_std, values[:n_train].std(0), rtol=1e-10)
    scaled = _scaled(values, n_train)
    x, y, _, y_mark = dm.test_dataset[0]
    assert x.shape == (L, len(columns)) and y.shape == (horizon, 1)
    np.testing.assert_allclose(x.numpy(), scaled[n_rows - n_test - L:n_rows - n_test], atol=1e-5)
    np.testing.assert_allclose(y.numpy()[:, 0], scaled[n_rows - n_test:n_rows - n_test + horizon, -1], atol=1e-5)
    assert dm.freq == freq and y_mark.shape == (horizon, len(dms.time_feature_names(freq)))


def test_weather_latin1_file_is_read(tmp_path: Path) -> None:
    _write_series(tmp_path / "weather.csv", WEATHER_COLUMNS, 1200, "10min", "2020-01-01 00:10:00",
                  encoding="latin-1")
    dm = WeatherDataModule(data_dir=str(tmp_path), lookback=24, horizon=24)
    assert dm.channel_names[16:19] == ["SWDR (W/m²)", "PAR (µmol/m²/s)", "max. PAR (µmol/m²/s)"]


# -- the generic DataModule ------------------------------------------------------------------


def test_dataframe_with_datetime_index_and_target_in_the_middle() -> None:
    df = _frame(500).set_index("date").rename(columns={"OT": "d", "b": "load"})
    dm = TimeSeriesDataModule(df=df, lookback=24, horizon=12, target="load", features="MS", time_features=True)
    dm.setup()
    # Target moved last (Time-Series-Library order); hparams do not carry the DataFrame.
    assert dm.channel_names == ["a", "c", "d", "load"] and dm.target == "load"
    assert "df" not in dm.hparams and dm.hparams["target"] == "load"
    x, y, x_mark, y_mark = dm.train_dataset[0]
    assert x.shape == (24, 4) and y.shape == (12, 1) and x_mark.shape == (24, 4)
    n_train = int(500 * 0.7)
    load = df["load"].to_numpy()
    np.testing.assert_allclose(y.numpy()[:, 0], (load[24:36] - load[:n_train].mean()) / load[:n_train].std(),
                               atol=1e-5)
    assert dm.freq == "h"  # inferred


def test_csv_path_target_defaults_to_last_column_and_custom_borders(tmp_path: Path) -> None:
    _frame(600, freq="D").to_csv(tmp_path / "series.csv", index=False)
    dm = TimeSeriesDataModule(path=str(tmp_path / "series.csv"), lookback=30, horizon=10, borders=(300, 400, 550))
    dm.setup()
    assert dm.target == "OT" and dm.n_channels == 4
    assert dm.split_borders == {"train": (0, 300), "val": (270, 400), "test": (370, 550)}
    assert dm.data.shape == (550, 4)  # rows after the last border are not kept
    assert dms.time_feature_names(dm.freq) == ["day_of_week", "day_of_month", "day_of_year"]


@pytest.mark.parametrize("method", ["ffill", "interpolate"])
def test_fill_method_repairs_gaps(method: str) -> None:
    df = _frame()
    df.loc[0, "a"] = np.nan  # leading gap: back-filled / edge-extended
    df.loc[10, "b"] = np.inf
    df.loc[[20, 21], "OT"] = np.nan
    dm = TimeSeriesDataModule(df=df, lookback=24, horizon=24, fill_method=method, scale=False)
    dm.setup()
    assert np.isfinite(dm.data).all()
    ot = dm.data[:, -1]
    expected = [ot[19], ot[19]] if method == "ffill" else [ot[19] + (ot[22] - ot[19]) / 3, ot[19] + 2 * (ot[22] - ot[19]) / 3]
    np.testing.assert_allclose(ot[20:22], expected, rtol=1e-5)
    assert dm.data[0, 0] == dm.data[1, 0]


def _drop_date(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns="date")


def _swap_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.iloc[[0, 2, 1, *range(3, len(df))]].reset_index(drop=True)


def _duplicate_stamp(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[5, "date"] = df.loc[4, "date"]
    return df


def _set(column: str, value: object) -> object:
    def mutate(df: pd.DataFrame) -> pd.DataFrame:
        df[column] = df[column].astype(object) if isinstance(value, str) else df[column]
        df.loc[7, column] = value
        return df
    return mutate


@pytest.mark.parametrize(
    ("mutate", "kwargs", "message"),
    [
        (_drop_date, {}, "missing date column 'date'"),
        (None, {"target": "price"}, "missing target column 'price'"),
        (None, {"columns": ["a", "zz"]}, r"missing columns \['zz'\]"),
        (_swap_rows, {}, "timestamps are not sorted"),
        (_duplicate_stamp, {}, "duplicated timestamps"),
        (_set("date", "not a date"), {}, "could not parse date column"),
        (_set("b", np.nan), {}, r"NaN or inf values in columns \['b'\].*fill_method"),
        (_set("OT", np.inf), {}, r"NaN or inf values in columns \['OT'\]"),
        (_set("a", "x"), {}, r"non-numeric feature columns \['a'\]"),
        (lambda df: df.iloc[:250], {}, "too short"),
        (None, {"lookback": 0}, "lookback must be an integer >= 1"),
        (None, {"horizon": -3}, "horizon must be an integer >= 1"),
        (None, {"lookback": 2.5}, "lookback must be an integer"),
        (None, {"features": "MM"}, "unknown features mode 'MM'"),
        (None, {"fill_method": "zero"}, "unknown fill_method 'zero'"),
        (None, {"batch_size": 0}, "batch_size must be"),
        (None, {"train_ratio": 0.9, "test_ratio": 0.2}, "train_ratio"),
        (None, {"borders": (300, 200, 400)}, "borders must be 3 increasing"),
        (None, {"borders": (200, 300, 900)}, "split protocol needs 900"),
        (None, {"freq": "fortnightly"}, "unknown frequency 'fortnightly'"),
        (None, {"path": "x.csv"}, "exactly one data source"),
    ],
    ids=["no-date", "no-target", "no-column", "unsorted", "duplicates", "bad-date", "nan", "inf", "non-numeric",
         "too-short", "lookback-0", "horizon-neg", "lookback-float", "features", "fill", "batch", "ratios",
         "borders-order", "borders-long", "freq", "two-sources"],
)
def test_bad_input_is_refused_with_a_clear_message(mutate, kwargs: dict, message: str) -> None:
    df = _frame()
    if mutate is not None:
        df = mutate(df)
    with pytest.raises(ValueError, match=message):
        dm = TimeSeriesDataModule(df=df, **{"lookback": 96, "horizon": 96, **kwargs})
        dm.setup()


def test_benchmark_file_shorter_than_the_protocol(tmp_path: Path) -> None:
    _write_series(tmp_path / "ETTh1.csv", ETT_COLUMNS, 10000, "h", "2016-07-01")
    with pytest.raises(ValueError, match="has 10000 rows but the split protocol needs 14400"):
        ETTh1DataModule(data_dir=str(tmp_path)).setup()


def test_missing_file_names_the_expected_path(tmp_path: Path) -> None:
    dm = TrafficDataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="download=True") as err:
        dm.setup()
    assert str((tmp_path / "traffic.csv").resolve()) in str(err.value)


# -- downloads against a local server ------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on an ephemeral port, serving a temporary folder."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@needs_ett
def test_download_good_file_is_verified_and_loads(http_root: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_root
    shutil.copy(ETT_DIR / "ETTh1.csv", root / "ETTh1.csv")
    cache = tmp_path / "cache"
    dm = ETTh1DataModule(data_dir=str(cache), download=True, url=f"{base}/ETTh1.csv")
    dm.prepare_data()
    assert sorted(p.name for p in cache.iterdir()) == ["ETTh1.csv"]  # no temporary file left
    assert dms.sha256sum(cache / "ETTh1.csv") == dms.SHA256["ETTh1"]
    dm.setup()
    assert len(dm.train_dataset) == 8449


def test_download_via_env_base_url_without_known_checksum(http_root: tuple[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    base, root = http_root
    _write_series(root / "weather.csv", WEATHER_COLUMNS, 1500, "10min", "2020-01-01 00:10:00")
    monkeypatch.setenv(dms.DATA_URL_ENV, base + "/")
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        dm = WeatherDataModule(data_dir=str(cache), download=True, lookback=24, horizon=24)
        dm.setup()
    assert "No sha256 is known" in caplog.text and dms.sha256sum(root / "weather.csv") in caplog.text
    assert dm.n_channels == 21 and sorted(p.name for p in cache.iterdir()) == ["weather.csv"]


def test_download_with_user_sha256_and_overridden_url_map(http_root: tuple[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    base, root = http_root
    _write_series(root / "ETTm1.csv", ETT_COLUMNS, 69680, "15min", "2016-07-01")
    digest = hashlib.sha256((root / "ETTm1.csv").read_bytes()).hexdigest()
    monkeypatch.delenv(dms.DATA_URL_ENV, raising=False)
    monkeypatch.setitem(dms.URLS, "ETTm1", f"{base}/ETTm1.csv")
    good = ETTm1DataModule(data_dir=str(tmp_path / "ok"), download=True, sha256=digest.upper())
    good.prepare_data()
    assert dms.sha256sum(tmp_path / "ok" / "ETTm1.csv") == digest
    # A user-supplied sha256 is enforced, on download and on an existing file.
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        ETTm1DataModule(data_dir=str(tmp_path / "bad"), download=True, sha256="0" * 64).prepare_data()
    assert not any((tmp_path / "bad").iterdir())
    with pytest.raises(ChecksumError, match="expected 000"):
        ETTm1DataModule(data_dir=str(tmp_path / "ok"), sha256="0" * 64).setup()


def test_download_corrupt_file_is_refused_and_not_kept(http_root: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_root
    _write_series(root / "ETTh1.csv", ETT_COLUMNS, 200, "h", "2016-07-01")  # not the real ETTh1
    cache = tmp_path / "cache"
    dm = ETTh1DataModule(data_dir=str(cache), download=True, url=f"{base}/ETTh1.csv")
    with pytest.raises(ChecksumError) as err:
        dm.setup()
    message = str(err.value)
    assert "sha256 mismatch" in message and dms.SHA256["ETTh1"] in message
    assert str((cache / "ETTh1.csv").resolve()) in message
    assert not any(cache.iterdir())


def test_download_http_error(http_root: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = http_root
    with pytest.raises(DownloadError, match="HTTP 404"):
        dms.download_file(f"{base}/missing.csv", tmp_path / "missing.csv", progress=False)
    assert not any(tmp_path.glob("*missing*"))


def test_download_unreachable_fails_fast_naming_the_path(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cache = tmp_path / "cache"
    dm = ETTh2DataModule(data_dir=str(cache), download=True, url=f"http://127.0.0.1:{port}/ETTh2.csv")
    dm.download_timeout = 2.0
    t0 = time.perf_counter()
    with pytest.raises(DownloadError, match="could not download") as err:
        dm.prepare_data()
    assert time.perf_counter() - t0 < 10
    assert str((cache / "ETTh2.csv").resolve()) in str(err.value) and "ETTh2" in str(err.value)
    assert not any(cache.iterdir())


def test_no_known_url_asks_for_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dms.DATA_URL_ENV, raising=False)
    with pytest.raises(DownloadError, match="no download URL is known for Traffic.*url="):
        TrafficDataModule(data_dir=str(tmp_path), download=True).prepare_data()


# -- memory and loading cost ------------------------------------------------------------------------


def _inside(t: torch.Tensor, base: np.ndarray) -> bool:
    start = base.__array_interface__["data"][0]
    return start <= t.untyped_storage().data_ptr() and t.data_ptr() + t.nbytes <= start + base.nbytes


def test_windows_are_views_of_one_array() -> None:
    dm = TimeSeriesDataModule(df=_frame(1000), lookback=48, horizon=24, features="MS", time_features=True)
    dm.setup()
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        assert np.shares_memory(ds.data, dm.data)
        x, y, x_mark, y_mark = ds[len(ds) // 2]
        assert _inside(x, dm.data) and _inside(y, dm.data)
        assert _inside(x_mark, dm.marks) and _inside(y_mark, dm.marks)
        # Pickling (e.g. for spawned workers) carries the array once, not per window nor twice.
        assert len(pickle.dumps(ds)) < 1.5 * (ds.data.nbytes + ds.marks.nbytes)
        copy = pickle.loads(pickle.dumps(ds))
        assert all(torch.equal(a, b) for a, b in zip(copy[3], ds[3]))


def test_traffic_sized_series_is_stored_once() -> None:
    n_rows, n_channels = 17544, 862
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.standard_normal((n_rows, n_channels), dtype=np.float32),
                      columns=[str(i) for i in range(n_channels - 1)] + ["OT"],
                      index=pd.date_range("2016-07-01 02:00", periods=n_rows, freq="h"))
    dm = TimeSeriesDataModule(df=df, lookback=96, horizon=720, batch_size=32)
    dm.setup()
    raw_bytes = n_rows * n_channels * 4
    assert dm.data.nbytes == raw_bytes and dm.data.flags.c_contiguous
    datasets = (dm.train_dataset, dm.val_dataset, dm.test_dataset)
    n_windows = sum(len(ds) for ds in datasets)
    assert n_windows > 10_000  # materialized windows would need n_windows * (96 + 720) rows
    for ds in datasets:
        assert ds.data.base is dm.data or np.shares_memory(ds.data, dm.data)
        assert not ds.data.flags.owndata
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (32, 96, n_channels) and y.shape == (32, 720, n_channels)


@needs_ett
def test_full_ettH1_epoch_iterates_all_windows() -> None:
    """Loading cost sanity (no wall-clock assert): one pass over every training window at batch 32."""
    dm = ETTh1DataModule(data_dir=str(SHARED_DATA), batch_size=32)
    n = 0
    for x, y in dm.train_dataloader():
        assert x.is_contiguous() and x.shape[1:] == (96, 7) and y.shape[1:] == (96, 7)
        n += len(x)
    assert n == 8449


def test_worker_processes_get_the_same_windows() -> None:
    dm = TimeSeriesDataModule(df=_frame(300), lookback=24, horizon=24, num_workers=1, batch_size=16)
    in_process = TimeSeriesDataModule(df=_frame(300), lookback=24, horizon=24, batch_size=16)
    for (x1, y1), (x2, y2) in zip(dm.test_dataloader(), in_process.test_dataloader()):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


# -- configuration -----------------------------------------------------------------------------------


def test_constructors_work_with_jsonargparse(tmp_path: Path) -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    _frame(400).to_csv(tmp_path / "s.csv", index=False)
    for cls, args in [
        (TimeSeriesDataModule, [f"--data.path={tmp_path / 's.csv'}", "--data.features=MS", "--data.lookback=24"]),
        (ETTh1DataModule, [f"--data.data_dir={tmp_path}", "--data.features=S", "--data.lookback=24"]),
    ]:
        parser = jsonargparse.ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "data")
        dm = parser.instantiate(parser.parse_args(args)).data
        assert isinstance(dm, cls) and dm.lookback == 24 and dm.hparams["lookback"] == 24
        assert dm.features in {"MS", "S"}
    with pytest.raises(Exception):
        parser.parse_args(["--data.features=X"])
