"""Lightning DataModules for long-horizon forecasting benchmarks and any DataFrame.

>>> dm = ETTh1DataModule(data_dir="../shared/data", lookback=96, horizon=96, batch_size=32)
>>> dm.setup()
>>> x, y = dm.train_dataset[0]          # float32 [96, 7] and [96, 7]
"""

from .base import FEATURE_MODES, FILL_METHODS, TimeSeriesDataModule, WindowDataset, read_csv
from .benchmarks import (
    BENCHMARKS,
    BenchmarkDataModule,
    ECLDataModule,
    ElectricityDataModule,
    ETTh1DataModule,
    ETTh2DataModule,
    ETTm1DataModule,
    ETTm2DataModule,
    TrafficDataModule,
    WeatherDataModule,
    get_datamodule,
)
from .download import (
    DATA_DIR_ENV,
    DATA_URL_ENV,
    SHA256,
    URLS,
    ChecksumError,
    DownloadError,
    default_data_dir,
    download_file,
    sha256sum,
)
from .time_features import infer_freq, time_feature_names, time_features

__all__ = [
    "BENCHMARKS",
    "DATA_DIR_ENV",
    "DATA_URL_ENV",
    "FEATURE_MODES",
    "FILL_METHODS",
    "SHA256",
    "URLS",
    "BenchmarkDataModule",
    "ChecksumError",
    "DownloadError",
    "ECLDataModule",
    "ETTh1DataModule",
    "ETTh2DataModule",
    "ETTm1DataModule",
    "ETTm2DataModule",
    "ElectricityDataModule",
    "TimeSeriesDataModule",
    "TrafficDataModule",
    "WeatherDataModule",
    "WindowDataset",
    "default_data_dir",
    "download_file",
    "get_datamodule",
    "infer_freq",
    "read_csv",
    "sha256sum",
    "time_feature_names",
    "time_features",
]
