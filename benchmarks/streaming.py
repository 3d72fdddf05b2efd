"""Streaming with the sktime forecaster: the cost of update + predict per new observation as a stream
grows to 100,000 steps, and the accuracy of memory carried across windows against a memory reset at
each window (same trained model), on the ETTh1 and ETTh2 test splits.

    .venv/bin/python benchmarks/streaming.py                 # full run: 5.4 min (load 2); 31 min on a loaded machine
    .venv/bin/python benchmarks/streaming.py --quick --out /tmp/st.json   # smoke pass, ~20 s
    .venv/bin/python benchmarks/streaming.py --lookback 384 --forecast_window 96 --stream_length 10000 \
        --out benchmarks/results/streaming_forecast_window.json    # trained on carried states: 3 windows read first

The product's streaming path is :class:`TitansForecaster`: ``update(y_new, update_params=False)``
appends observations and advances the memory states over every newly completed window of
``lookback`` values (no gradient step on the trained weights); ``predict()`` forecasts the next H
values from the last ``lookback`` values and the carried states. One step of a stream is one
``predict()`` followed by ``update(one new row)``.

Per dataset, one forecaster (MAC, L=96, H=96; size and budget in ``settings`` of the JSON) is fitted
on the protocol's train + val rows (val for early stopping), the data standardised with the
train-split statistics as in the accuracy benchmark, so errors are in the literature's units.

(a) Cost (ETTh1 forecaster): the stream continues past the end of val with the ETTh1 series
    repeated to 100,000 new steps. At ``--buckets`` positions along it (0, 10k, ..., 100k) the
    per-step time of ``--bucket_steps`` consecutive steps is measured; between buckets the stream
    is advanced by one ``update`` call with all the rows in between (the memory still reads every
    window of them). A least-squares line through the bucket medians gives the drift over 100k
    steps; with a fixed-size memory state it should be flat. The resident memory of the process
    is recorded per bucket too.
(b) Accuracy: walking through the test split step by step, every forecast whose H targets lie in
    the test split is scored (the standard protocol's windows): once with the carried memory
    (``carry_memory=True``, the default) and once with the same fitted forecaster resetting the
    memory at every window (``carry_memory=False``: every forecast starts from the fresh memory,
    as in training).

Writes ``benchmarks/results/streaming.json`` and ``streaming.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DATA_MODULES = {"etth1": "ETTh1DataModule", "etth2": "ETTh2DataModule"}


def protocol_splits(dataset: str, data_dir: Path, lookback: int, horizon: int) -> tuple[np.ndarray, int, int]:
    """The standardised series (train-split statistics) up to the end of test, and where val and test start."""
    import datamodules

    dm = getattr(datamodules, DATA_MODULES[dataset])(data_dir=str(data_dir), lookback=lookback, horizon=horizon)
    dm.setup()
    train, val, test = dm.train_dataset.data, dm.val_dataset.data, dm.test_dataset.data
    # val and test windows start `lookback` rows before their part: drop that overlap to rebuild the series
    series = np.concatenate([train, val[lookback:], test[lookback:]]).astype(np.float64)
    return series, len(train), len(train) + len(val) - lookback


def frame(values: np.ndarray, start: int) -> Any:
    """Rows of a stream as a DataFrame whose integer index is the time step."""
    import pandas as pd

    return pd.DataFrame(values, index=pd.RangeIndex(start, start + len(values)))


def build_forecaster(args: argparse.Namespace, validation_size: int) -> Any:
    """The unfitted TitansForecaster the command line describes."""
    from titans_ts import TitansForecaster

    return TitansForecaster(
        variant=args.variant, lookback=args.lookback, dim=args.dim, n_layers=args.n_layers, heads=args.heads,
        chunk_size=args.chunk_size, max_epochs=args.max_epochs,
        model_kwargs={"segment_len": args.segment_len, "forecast_window": args.forecast_window,
                      "forget_bias": args.forget_bias},
        validation_size=validation_size, random_state=0,
    )


def fit_forecaster(series: np.ndarray, val_start: int, test_start: int, args: argparse.Namespace) -> Any:
    """A TitansForecaster fitted on rows [fit_from, test_start), the val part (or its last `val_rows`) held
    out for early stopping."""
    fit_from = max(0, test_start - args.fit_rows) if args.fit_rows else 0
    forecaster = build_forecaster(args, validation_size=args.val_rows or test_start - val_start)
    return forecaster.fit(frame(series[fit_from:test_start], fit_from), fh=list(range(1, args.horizon + 1)))


def step(forecaster: Any, row: Any) -> np.ndarray:
    """One streaming step: forecast the next H values, then feed the new observation to the memory."""
    forecast = forecaster.predict().to_numpy()
    forecaster.update(row, update_params=False)
    return forecast


def score_test_windows(forecaster: Any, series: np.ndarray, test_start: int, horizon: int, max_windows: int | None,
                  carry_memory: bool) -> dict[str, Any]:
    """MSE / MAE over the test windows, walking the stream step by step from the start of test."""
    forecaster = copy.deepcopy(forecaster)  # every mode starts from the same fitted state
    # Set on the fitted object directly (set_params would reset the fit): same weights, other memory policy.
    forecaster.carry_memory = carry_memory
    n_windows = len(series) - test_start - horizon + 1
    n_windows = min(n_windows, max_windows) if max_windows else n_windows
    squared, absolute, seconds = [], [], []
    for i in range(n_windows):
        t = test_start + i
        started = time.perf_counter()
        forecast = step(forecaster, frame(series[t : t + 1], t))
        seconds.append(time.perf_counter() - started)
        error = forecast - series[t : t + horizon]
        squared.append(np.mean(error**2))
        absolute.append(np.mean(np.abs(error)))
    return {"carry_memory": carry_memory, "test_mse": float(np.mean(squared)), "test_mae": float(np.mean(absolute)),
            "n_test_windows": n_windows, "ms_per_step": 1000 * statistics.median(seconds)}


def resident_mb() -> float:
    """The process's resident memory now (not its peak), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def stream_cost(forecaster: Any, series: np.ndarray, test_start: int, args: argparse.Namespace) -> dict[str, Any]:
    """Per-step cost of predict + update at `buckets` positions of a stream of `stream_length` new steps."""
    forecaster = copy.deepcopy(forecaster)
    cycle = series[test_start:] if len(series) - test_start > args.lookback else series
    values = np.resize(cycle, (args.stream_length + args.bucket_steps, series.shape[1]))  # the series, repeated
    positions = np.linspace(0, args.stream_length, args.buckets).astype(int)
    buckets, fed = [], 0
    for position in positions:
        if position > fed:  # advance the stream in one call; the memory reads every window on the way
            forecaster.update(frame(values[fed:position], test_start + fed), update_params=False)
            fed = position
        times = []
        for _ in range(args.bucket_steps):
            started = time.perf_counter()
            step(forecaster, frame(values[fed : fed + 1], test_start + fed))
            times.append(1000 * (time.perf_counter() - started))
            fed += 1
        buckets.append({"position": int(position), "ms_median": statistics.median(times), "ms_mean": statistics.fmean(times),
                        "ms_p90": float(np.percentile(times, 90)), "resident_mb": resident_mb(),
                        "load_avg": round(os.getloadavg()[0], 2)})
        print(f"  step {position:>7}: {buckets[-1]['ms_median']:7.2f} ms median, {buckets[-1]['resident_mb']:.0f} MB", flush=True)
    x = np.array([b["position"] for b in buckets], dtype=float)
    y = np.array([b["ms_median"] for b in buckets])
    slope, intercept = np.polyfit(x, y, 1)
    return {"buckets": buckets, "steps_fed": int(fed), "slope_ms_per_100k_steps": float(slope * 1e5),
            "intercept_ms": float(intercept),
            "drift_over_stream": float(slope * args.stream_length / y.mean()),
            "resident_mb_change": buckets[-1]["resident_mb"] - buckets[0]["resident_mb"]}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_cost, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    buckets = result["cost"]["buckets"]
    x = [b["position"] for b in buckets]
    ax_cost.plot(x, [b["ms_median"] for b in buckets], "o-", label="median")
    ax_cost.plot(x, [b["ms_p90"] for b in buckets], "x--", label="90th percentile")
    ax_cost.set(xlabel="steps into the stream", ylabel="ms per update + predict", title="cost per new observation",
                ylim=(0, None))
    ax_cost.legend()
    datasets = list(result["accuracy"])
    width = 0.38
    for k, carry in enumerate((True, False)):
        mse = [next(r["test_mse"] for r in result["accuracy"][d] if r["carry_memory"] is carry) for d in datasets]
        ax_acc.bar(np.arange(len(datasets)) + (k - 0.5) * width, mse, width,
                   label="memory carried" if carry else "memory reset each window")
    ax_acc.set(xticks=range(len(datasets)), xticklabels=[d.upper() for d in datasets], ylabel="test MSE (scaled)",
               title=f"H={result['settings']['horizon']}, same fitted model")
    ax_acc.legend()
    for ax in (ax_cost, ax_acc):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke pass: ETTh1, a fit on 800 rows, 1,000 steps, 30 windows")
    parser.add_argument("--datasets", nargs="+", default=list(DATA_MODULES), choices=list(DATA_MODULES))
    parser.add_argument("--variant", default="mac")
    parser.add_argument("--lookback", type=int, default=96)
    parser.add_argument("--horizon", type=int, default=96)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--n_layers", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--chunk_size", type=int, default=4)
    parser.add_argument("--segment_len", type=int, default=4)
    parser.add_argument("--max_epochs", type=int, default=4)
    parser.add_argument("--forecast_window", type=int, default=None,
                        help="train the memory on a longer past than the head sees: --lookback 384 --forecast_window 96 "
                             "reads 3 windows into the memory before the one forecast from (default: off)")
    parser.add_argument("--forget_bias", type=float, default=-6.0,
                        help="the forgetting gate's initial logit (the model's default -6.0; -3 forgets 4.7%% a token "
                             "at the start, so a carried state can settle)")
    parser.add_argument("--fit_rows", type=int, default=0, help="fit on only the last rows before test (0: all)")
    parser.add_argument("--val_rows", type=int, default=0, help="validate on only the last rows of val (0: all)")
    parser.add_argument("--stream_length", type=int, default=100_000)
    parser.add_argument("--buckets", type=int, default=11)
    parser.add_argument("--bucket_steps", type=int, default=200)
    parser.add_argument("--max_windows", type=int, default=0, help="score only the first test windows (0: all)")
    parser.add_argument("--data_dir", type=Path, default=Path(os.environ.get("TITANS_TS_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=RESULTS / "streaming.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.dim, args.max_epochs, args.fit_rows, args.val_rows = ["etth1"], 16, 1, 800, 300
        args.stream_length, args.buckets, args.bucket_steps, args.max_windows = 1000, 3, 10, 30
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    import torch

    result: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "torch_threads": torch.get_num_threads(), "accuracy": {}}
    result["settings"].pop("out")
    for dataset in args.datasets:
        series, val_start, test_start = protocol_splits(dataset, args.data_dir, args.lookback, args.horizon)
        fit_started = time.time()
        forecaster = fit_forecaster(series, val_start, test_start, args)
        fit_seconds = round(time.time() - fit_started, 1)
        print(f"{dataset}: fitted in {fit_seconds:.0f} s ({forecaster.n_epochs_} epochs)", flush=True)
        result["accuracy"][dataset] = [
            {**score_test_windows(forecaster, series, test_start, args.horizon, args.max_windows, carry),
             "fit_seconds": fit_seconds, "epochs": forecaster.n_epochs_,
             "best_val_loss": forecaster.best_val_loss_}
            for carry in (True, False)
        ]
        for r in result["accuracy"][dataset]:
            print(f"  carry_memory={r['carry_memory']}: test_mse={r['test_mse']:.4f} test_mae={r['test_mae']:.4f} "
                  f"({r['n_test_windows']} windows, {r['ms_per_step']:.1f} ms/step)", flush=True)
        if dataset == args.datasets[0]:
            print(f"{dataset}: cost along a stream of {args.stream_length} steps", flush=True)
            result["cost"] = stream_cost(forecaster, series, test_start, args)
    result["seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    cost = result["cost"]
    print(f"drift of the per-step cost over {args.stream_length} steps: {100 * cost['drift_over_stream']:+.1f}% "
          f"(slope {cost['slope_ms_per_100k_steps']:+.2f} ms per 100k steps); resident memory "
          f"{cost['resident_mb_change']:+.0f} MB; wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
