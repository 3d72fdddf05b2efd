"""DataModules for the long-horizon forecasting benchmarks, with their standard splits.

The protocol is Time-Series-Library's (Informer / Autoformer lineage):

* ETTh1, ETTh2 (hourly): train [0, 8640), val [8640 - L, 11520), test [11520 - L, 14400),
  i.e. 12, 4 and 4 months of 30 days; rows after 14400 are not used.
* ETTm1, ETTm2 (15 minutes): the same borders times 4.
* ECL (electricity), Traffic, Weather: 70 / 10 / 20 %: ``n_train = int(N * 0.7)``,
  ``n_test = int(N * 0.2)``, val gets the rest; val starts at ``n_train - L``, test at
  ``N - n_test - L``.

Files are looked for as ``<data_dir>/<file>`` or ``<data_dir>/<subfolder>/<file>``
(``ETT-small/``, ``electricity/``, ``traffic/``, ``weather/``), so both a flat cache
and the usual ``dataset/`` layout work. See :mod:`datamodules.download` for where
``data_dir`` defaults to and how downloads are configured.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import pandas as pd

from .base import Features, FillMethod, _WindowDataModule, read_csv
from .download import (
    DATA_URL_ENV,
    DEFAULT_TIMEOUT,
    SHA256,
    ChecksumError,
    DownloadError,
    download_file,
    resolve_data_dir,
    resolve_url,
    sha256sum,
)

__all__ = [
    "BENCHMARKS",
    "BenchmarkDataModule",
    "ECLDataModule",
    "ETTh1DataModule",
    "ETTh2DataModule",
    "ETTm1DataModule",
    "ETTm2DataModule",
    "ElectricityDataModule",
    "TrafficDataModule",
    "WeatherDataModule",
    "get_datamodule",
]

log = logging.getLogger(__name__)

_ETT_HOUR_BORDERS = (12 * 30 * 24, 16 * 30 * 24, 20 * 30 * 24)  # 8640, 11520, 14400
_ETT_MINUTE_BORDERS = (4 * 12 * 30 * 24, 4 * 16 * 30 * 24, 4 * 20 * 30 * 24)  # 34560, 46080, 57600


class BenchmarkDataModule(_WindowDataModule):
    """A named benchmark file with its standard split (subclasses set the class attributes).

    Args:
        data_dir: folder holding the file (default: $TITANS_TS_DATA, else the user cache
            ``$XDG_CACHE_HOME/titans-ts`` or ``~/.cache/titans-ts``).
        lookback: L, input length.
        horizon: H, forecast length.
        features: 'M' (all -> all), 'S' (target -> target) or 'MS' (all -> target).
        target: column to forecast (the benchmarks use 'OT').
        batch_size: batch size of all loaders.
        num_workers: DataLoader workers.
        scale: standardize with the training statistics (metrics in the literature are on scaled data).
        time_features: add calendar features (x_mark, y_mark) to each item.
        freq: frequency for the calendar features (default: the dataset's real one).
        fill_method: repair NaN/inf with 'ffill' or 'interpolate' (``None``: refuse them).
        drop_last: drop the last partial training batch.
        pin_memory: DataLoader ``pin_memory``.
        download: fetch the file when it is missing.
        url: download URL overriding $TITANS_TS_DATA_URL and :data:`datamodules.download.URLS`.
        sha256: expected sha256 (overrides the known one); always enforced, also on an existing file.
    """

    #: Dataset name, the key in :data:`~datamodules.download.URLS` and :data:`~datamodules.download.SHA256`.
    name: ClassVar[str]
    file_name: ClassVar[str]
    #: Folder the file sits in in the common layout (e.g. ``ETT-small``).
    subdir: ClassVar[str]
    #: Real sampling frequency (pandas alias).
    native_freq: ClassVar[str]
    #: Fixed (train_end, val_end, test_end) rows, or ``None`` for the 70/10/20 split.
    protocol_borders: ClassVar[tuple[int, int, int] | None] = None
    #: The protocols count rows, and some published files have a few missing time steps (Weather).
    allow_irregular: ClassVar[bool] = True

    def __init__(
        self,
        data_dir: str | None = None,
        lookback: int = 96,
        horizon: int = 96,
        features: Features = "M",
        target: str = "OT",
        batch_size: int = 32,
        num_workers: int = 0,
        scale: bool = True,
        time_features: bool = False,
        freq: str | None = None,
        fill_method: FillMethod | None = None,
        drop_last: bool = False,
        pin_memory: bool = False,
        download: bool = False,
        url: str | None = None,
        sha256: str | None = None,
    ) -> None:
        super().__init__(
            lookback=lookback, horizon=horizon, features=features, target=target, date_column="date",
            batch_size=batch_size, num_workers=num_workers, scale=scale, time_features=time_features,
            freq=freq if freq is not None else self.native_freq, fill_method=fill_method,
            drop_last=drop_last, pin_memory=pin_memory,
        )
        self.save_hyperparameters()
        self.data_dir = resolve_data_dir(data_dir)
        self.download = download
        self.url = url
        self.sha256 = sha256.strip().lower() if sha256 else None
        self.download_timeout = DEFAULT_TIMEOUT
        self._path: Path | None = None

    # -- locating / fetching ------------------------------------------------------------

    @property
    def expected_path(self) -> Path:
        """Where the file is expected (and downloaded to): ``data_dir / file_name``."""
        return self.data_dir / self.file_name

    @property
    def candidate_paths(self) -> list[Path]:
        """Places searched, in order."""
        return [self.expected_path, self.data_dir / self.subdir / self.file_name]

    def find_file(self) -> Path | None:
        """The first existing candidate path, or ``None``."""
        return next((p for p in self.candidate_paths if p.is_file()), None)

    @property
    def path(self) -> Path:
        """The data file, located (and downloaded if allowed) on first use."""
        if self._path is None:
            self._path = self._locate()
        return self._path

    def _locate(self) -> Path:
        found = self.find_file()
        if found is None:
            if not self.download:
                raise FileNotFoundError(
                    f"{self.name} data not found: put {self.file_name} at {self.expected_path.resolve()} "
                    f"(or {(self.data_dir / self.subdir / self.file_name).resolve()}), pass data_dir=<folder "
                    f"holding it>, or pass download=True"
                )
            return self._download()
        if self.sha256 is not None:
            actual = sha256sum(found)
            if actual != self.sha256:
                raise ChecksumError(
                    f"{found} has sha256 {actual}, expected {self.sha256}; replace it with the right file "
                    f"or pass the matching sha256"
                )
        return found

    def _download(self) -> Path:
        dest = self.expected_path.resolve()
        url = resolve_url(self.name, self.file_name, self.url)
        if url is None:
            raise DownloadError(
                f"no download URL is known for {self.name} (it is distributed as the Autoformer / "
                f"Time-Series-Library Google Drive bundle): put {self.file_name} at {dest}, or pass url=... "
                f"or set ${DATA_URL_ENV} to a folder URL that serves it"
            )
        sha256 = self.sha256 or SHA256.get(self.name)
        log.info("Downloading %s from %s to %s", self.name, url, dest)
        try:
            return download_file(url, dest, sha256=sha256, timeout=self.download_timeout)
        except DownloadError as exc:
            # Re-raise with the dataset's name; the message already names the expected path.
            raise type(exc)(f"{self.name}: {exc}") from exc

    # -- hooks -------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download the file if needed and allowed (Lightning runs this on one process only)."""
        if self._path is None:
            self._path = self._locate()

    def _read_frame(self) -> pd.DataFrame:
        return read_csv(self.path)

    def _describe(self) -> str:
        return f"{self.name} ({self.path})"

    def _split_ends(self, n_rows: int) -> tuple[int, int, int]:
        if self.protocol_borders is not None:
            return self.protocol_borders
        n_train = int(n_rows * 0.7)
        n_test = int(n_rows * 0.2)
        return n_train, n_rows - n_test, n_rows


class ETTh1DataModule(BenchmarkDataModule):
    """ETTh1: hourly electricity-transformer data, 7 channels (target OT), 12/4/4-month split."""

    name = "ETTh1"
    file_name = "ETTh1.csv"
    subdir = "ETT-small"
    native_freq = "h"
    protocol_borders = _ETT_HOUR_BORDERS


class ETTh2DataModule(BenchmarkDataModule):
    """ETTh2: hourly electricity-transformer data, 7 channels (target OT), 12/4/4-month split."""

    name = "ETTh2"
    file_name = "ETTh2.csv"
    subdir = "ETT-small"
    native_freq = "h"
    protocol_borders = _ETT_HOUR_BORDERS


class ETTm1DataModule(BenchmarkDataModule):
    """ETTm1: 15-minute electricity-transformer data, 7 channels (target OT), 12/4/4-month split."""

    name = "ETTm1"
    file_name = "ETTm1.csv"
    subdir = "ETT-small"
    native_freq = "15min"
    protocol_borders = _ETT_MINUTE_BORDERS


class ETTm2DataModule(BenchmarkDataModule):
    """ETTm2: 15-minute electricity-transformer data, 7 channels (target OT), 12/4/4-month split."""

    name = "ETTm2"
    file_name = "ETTm2.csv"
    subdir = "ETT-small"
    native_freq = "15min"
    protocol_borders = _ETT_MINUTE_BORDERS


class ECLDataModule(BenchmarkDataModule):
    """ECL (electricity): hourly consumption of 321 clients (target OT), 70/10/20 split."""

    name = "ECL"
    file_name = "electricity.csv"
    subdir = "electricity"
    native_freq = "h"


class TrafficDataModule(BenchmarkDataModule):
    """Traffic: hourly occupancy of 862 road sensors (target OT), 70/10/20 split."""

    name = "Traffic"
    file_name = "traffic.csv"
    subdir = "traffic"
    native_freq = "h"


class WeatherDataModule(BenchmarkDataModule):
    """Weather: 21 meteorological indicators every 10 minutes (target OT), 70/10/20 split."""

    name = "Weather"
    file_name = "weather.csv"
    subdir = "weather"
    native_freq = "10min"


ElectricityDataModule = ECLDataModule

#: Benchmark name -> DataModule class.
BENCHMARKS: dict[str, type[BenchmarkDataModule]] = {
    cls.name: cls
    for cls in (ETTh1DataModule, ETTh2DataModule, ETTm1DataModule, ETTm2DataModule,
                ECLDataModule, TrafficDataModule, WeatherDataModule)
}


def get_datamodule(name: str, **kwargs: object) -> BenchmarkDataModule:
    """Build the DataModule of benchmark ``name`` (case-insensitive; 'electricity' is ECL)."""
    lookup = {k.lower(): v for k, v in BENCHMARKS.items()} | {"electricity": ECLDataModule}
    try:
        cls = lookup[name.lower()]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}") from None
    return cls(**kwargs)  # type: ignore[arg-type]
