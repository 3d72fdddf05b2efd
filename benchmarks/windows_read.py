"""Why a memory that has read more of the past forecasts worse: test error against the number of
windows the memory has read before the window it forecasts from, and how far its state has moved.

    .venv/bin/python benchmarks/windows_read.py --runs benchmarks/results/windows_read_runs.json \
        benchmarks/results/studies/forecast_window_96.json --horizons 96 --windows_read 0 1 2 3 7 15 31
        # 4 models, 38 min at load 3 (about 9 s per pass over the 2,785 test windows; k costs k + 1 passes)
    .venv/bin/python benchmarks/windows_read.py --quick --runs RECORDS --workdir DIR  # smoke pass, ~5 s

Streaming (``benchmarks/streaming.py``) found that carrying the memory across windows does not pay,
even for a forecaster trained on carried states (``forecast_window``: three windows read first).
This script asks how the error depends on how much the memory has read. For each trained model (a
run of ``benchmarks/accuracy.py``: the record names its MLflow run, whose best checkpoint is
``<workdir>/checkpoints/<run id>/best-*.ckpt``) and each k in ``--windows_read``, every test window
of the protocol is forecast after the memory has read the k windows of W values (W = the model's
``forecast_window``, else its lookback) just before it, states carried from window to window as in
``TitansForecastModel`` and the sktime forecaster; k=0 is a fresh memory. The test targets are the
same for every k (the protocol's test split starts ``lookback`` rows before its part, so a longer
read only reaches further into val), so the errors compare directly.

Beside the error, the memory's state as it enters the forecast window: ``state_shift``, the
relative distance of its weights from the learned initial weights, ||W_k - W_0|| / ||W_0|| (all
memory MLP layers of all blocks, per series then averaged), and ``shift_from_trained``, the
relative distance from the state training produced, ||W_k - W_t|| / ||W_t - W_0|| with t the k
training used (0 for a plain model, ``lookback / forecast_window - 1`` for a forecast_window one).
If the error grows with k while the state keeps moving away from W_t, the network is being fed
memory states it never saw in training.

Writes ``benchmarks/results/windows_read.json`` and ``windows_read.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DATA_MODULES = {"etth1": "ETTh1DataModule", "etth2": "ETTh2DataModule"}
VARIANTS = ("mac", "mag", "mal", "lmm")


def checkpoint_of(record: dict[str, Any], workdir: Path) -> Path:
    """The best checkpoint of an accuracy run, found through its MLflow run id."""
    folder = workdir / "checkpoints" / str(record.get("mlflow_run_id"))
    found = sorted(folder.glob("best-*.ckpt"))
    if not found:
        raise SystemExit(f"no best-*.ckpt in {folder} for the {record['dataset']} {record['model']} run at "
                         f"H={record['horizon']}: pass the --workdir the accuracy run used (its checkpoints/ folder)")
    return found[-1]


def window_model(module: Any) -> Any:
    """The trained network rebuilt to read one window of W values, the weights unchanged (the head and
    the patching depend on W only, so every tensor fits)."""
    from forecasters.module import TitansForecastingModule

    hp = dict(module.hparams)
    window = hp.get("forecast_window") or hp["lookback"]
    one = TitansForecastingModule(**{**hp, "lookback": window, "forecast_window": None})
    one.load_state_dict(module.state_dict())
    return one.model.eval()


def memory_weights(states: list[Any]) -> Any:
    """All memory MLP weights of a state, one row per series: [rows, n]."""
    import torch

    return torch.cat([w.reshape(w.shape[0], -1) for state in states for w in state.weights], dim=1)


def initial_weights(net: Any) -> Any:
    """The learned initial memory weights, in the order of ``memory_weights``: [n]."""
    import torch

    from titans_ts.memory import NeuralMemory

    memories = [m for m in net.modules() if isinstance(m, NeuralMemory)]
    return torch.cat([w.reshape(-1) for m in memories for w in m.initial_weights])


class GateMeter:
    """Mean gates of each memory over the windows read while installed: the forgetting rate alpha, the
    momentum eta, the inner learning rate theta, and ``kept_per_window``, the share of the weights one
    window's forgetting leaves, prod_t (1 - alpha_t) over its tokens (how long a state lasts, in windows)."""

    def __init__(self, net: Any) -> None:
        from titans_ts.memory import NeuralMemory

        self.memories = [m for m in net.modules() if isinstance(m, NeuralMemory)]
        self.sums = [{"alpha": 0.0, "eta": 0.0, "theta": 0.0, "kept_per_window": 0.0, "tokens": 0, "windows": 0}
                     for _ in self.memories]
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.memories)]

    def _hook(self, i: int) -> Any:
        def record(memory: Any, args: tuple) -> None:
            theta, log_eta, log_keep = memory.gates(args[0])  # each [rows, heads, T]
            s = self.sums[i]
            s["theta"] += float(theta.sum())
            s["eta"] += float(log_eta.exp().sum())
            s["alpha"] += float((-log_keep.expm1()).sum())
            s["kept_per_window"] += float(log_keep.sum(-1).exp().sum())
            s["tokens"] += theta.numel()
            s["windows"] += theta[..., 0].numel()

        return record

    def remove(self) -> list[dict[str, float]]:
        for handle in self.handles:
            handle.remove()
        return [{"alpha": s["alpha"] / s["tokens"], "eta": s["eta"] / s["tokens"], "theta": s["theta"] / s["tokens"],
                 "kept_per_window": s["kept_per_window"] / s["windows"]} for s in self.sums]


def read_then_forecast(net: Any, x: Any, window: int, k: int) -> tuple[Any, list[Any] | None]:
    """Forecast from the last window of x after the memory read the k windows before it; returns
    (forecast, the states entering the last window; None for k=0)."""
    states = None
    start = x.shape[1] - (k + 1) * window
    for j in range(k):
        _, states = net(x[:, start + j * window : start + (j + 1) * window], states)
    out, _ = net(x[:, -window:], states)
    return out, states


def evaluate(record: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Test MSE / MAE and the state's shift at every k for one trained model."""
    import torch

    import datamodules
    from forecasters.module import TitansForecastingModule

    path = checkpoint_of(record, args.workdir)
    module = TitansForecastingModule.load_from_checkpoint(path, map_location="cpu")
    hp = module.hparams
    window = hp.get("forecast_window") or hp["lookback"]
    trained_k = hp["lookback"] // window - 1
    net = window_model(module)
    with torch.no_grad():
        w0 = initial_weights(net)
    ks = sorted(set(args.windows_read) | {trained_k})
    dm = getattr(datamodules, DATA_MODULES[record["dataset"]])(
        data_dir=str(args.data_dir), lookback=(max(ks) + 1) * window, horizon=hp["horizon"], batch_size=args.batch_size)
    dm.setup("test")
    loader = dm.test_dataloader()
    sums = {k: {"se": 0.0, "ae": 0.0, "n": 0, "shift": 0.0, "from_trained": 0.0, "rows": 0} for k in ks}
    windows, started, gates = 0, time.time(), []
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0].float(), batch[1].float()
            if args.max_windows:
                x, y = x[: args.max_windows - windows], y[: args.max_windows - windows]
            trained_state = None
            for k in sorted(ks, key=lambda k: k != trained_k):  # the trained k first: the others compare with it
                meter = GateMeter(net) if k == trained_k else None
                out, states = read_then_forecast(net, x, window, k)
                if meter is not None:
                    gates.append(meter.remove())
                out = module._point(out)
                weights = w0.expand(x.shape[0] * (net.n_channels if net.channel_independent else 1), -1) if states is None \
                    else memory_weights(states)
                if k == trained_k:
                    trained_state = weights
                s = sums[k]
                s["se"] += float((out - y).square().sum())
                s["ae"] += float((out - y).abs().sum())
                s["n"] += y.numel()
                s["shift"] += float(((weights - w0).norm(dim=1) / w0.norm()).sum())
                away = (trained_state - w0).norm(dim=1).clamp_min(1e-12)
                s["from_trained"] += float(((weights - trained_state).norm(dim=1) / away).sum()) if trained_k else 0.0
                s["rows"] += weights.shape[0]
            windows += x.shape[0]
            if args.max_windows and windows >= args.max_windows:
                break
    rows = [{"windows_read": k, "values_read": k * window,
             "test_mse": s["se"] / s["n"], "test_mae": s["ae"] / s["n"],
             "state_shift": s["shift"] / s["rows"],
             "shift_from_trained": s["from_trained"] / s["rows"] if trained_k else None}
            for k, s in sorted(sums.items())]
    return {"dataset": record["dataset"], "model": record["model"], "horizon": hp["horizon"],
            "lookback": hp["lookback"], "forecast_window": window, "trained_windows_read": trained_k,
            "seed": record.get("seed"), "mlflow_run_id": record.get("mlflow_run_id"), "checkpoint": path.name,
            "record_test_mse": record.get("test_mse"), "n_test_windows": windows,
            "gates": [{key: sum(g[i][key] for g in gates) / len(gates) for key in gates[0][i]} for i in range(len(gates[0]))],
            "seconds": round(time.time() - started, 1), "rows": rows}


def label(result: dict[str, Any]) -> str:
    trained = "plain" if result["trained_windows_read"] == 0 else f"trained reading {result['trained_windows_read']} first"
    return f"{result['dataset'].upper()} {result['model']} H={result['horizon']}, {trained}"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_err, ax_state) = plt.subplots(1, 2, figsize=(12, 4.2))
    for result in results:
        ks = [r["windows_read"] for r in result["rows"]]
        line, = ax_err.plot(ks, [r["test_mse"] / result["rows"][0]["test_mse"] for r in result["rows"]], "o-",
                            label=label(result), ms=3)
        trained = next(r for r in result["rows"] if r["windows_read"] == result["trained_windows_read"])
        ax_err.plot([trained["windows_read"]], [trained["test_mse"] / result["rows"][0]["test_mse"]], "s",
                    color=line.get_color(), ms=8, mfc="none")
        ax_state.plot(ks, [r["state_shift"] for r in result["rows"]], "o-", color=line.get_color(), ms=3)
    ax_err.set(xlabel="windows the memory read before the forecast window (k)",
               ylabel="test MSE / test MSE at k=0", title="error against the past read (square: what training used)")
    ax_state.set(xlabel="windows read (k)", ylabel="||W_k - W_0|| / ||W_0||",
                 title="memory weights entering the forecast window")
    for ax in (ax_err, ax_state):
        ax.set_xscale("symlog", linthresh=1)
        ax.grid(True, alpha=0.3)
    ax_err.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke pass: k in {0, 1, 2}, the first 16 test windows")
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="accuracy record files (benchmarks/accuracy.py --out); their Titans runs are evaluated")
    parser.add_argument("--datasets", nargs="+", default=list(DATA_MODULES), choices=list(DATA_MODULES))
    parser.add_argument("--models", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--horizons", nargs="+", type=int, default=[96])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--windows_read", nargs="+", type=int, default=[0, 1, 2, 3, 5, 7, 11, 15, 23, 31])
    parser.add_argument("--max_windows", type=int, default=0, help="score only the first test windows (0: all)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=ROOT, help="where the accuracy runs' checkpoints/ folder is")
    parser.add_argument("--data_dir", type=Path, default=Path(os.environ.get("TITANS_TS_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=RESULTS / "windows_read.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.windows_read, args.max_windows = [0, 1, 2], 16
    if min(args.windows_read) < 0:
        parser.error(f"--windows_read takes counts of windows >= 0, got {args.windows_read}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    records = [r for path in args.runs for r in json.loads(path.read_text())
               if r["dataset"] in args.datasets and r["model"] in args.models and r["horizon"] in args.horizons
               and r["seed"] in args.seeds]
    if not records:
        raise SystemExit(f"no run of {args.models} at H={args.horizons}, seeds {args.seeds} on {args.datasets} in "
                         f"{[str(p) for p in args.runs]}: only the Titans variants have a memory to read with")
    results = []
    for record in records:
        result = evaluate(record, args)
        results.append(result)
        print(f"{label(result)} ({result['n_test_windows']} test windows, {result['seconds']:.0f} s; the accuracy "
              f"run's test_mse {result['record_test_mse']:.4f}, at k={result['trained_windows_read']}):", flush=True)
        for r in result["rows"]:
            trained = "" if r["shift_from_trained"] is None else f", from trained {r['shift_from_trained']:.3f}"
            print(f"  k={r['windows_read']:>3}: test_mse={r['test_mse']:.4f} test_mae={r['test_mae']:.4f} "
                  f"state shift {r['state_shift']:.3f}{trained}", flush=True)
        for i, g in enumerate(result["gates"]):
            print(f"  memory {i}: alpha {g['alpha']:.4f}, kept per window {g['kept_per_window']:.3f}, eta {g['eta']:.3f}, "
                  f"theta {g['theta']:.4f}", flush=True)
        if not all(math.isfinite(r["test_mse"]) for r in result["rows"]):
            raise SystemExit(f"a non-finite test error for {label(result)}: the memory diverged on a long read")
    out = {"settings": {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k == "runs" else v)
                        for k, v in vars(args).items() if k != "out"},
           "results": results, "seconds": round(time.time() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png').name} in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
