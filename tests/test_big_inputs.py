"""Big inputs: the --quick pass of benchmarks/big_inputs.py, and the loading path that keeps memory low.

The quick pass writes Traffic- and ECL-shaped files (862 and 321 channels, a few thousand rows) and
trains a few batches on each in a subprocess; the bounds are generous (shared, noisy machines) but
would catch materialised windows (over 100x the raw array here) or a return of extra full copies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules import TimeSeriesDataModule

ROOT = Path(__file__).resolve().parents[1]


def test_big_inputs_quick_pass(tmp_path: Path) -> None:
    out = tmp_path / "big_inputs.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "big_inputs.py"), "--quick", "--out", str(out)],
                   check=True, cwd=ROOT, timeout=600, capture_output=True)
    summary = json.loads(out.read_text())
    records = {r["dataset"]: r for r in summary["records"]}
    assert set(records) == {"Traffic", "ECL"}
    assert (records["Traffic"]["channels"], records["ECL"]["channels"]) == (862, 321)
    for record in records.values():
        raw = record["raw_array_mb"]
        assert raw == record["rows"] * record["channels"] * 4 / 2**20  # one float32 array
        # Materialising the training windows would cost more than 100x the raw array.
        assert record["materialised_train_windows_gb"] * 1024 > 100 * raw
        # Loading: the parsed frame, one float64 copy and the float32 array (plus allocator noise).
        assert record["load_increment_over_raw"] < 12
        assert record["peak_rss_mb"] - record["baseline_rss_mb"] < 30 * raw + 300  # + the Trainer and a tiny model
        assert record["resident_data_mb"] < 4 * raw + 40
        assert np.isfinite(record["train_loss"])


def test_scaling_in_row_slices_gives_the_whole_array_result() -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((10_000, 5)) * [1, 10, 100, 1e3, 1e4] + [0, 5, -5, 50, 500]
    frame = pd.DataFrame(values, columns=[f"c{i}" for i in range(5)])
    frame.insert(0, "date", pd.date_range("2020-01-01", periods=len(frame), freq="h"))
    datamodule = TimeSeriesDataModule(df=frame, lookback=24, horizon=12)
    datamodule.setup()
    expected = ((values - datamodule.scaler_mean) / datamodule.scaler_std).astype(np.float32)
    assert datamodule.data.dtype == np.float32 and datamodule.data.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(datamodule.data, expected)
    # The caller's frame is left as it was.
    np.testing.assert_array_equal(frame.iloc[:, 1:].to_numpy(), values)
