"""Big inputs: peak memory of training on Traffic- and ECL-shaped files, against the raw array.

Writes synthetic CSVs in the real schema of the two widest long-horizon benchmarks (``date``,
then channels ``0``, ``1``, ..., and ``OT`` last) into a temporary folder:

* Traffic: 17,544 hourly rows x 862 channels (occupancy rates in [0, 1), four decimals);
* ECL (electricity.csv): 26,304 hourly rows x 321 channels (consumption, one decimal);

then, per dataset and in a fresh subprocess, builds the benchmark's DataModule
(``TrafficDataModule`` / ``ECLDataModule``), loads it and trains a tiny MAC model for a few
batches. The child reports its peak resident set size (``ru_maxrss``) after the imports (the
baseline: Python, torch, Lightning), after loading the data, and at the end. Figures are set
against the raw array (rows x channels float32, what every window is a view of) and against what
materialising the training windows would take.

    .venv/bin/python benchmarks/big_inputs.py            # ~1.5 min on 2 shared cores; writes results/big_inputs.json
    .venv/bin/python benchmarks/big_inputs.py --quick    # smaller files (a smoke pass, ~30 s)

Measured run time of the full pass: see ``run_time_s`` in the results (about 90 s here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "big_inputs.json"
LOOKBACK, HORIZON = 96, 96


@dataclass(frozen=True)
class Shape:
    """A benchmark file's shape and schema."""

    name: str  # the DataModule's name: Traffic or ECL
    file: str  # where the DataModule looks: <data_dir>/<file>
    rows: int
    channels: int  # including OT
    start: str  # first timestamp of the real file
    decimals: int
    scale: float  # typical magnitude of the values


FULL = (
    Shape("Traffic", "traffic.csv", 17_544, 862, "2016-07-01 02:00:00", 4, 0.05),
    Shape("ECL", "electricity.csv", 26_304, 321, "2016-07-01 02:00:00", 1, 1000.0),
)
QUICK = (
    Shape("Traffic", "traffic.csv", 3_000, 862, "2016-07-01 02:00:00", 4, 0.05),
    Shape("ECL", "electricity.csv", 4_000, 321, "2016-07-01 02:00:00", 1, 1000.0),
)


def max_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> float:
    """Resident set size now (Linux /proc; the peak where that is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return max_rss_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_csv(shape: Shape, folder: Path, seed: int = 0) -> Path:
    """A file in the real schema: daily and weekly cycles plus noise, non-negative, rounded like the real data."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    t = np.arange(shape.rows, dtype=np.float32)[:, None]
    phase = rng.uniform(0, 2 * np.pi, shape.channels).astype(np.float32)
    level = rng.uniform(0.5, 1.5, shape.channels).astype(np.float32)
    values = level * (1 + 0.5 * np.sin(2 * np.pi * t / 24 + phase) + 0.2 * np.sin(2 * np.pi * t / 168))
    values += 0.1 * rng.standard_normal(values.shape, dtype=np.float32)
    values = np.abs(values) * shape.scale
    columns = [str(i) for i in range(shape.channels - 1)] + ["OT"]
    frame = pd.DataFrame(values, columns=columns)
    frame.insert(0, "date", pd.date_range(shape.start, periods=shape.rows, freq="h").strftime("%Y-%m-%d %H:%M:%S"))
    path = folder / shape.file
    frame.to_csv(path, index=False, float_format=f"%.{shape.decimals}f")
    return path


def child(name: str, data_dir: str, batches: int, batch_size: int) -> dict[str, float]:
    """Load one dataset and train a few batches; returns the memory figures (run in a fresh process)."""
    import lightning.pytorch as pl
    import torch

    from datamodules import get_datamodule
    from forecasters import TitansForecastingModule

    torch.set_num_threads(1)
    baseline, resident_before = max_rss_mb(), resident_mb()
    started = time.perf_counter()
    datamodule = get_datamodule(name, data_dir=data_dir, lookback=LOOKBACK, horizon=HORIZON, batch_size=batch_size)
    datamodule.setup("fit")
    load_s = time.perf_counter() - started
    after_load, resident_after = max_rss_mb(), resident_mb()
    module = TitansForecastingModule(
        n_channels=datamodule.n_channels, lookback=LOOKBACK, horizon=HORIZON, variant="mac", dim=8, n_layers=1,
        heads=2, memory_depth=1, chunk_size=4, segment_len=4,
    )
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=batches, limit_val_batches=2, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        devices=1,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_s = time.perf_counter() - started
    data = datamodule.data
    n_train = len(datamodule.train_dataset)
    return {
        "rows": int(data.shape[0]), "channels": int(data.shape[1]),
        "raw_array_mb": data.nbytes / 2**20,
        "materialised_train_windows_gb": n_train * (LOOKBACK + HORIZON) * data.shape[1] * 4 / 2**30,
        "train_windows": n_train,
        "baseline_rss_mb": baseline, "after_load_rss_mb": after_load, "peak_rss_mb": max_rss_mb(),
        # What the loaded data keeps resident (the array, dates, scaler), once the loading temporaries are gone.
        "resident_data_mb": resident_after - resident_before,
        "load_s": load_s, "train_s": train_s, "train_batches": batches, "batch_size": batch_size,
        "train_loss": float(trainer.callback_metrics["train_loss_epoch"]),
    }


def measure(shape: Shape, folder: Path, batches: int, batch_size: int) -> dict[str, float]:
    """Write the file, run the child on it, add the ratios."""
    started = time.perf_counter()
    path = write_csv(shape, folder)
    write_s = time.perf_counter() - started
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                          os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", shape.name, str(folder), str(batches), str(batch_size)],
        capture_output=True, text=True, env=env, cwd=folder, timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{shape.name} child failed:\n{proc.stderr[-4000:]}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    raw = record["raw_array_mb"]
    record |= {
        "dataset": shape.name, "csv_mb": path.stat().st_size / 2**20, "write_csv_s": write_s,
        # Memory the data costs the process, as a multiple of the array every window is a view of.
        "load_increment_over_raw": (record["after_load_rss_mb"] - record["baseline_rss_mb"]) / raw,
        "peak_increment_over_raw": (record["peak_rss_mb"] - record["baseline_rss_mb"]) / raw,
        "peak_over_raw": record["peak_rss_mb"] / raw,
        "resident_data_over_raw": record["resident_data_mb"] / raw,
    }
    path.unlink()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller files (a smoke pass)")
    parser.add_argument("--out", type=Path, default=None, help=f"results JSON (default: {RESULTS.relative_to(ROOT)}, "
                                                             "or a temporary file with --quick)")
    parser.add_argument("--batches", type=int, default=4, help="training batches per dataset (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=4, help="windows per batch (default: %(default)s)")
    parser.add_argument("--child", nargs=4, metavar=("NAME", "DATA_DIR", "BATCHES", "BATCH_SIZE"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        name, data_dir, batches, batch_size = opts.child
        print(json.dumps(child(name, data_dir, int(batches), int(batch_size))))
        return 0

    out = opts.out or (Path(tempfile.gettempdir()) / "big_inputs_quick.json" if opts.quick else RESULTS)
    started = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory(prefix="titans-big-") as tmp:
        for shape in QUICK if opts.quick else FULL:
            record = measure(shape, Path(tmp), opts.batches, opts.batch_size)
            records.append(record)
            print(f"{shape.name}: {record['rows']} x {record['channels']}, raw array {record['raw_array_mb']:.1f} MB "
                  f"(CSV {record['csv_mb']:.0f} MB; materialised training windows would be "
                  f"{record['materialised_train_windows_gb']:.1f} GB); RSS baseline {record['baseline_rss_mb']:.0f} MB, "
                  f"after load {record['after_load_rss_mb']:.0f} MB, peak {record['peak_rss_mb']:.0f} MB: the data "
                  f"costs {record['load_increment_over_raw']:.2f}x the raw array to load, "
                  f"{record['peak_increment_over_raw']:.2f}x at the peak and keeps "
                  f"{record['resident_data_over_raw']:.2f}x resident", flush=True)
    summary = {
        "quick": opts.quick, "run_time_s": round(time.perf_counter() - started, 1),
        "lookback": LOOKBACK, "horizon": HORIZON,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "records": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"Results written to {out} ({summary['run_time_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
