"""Fixtures shared by the test files."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real ETTh1 when the shared data folder is there, else a synthetic file with its schema."""
    if (SHARED_DATA / "ETT-small" / "ETTh1.csv").is_file():
        return SHARED_DATA
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    t = np.arange(14400)
    values = np.sin(2 * np.pi * t[:, None] / 24 + np.arange(7)) + 0.1 * rng.standard_normal((14400, 7))
    frame = pd.DataFrame(values, columns=["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"])
    frame.insert(0, "date", pd.date_range("2016-07-01", periods=14400, freq="h").strftime("%Y-%m-%d %H:%M:%S"))
    frame.to_csv(folder / "ETTh1.csv", index=False)
    return folder
