"""Accuracy on ETTh1 and ETTh2 under the standard long-horizon protocol, against baselines trained by
the same harness, and the lookback study.

    .venv/bin/python benchmarks/accuracy.py --resume                 # the main grid (or what is left of it)
    .venv/bin/python benchmarks/accuracy.py --resume --lookback_study  # L in {96, 336, 720}: best variant, patchtst, dlinear
    .venv/bin/python benchmarks/accuracy.py --summary_only           # table and PNG from the JSON, no training
    .venv/bin/python benchmarks/accuracy.py --quick --workdir /tmp/q --out /tmp/q/acc.json   # smoke pass, ~30 s
    .venv/bin/python benchmarks/accuracy.py --resume --set model.lr=0.0001 --models lmm --horizons 336 \
        --datasets etth1 --seeds 0 --out benchmarks/results/studies/lr_0.0001.json  # a hyperparameter study

Protocol: lookback L=96, horizons H in {96, 192, 336, 720}, all 7 channels in and out, MSE and MAE
on the standardised data (train-split statistics), every test window counted (stride 1, no
dropped batch). Models: the Titans variants MAC, MAG, MAL, LMM and two baselines of the same
harness (:mod:`forecasters.baselines`): ``patchtst`` (the same patch model on a plain
transformer, ~176k parameters, like the variants' 154k-204k) and ``dlinear``. Every run is
``titans-ts fit --config configs/<dataset>/<model>.yaml`` with the horizon, lookback and seed
overridden, nothing else: the shipped configs' hyperparameters, early stopping and checkpoint
selection on ``val_mse`` (no tuning on test). Each run is logged to MLflow (experiment
``titans-ts-accuracy``; ``--tracking_uri``, default ``./mlflow.db`` in ``--workdir``).

A study of other hyperparameters passes them with ``--set KEY=VALUE`` (``titans-ts fit`` keys, e.g.
``model.lr=0.0001``), recorded in each record's ``overrides``; it goes to its own ``--out``, never
into the main grid's file, and is judged on ``best_val_mse`` only before any config changes
(``--baseline benchmarks/results/accuracy.json`` puts its runs beside the grid's in its summary;
several files may be given, e.g. the grid and the runs it retired on adopting a study).
Once a config takes a study's setting, ``--adopt STUDY`` moves the study's runs into the grid (same
code, config and seed: the same run) and the grid's runs with the old setting out to a study file
of their own, e.g.::

    .venv/bin/python benchmarks/accuracy.py --adopt benchmarks/results/studies/lr_0.0001.json --models lmm mal

Each finished run is appended to ``benchmarks/results/accuracy.json`` at once (one record per
dataset, model, lookback, horizon, seed), so an interrupted grid continues with ``--resume``;
workers with disjoint ``--models`` may fill the same file side by side (appends take a file lock).
``epoch_seconds`` is the mean wall time of the training part of an epoch (validation excluded);
the machine is shared, so each record also keeps the 1-minute load average before and after.
The summary (``accuracy_summary.md``: mean and std over seeds per horizon, the 4-horizon average
next to published figures, and the lookback study side by side), ``accuracy.png`` and
``accuracy_lookback.png`` (once a cell has run at two lookbacks) are rebuilt after every run.

Run time measured on this 2-core machine, one torch thread per worker, two workers (load about 2),
L=96, shipped learning rates (the ``fit_seconds`` of the records): DLinear 0.2-1.3 minutes per run,
PatchTST 1.5-4.3, LMM 4.4-7.8, MAG 4.5-8.6, MAC 5.4-9.5 and MAL 6.0-13.3 (4-9 epochs before early
stopping). Runs stop early on ``val_mse`` (patience 3, at most 20 epochs). The full grid (2 datasets
x 6 models x 4 horizons x 3 seeds = 144 runs) takes about 7 hours of both cores here, the lookback
study hours more: run it in pieces with ``--resume``, or on a bigger machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ("etth1", "etth2")
VARIANTS = ("mac", "mag", "mal", "lmm")
MODELS = (*VARIANTS, "patchtst", "dlinear")
#: Plot line style per model: solid for the Titans variants, one style per baseline.
LINE_STYLES = {"patchtst": "--", "dlinear": ":"}
HORIZONS = (96, 192, 336, 720)
SEEDS = (0, 1, 2)
LOOKBACKS = (96, 336, 720)
EXPERIMENT = "titans-ts-accuracy"

#: Published 4-horizon averages (MSE, MAE) at L=96 (PatchTST at L=96 from the iTransformer paper;
#: the Titans row is the paper's neural-memory model). Literature, for comparison only.
PUBLISHED: dict[str, dict[str, tuple[float, float]]] = {
    "Titans (paper)": {"etth1": (0.420, 0.421), "etth2": (0.336, 0.382)},
    "iTransformer": {"etth1": (0.454, 0.447), "etth2": (0.383, 0.407)},
    "PatchTST (L=96)": {"etth1": (0.469, 0.454), "etth2": (0.387, 0.407)},
    "DLinear": {"etth1": (0.456, 0.452), "etth2": (0.559, 0.515)},
}

#: Overrides of the smoke pass: a tiny model and a few batches, so a run takes seconds.
QUICK_OVERRIDES = [
    "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2", "--trainer.num_sanity_val_steps=0", "--model.dim=16",
    "--model.n_layers=1", "--model.heads=2",
]


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    dataset: str
    model: str
    lookback: int
    horizon: int
    seed: int

    @classmethod
    def of(cls, record: dict[str, Any]) -> Cell:
        return cls(record["dataset"], record["model"], int(record["lookback"]), int(record["horizon"]), int(record["seed"]))


def grid(datasets: list[str], models: list[str], horizons: list[int], seeds: list[int], lookbacks: list[int]) -> list[Cell]:
    """Cells in the order they are worth running: a seed's every horizon before the next seed,
    short horizons first, both datasets and all models of a horizon together."""
    return [Cell(d, m, lb, h, s) for s in seeds for lb in lookbacks for h in horizons for d in datasets for m in models]


# --- one run ------------------------------------------------------------------------------------
def code_version() -> dict[str, str]:
    """The commit and a digest of the model code as it is on disk, so a record names the code that made it
    (the tree may hold uncommitted edits while a long grid runs)."""
    import hashlib
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("titans_ts/*.py"), *ROOT.glob("forecasters/*.py")]):
        digest.update(path.read_bytes())
    return {"git_commit": commit or "unknown", "code_sha256": digest.hexdigest()[:12]}


def run_meter() -> Any:
    """A Lightning callback that times the training part of each epoch and counts the test windows."""
    from lightning.pytorch.callbacks import Callback

    class RunMeter(Callback):
        def __init__(self) -> None:
            self.epoch_seconds: list[float] = []
            self.test_windows = 0
            self._started: float | None = None

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._started = time.perf_counter()

        def _stop(self) -> None:
            if self._started is not None:
                self.epoch_seconds.append(time.perf_counter() - self._started)
                self._started = None

        # Validation runs inside the training epoch, before on_train_epoch_end: stop the clock there.
        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                self._stop()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self._stop()

        def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                              dataloader_idx: int = 0) -> None:
            self.test_windows += int(batch[0].shape[0])

    return RunMeter()


def cli_args(cell: Cell, args: argparse.Namespace) -> list[str]:
    """`titans-ts fit` arguments of a cell: the shipped config, with lookback, horizon and seed set."""
    argv = [
        "fit", "--config", str(ROOT / "configs" / cell.dataset / f"{cell.model}.yaml"),
        f"--data.init_args.data_dir={args.data_dir}", f"--data.init_args.lookback={cell.lookback}",
        f"--data.init_args.horizon={cell.horizon}", f"--seed_everything={cell.seed}",
        f"--trainer.logger.init_args.experiment_name={args.experiment}",
        # The run's metrics and config are what we compare; a model artifact per grid cell is not needed.
        "--trainer.logger.init_args.log_forecast_model=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]
    if args.tracking_uri:
        argv.append(f"--trainer.logger.init_args.tracking_uri={args.tracking_uri}")
    argv += [f"--{key}={value}" for key, value in args.overrides.items()]
    return argv + (QUICK_OVERRIDES if args.quick else [])


def run_cell(cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    """Train, test and log one cell through the CLI (in this process); return its record."""
    import torch

    from forecasters.cli import run_cli

    meter = run_meter()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        cli = run_cli(cli_args(cell, args), trainer_defaults={"callbacks": [meter]})
    fit_seconds = time.perf_counter() - started
    checkpoint = cli.trainer.checkpoint_callback
    logger = cli._mlflow_logger()
    return {
        **asdict(cell),
        "test_mse": cli.test_metrics["test_mse"],
        "test_mae": cli.test_metrics["test_mae"],
        "n_test_windows": meter.test_windows,
        "epoch_seconds": statistics.fmean(meter.epoch_seconds) if meter.epoch_seconds else None,
        "best_val_mse": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "epochs_trained": len(meter.epoch_seconds),
        "fit_seconds": round(fit_seconds, 1),
        "n_params": sum(p.numel() for p in cli.model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "mlflow_run_id": logger.run_id if logger is not None else None,
        "quick": bool(args.quick),
        "overrides": dict(args.overrides),
        **args.code_version,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# --- results ------------------------------------------------------------------------------------
def load_records(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []


def save_records(records: list[dict[str, Any]], path: Path) -> None:
    """Write atomically: an interrupted write never leaves a truncated JSON behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)


def append_record(record: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """Add one record to the file, re-read under a lock, so several workers (e.g. one per model
    group) can fill the same grid; returns all records now in the file."""
    from forecasters.tracking import folder_lock

    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path.parent):  # the folder, as the file itself is replaced on every write
        records = [r for r in load_records(path) if Cell.of(r) != Cell.of(record)] + [record]
        save_records(records, path)
    return records


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """(dataset, model, lookback, horizon) -> mean and std over seeds of test MSE/MAE, epoch seconds."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["model"], r["lookback"], r["horizon"])].append(r)
    summary = {}
    for key, rs in sorted(groups.items()):
        summary[key] = {
            "mse": mean_std([r["test_mse"] for r in rs]),
            "mae": mean_std([r["test_mae"] for r in rs]),
            "val_mse": statistics.fmean(r["best_val_mse"] for r in rs),
            "epoch_seconds": statistics.fmean(r["epoch_seconds"] for r in rs if r["epoch_seconds"]) if any(
                r["epoch_seconds"] for r in rs) else math.nan,
            "seeds": sorted(r["seed"] for r in rs),
        }
    return summary


def variant_validation(records: list[dict[str, Any]], lookback: int = 96) -> tuple[dict[str, float], int]:
    """Each Titans variant's mean best validation MSE at `lookback` over the (dataset, horizon, seed) cells
    every variant has finished, and how many such cells there are ({} and 0 while none is shared).

    Only shared cells are compared, so no variant wins by missing a hard horizon.
    """
    done = {(r["model"], r["dataset"], r["horizon"], r["seed"]): r["best_val_mse"] for r in records
            if r["lookback"] == lookback and r["model"] in VARIANTS}
    shared = set.intersection(*({k[1:] for k in done if k[0] == v} for v in VARIANTS))
    return {v: statistics.fmean(done[(v, *k)] for k in shared) for v in VARIANTS} if shared else {}, len(shared)


def best_variant(records: list[dict[str, Any]], lookback: int = 96) -> str | None:
    """The Titans variant with the lowest mean validation MSE at `lookback` (chosen on val, never test)."""
    means, _ = variant_validation(records, lookback)
    return min(means, key=means.get) if means else None


def summary_table(records: list[dict[str, Any]]) -> str:
    """Markdown: per-horizon test MSE / MAE (mean +- std over seeds), 4-horizon averages, published figures."""
    summary = summarise(records)
    lines = []
    for dataset in sorted({k[0] for k in summary}):
        for lookback in sorted({k[2] for k in summary if k[0] == dataset}):
            horizons = sorted({k[3] for k in summary if k[0] == dataset and k[2] == lookback})
            lines += [f"### {dataset.upper()}, L={lookback}: test MSE / MAE (mean ± std over the seeds listed)", "",
                      "| model | " + " | ".join(f"H={h}" for h in horizons) + " | average of 4 H | s/epoch |",
                      "| --- | " + " | ".join("---" for _ in horizons) + " | --- | --- |"]
            for model in [m for m in MODELS if any(k[:3] == (dataset, m, lookback) for k in summary)]:
                cells, means = [], []
                for h in horizons:
                    s = summary.get((dataset, model, lookback, h))
                    if s is None:
                        cells.append("—")
                        continue
                    (mse, mse_sd), (mae, mae_sd) = s["mse"], s["mae"]
                    if len(s["seeds"]) > 1:
                        cells.append(f"{mse:.3f}±{mse_sd:.3f} / {mae:.3f}±{mae_sd:.3f} (seeds {','.join(map(str, s['seeds']))})")
                    else:  # one seed has no spread to show
                        cells.append(f"{mse:.3f} / {mae:.3f} (seed {s['seeds'][0]})")
                    means.append((mse, mae))
                average = (f"{statistics.fmean(m for m, _ in means):.3f} / {statistics.fmean(a for _, a in means):.3f}"
                           if len(means) == len(HORIZONS) else "incomplete")
                seconds = [summary[(dataset, model, lookback, h)]["epoch_seconds"] for h in horizons
                           if (dataset, model, lookback, h) in summary]
                lines.append(f"| {model} | " + " | ".join(cells) + f" | {average} | {statistics.fmean(seconds):.0f} |")
            if lookback == 96:
                for name, figures in PUBLISHED.items():
                    mse, mae = figures[dataset]
                    lines.append(f"| *{name}, published* | " + " | ".join("" for _ in horizons) + f" | {mse:.3f} / {mae:.3f} | |")
            lines.append("")
    if any(r["lookback"] == 96 for r in records):  # the targets are judged at L=96: a study at L=336 has none
        means, cells = variant_validation(records)
        # the margin says how firm the choice is: a small one can move with a seed or a study
        ranked = ", ".join(f"{v} {m:.4f}" for v, m in sorted(means.items(), key=lambda item: item[1]))
        lines.append(f"Best Titans variant on validation MSE at L=96: {best_variant(records) or 'not yet known'}"
                     + (f" (mean best val MSE over the {cells} cells every variant finished: {ranked})." if means else "."))
        lines += ["", *target_verdicts(records)]
    lines += [*validation_agreement(records), *lookback_table(records)]
    return "\n".join(lines) + "\n"


def by_lookback(records: list[dict[str, Any]]) -> dict[tuple, dict[int, dict[str, Any]]]:
    """(dataset, model, horizon) -> lookback -> `summarise` entry, for the cells run at more than one lookback."""
    cells: dict[tuple, dict[int, dict[str, Any]]] = defaultdict(dict)
    for (dataset, model, lookback, horizon), entry in summarise(records).items():
        cells[(dataset, model, horizon)][lookback] = entry
    return {key: by for key, by in sorted(cells.items()) if len(by) > 1}


def lookback_table(records: list[dict[str, Any]]) -> list[str]:
    """Markdown: test MSE / MAE and validation MSE against the lookback, side by side (the lookback study),
    and the lookback that validation picks with its test MSE, then `lookback_averages`. Every lookback
    forecasts the same val and test rows (the windows reach back into the previous split), so their
    validation MSEs compare."""
    cells = by_lookback(records)
    if not cells:
        return []
    lookbacks = sorted({lookback for by in cells.values() for lookback in by})
    lines = ["", "### Lookback study: test MSE / MAE (validation MSE), mean over the seeds run", "",
             "| dataset | model | H | " + " | ".join(f"L={lookback}" for lookback in lookbacks)
             + " | validation's pick: test MSE |",
             "| --- | --- | --- | " + " | ".join("---" for _ in lookbacks) + " | --- |"]
    for (dataset, model, horizon), by in cells.items():
        row = [f"{by[lb]['mse'][0]:.3f} / {by[lb]['mae'][0]:.3f} ({by[lb]['val_mse']:.3f}; seeds "
               f"{','.join(map(str, by[lb]['seeds']))})" if lb in by else "—" for lb in lookbacks]
        pick = validation_pick(by)
        row.append(f"L={pick}: {by[pick]['mse'][0]:.3f}")
        lines.append(f"| {dataset.upper()} | {model} | {horizon} | " + " | ".join(row) + " |")
    return lines + lookback_averages(records, sorted({(dataset, model) for dataset, model, _ in cells}), lookbacks)


def validation_pick(by: dict[int, dict[str, Any]]) -> int:
    """The lookback with the lowest mean best validation MSE among `by`'s (lookback -> summary entry)."""
    return min(by, key=lambda lookback: by[lookback]["val_mse"])


def lookback_averages(records: list[dict[str, Any]], pairs: list[tuple[str, str]], lookbacks: list[int]) -> list[str]:
    """Markdown: each (dataset, model) pair's 4-horizon average test MSE at each lookback, and with the
    lookback validation picks per horizon: the figure a user choosing L on validation gets. That pick
    counts only once every lookback has run at every horizon."""
    summary = summarise(records)
    lines = ["", "### Lookback study: 4-horizon average test MSE, mean over the seeds run", "",
             "| dataset | model | " + " | ".join(f"L={lookback}" for lookback in lookbacks)
             + " | L picked per horizon on validation |",
             "| --- | --- | " + " | ".join("---" for _ in lookbacks) + " | --- |"]

    def average(entries: list[dict[str, Any]]) -> str:
        return f"{statistics.fmean(e['mse'][0] for e in entries):.3f}" if len(entries) == len(HORIZONS) else "incomplete"

    for dataset, model in pairs:
        by_horizon = [{lookback: summary[key] for lookback in lookbacks
                       if (key := (dataset, model, lookback, horizon)) in summary} for horizon in HORIZONS]
        row = [average([by[lookback] for by in by_horizon if lookback in by]) for lookback in lookbacks]
        if all(len(by) == len(lookbacks) for by in by_horizon):
            picks = [validation_pick(by) for by in by_horizon]
            row.append(average([by[pick] for by, pick in zip(by_horizon, picks)])
                       + f" ({', '.join(f'L={pick}' for pick in picks)})")
        else:
            row.append("incomplete")
        lines.append(f"| {dataset.upper()} | {model} | " + " | ".join(row) + " |")
    return lines


def plot_lookback(records: list[dict[str, Any]], path: Path) -> bool:
    """Test MSE against the lookback per (model, horizon), one panel per dataset; False when nothing to plot."""
    cells = by_lookback(records)
    if not cells:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({key[0] for key in cells})
    # One colour per horizon, one line style per model: the models of a horizon sit side by side.
    colours = {h: f"C{i}" for i, h in enumerate(sorted({key[2] for key in cells}))}
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for (d, model, horizon), by in cells.items():
            if d == dataset:
                points = sorted(by.items())
                ax.errorbar([lb for lb, _ in points], [e["mse"][0] for _, e in points], yerr=[e["mse"][1] for _, e in points],
                            marker="o", capsize=3, label=f"{model}, H={horizon}", color=colours[horizon],
                            linestyle=LINE_STYLES.get(model, "-"))
        ax.set(title=f"{dataset.upper()}: lookback study", xlabel="lookback L", ylabel="test MSE (scaled)",
               xticks=sorted({lb for by in cells.values() for lb in by}))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def rank_correlation(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank); nan when either side is constant."""
    import pandas as pd

    try:
        return statistics.correlation(pd.Series(xs).rank().tolist(), pd.Series(ys).rank().tolist())
    except statistics.StatisticsError:  # fewer than two points, or a constant side
        return math.nan


def validation_agreement(records: list[dict[str, Any]]) -> list[str]:
    """Markdown: per dataset and horizon at L=96, how well validation MSE ranks the runs' test MSE over every
    model and seed. Hyperparameters are chosen on validation, so a low figure says a choice made there
    carries little information about test in that cell."""
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["lookback"] == 96:
            cells[(r["dataset"], r["horizon"])].append(r)
    rows = [(key, rs) for key, rs in sorted(cells.items()) if len(rs) >= 3]
    if not rows:
        return []
    lines = ["", "### How well validation ranks test (L=96, every model and seed of a cell)", "",
             "| dataset | H | runs | Spearman rank correlation, best val MSE vs test MSE |", "| --- | --- | --- | --- |"]
    for (dataset, horizon), rs in rows:
        rho = rank_correlation([r["best_val_mse"] for r in rs], [r["test_mse"] for r in rs])
        lines.append(f"| {dataset.upper()} | {horizon} | {len(rs)} | {rho:.2f} |")
    return lines


def pooled_records(paths: list[Path]) -> list[dict[str, Any]]:
    """Every full run in ``paths`` (the grid and study files) once: a run adopted into the grid is also in
    its study's file, so runs are told apart by their MLflow run id. ``--quick`` smoke runs are left out."""
    pooled: dict[Any, dict[str, Any]] = {}
    for path in paths:
        records = load_records(path)
        if not isinstance(records, list) or not all(isinstance(r, dict) and "best_val_mse" in r for r in records):
            print(f"skipped {path}: not a file of accuracy records (e.g. a windows_read.py result)", file=sys.stderr)
            continue
        for r in records:
            if not r.get("quick"):
                pooled.setdefault(r.get("mlflow_run_id") or (astuple(Cell.of(r)), r["best_val_mse"], r["test_mse"]), r)
    return list(pooled.values())


def validation_agreement_by_model(records: list[dict[str, Any]], min_runs: int = 5) -> list[str]:
    """Markdown: per dataset, horizon and model at L=96, Spearman's rank correlation of best val MSE and test
    MSE over all of that model's runs (every setting and seed tried). This is the question a choice made on
    validation answers for one model: do its runs with lower val MSE test lower? A cell with fewer than
    ``min_runs`` runs shows only its count."""
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["lookback"] == 96:
            cells[(r["dataset"], r["horizon"], r["model"])].append(r)
    models = [m for m in MODELS if any(key[2] == m for key in cells)]
    if not models:
        return []
    lines = ["### How well validation ranks test within each model (L=96, every setting and seed run)", "",
             "Spearman rank correlation of best val MSE and test MSE (runs).", "",
             "| dataset | H | " + " | ".join(models) + " |", "| --- | --- |" + " --- |" * len(models)]
    for dataset, horizon in sorted({key[:2] for key in cells}):
        row = []
        for model in models:
            rs = cells.get((dataset, horizon, model), [])
            rho = rank_correlation([r["best_val_mse"] for r in rs], [r["test_mse"] for r in rs])
            row.append(f"{rho:+.2f} ({len(rs)})" if len(rs) >= min_runs and not math.isnan(rho) else f"– ({len(rs)})")
        lines.append(f"| {dataset.upper()} | {horizon} | " + " | ".join(row) + " |")
    return lines


def target_verdicts(records: list[dict[str, Any]]) -> list[str]:
    """The targets, judged on 4-horizon average test MSE at L=96 (means over seeds): the best variant
    (chosen on validation) at or below the Titans paper, and every variant below the linear baseline."""
    summary = summarise([r for r in records if r["lookback"] == 96])

    def average(dataset: str, model: str | None) -> float | None:
        keys = [(dataset, model, 96, h) for h in HORIZONS]
        return statistics.fmean(summary[k]["mse"][0] for k in keys) if all(k in summary for k in keys) else None

    def verdict(value: float | None, target: float | None) -> str:
        if value is None or target is None:
            return "not yet known (horizons missing)"
        return f"{value:.3f} vs {target:.3f}: " + ("met" if value <= target else "not met")

    best = best_variant(records)
    lines = ["### Targets (4-horizon average test MSE, L=96, mean over seeds)", ""]
    for dataset in sorted({k[0] for k in summary}):
        linear = average(dataset, "dlinear")
        lines.append(f"- {dataset.upper()}, best variant on validation ({best or 'not yet known'}) at or below the "
                     f"Titans paper: {verdict(average(dataset, best), PUBLISHED['Titans (paper)'][dataset][0])}")
        for variant in VARIANTS:
            lines.append(f"- {dataset.upper()}, {variant} below the linear baseline: {verdict(average(dataset, variant), linear)}")
    return lines


def plotted_lookback(records: list[dict[str, Any]]) -> int:
    """The standard protocol's L=96, or for a study run only at longer lookbacks the smallest it has."""
    lookbacks = {r["lookback"] for r in records}
    return 96 if 96 in lookbacks or not lookbacks else min(lookbacks)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Test MSE against the horizon per model (mean over seeds, std as error bars), one panel per dataset,
    at L=96 (or, for records without it, their smallest lookback)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lookback = plotted_lookback(records)
    summary = summarise([r for r in records if r["lookback"] == lookback])
    datasets = sorted({k[0] for k in summary}) or list(DATASETS)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for model in MODELS:
            points = sorted((k[3], v["mse"]) for k, v in summary.items() if k[0] == dataset and k[1] == model)
            if points:
                ax.errorbar([h for h, _ in points], [m for _, (m, _) in points], yerr=[s for _, (_, s) in points],
                            marker="o", capsize=3, label=model, linestyle=LINE_STYLES.get(model, "-"))
        ax.set(title=f"{dataset.upper()}, L={lookback}", xlabel="horizon H", ylabel="test MSE (scaled)", xticks=list(HORIZONS))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(records: list[dict[str, Any]], out: Path, baseline: list[Path] | None = None) -> None:
    """The summary (and, for a study, its comparison with the `baseline` files' runs of the same cells) and the PNG."""
    summary = summary_table(records)
    if baseline:
        base = [r for path in baseline for r in load_records(path)]
        summary += "\n" + "\n".join(study_comparison(records, base)) + "\n"
    out.with_name(out.stem + "_summary.md").write_text(summary)
    if records:
        plot(records, out.with_suffix(".png"))
        plot_lookback(records, out.with_name(out.stem + "_lookback.png"))


# --- studies: compare on validation, adopt ------------------------------------------------------
def base_cell(record: dict[str, Any]) -> Cell:
    """The baseline cell a study run is compared with: its own, except that a run whose memory reads a
    longer past than its head sees (``model.forecast_window`` W) is compared with the plain run at L=W,
    the model with the same head and attention window."""
    cell = Cell.of(record)
    window = record.get("overrides", {}).get("model.forecast_window")
    return replace(cell, lookback=int(window)) if window not in (None, "null") else cell


def study_comparison(study: list[dict[str, Any]], base: list[dict[str, Any]]) -> list[str]:
    """Markdown: a study's runs beside the same cells of `base` (validation first: that is what decides),
    and per model how often and by how much validation favours the study's settings."""
    runs = {r.get("mlflow_run_id") for r in study} - {None}
    base_by_cell = {Cell.of(r): r for r in base if r.get("mlflow_run_id") not in runs}  # not a study run adopted there
    pairs = [(base_by_cell[base_cell(r)], r) for r in sorted(study, key=lambda r: astuple(Cell.of(r)))
             if base_cell(r) in base_by_cell]
    if not pairs:
        return ["No cell of this study is in the baseline file yet."]
    settings = ", ".join(f"{k}={v}" for k, v in study[0].get("overrides", {}).items()) or "the shipped configs"
    if "prototype" in study[0]:  # a script that changes the network around this harness (its records name it)
        settings += f" with {study[0]['prototype']}"
    lines = [f"### Against the baseline file: {settings} (study) vs as there (base), same cells", "",
             "| dataset | model | L | H | seed | val MSE base | val MSE study | test MSE / MAE base | test MSE / MAE study "
             "| epochs (base, study) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b, s in pairs:
        better = s["best_val_mse"] < b["best_val_mse"]
        lines.append(f"| {s['dataset']} | {s['model']} | {s['lookback']} | {s['horizon']} | {s['seed']} "
                     f"| {b['best_val_mse']:.4f} | {'**' * better}{s['best_val_mse']:.4f}{'**' * better} "
                     f"| {b['test_mse']:.3f} / {b['test_mae']:.3f} | {s['test_mse']:.3f} / {s['test_mae']:.3f} "
                     f"| {b['epochs_trained']}, {s['epochs_trained']} |")
    lines += ["", "| model | cells | validation favours the study in | mean val MSE ratio (study / base) |",
              "| --- | --- | --- | --- |"]
    for model in [m for m in MODELS if any(s["model"] == m for _, s in pairs)]:
        ratios = [s["best_val_mse"] / b["best_val_mse"] for b, s in pairs if s["model"] == model]
        lines.append(f"| {model} | {len(ratios)} | {sum(r < 1 for r in ratios)} | {statistics.fmean(ratios):.4f} |")
    return lines


def referenced_file(node: Any, rel: str) -> str | None:
    """The repo-relative path a config value refers to (``model: ../model/mal.yaml`` in `rel`), or None."""
    import posixpath

    if isinstance(node, str) and node.endswith((".yaml", ".yml")):
        return posixpath.normpath(posixpath.join(posixpath.dirname(rel), node))
    return None


def resolved_config(dataset: str, model: str, read_text: Any = None) -> dict[str, Any]:
    """The shipped config of a cell as one tree, its file references read in (as `config_value` reads them)
    and the model arguments it does not spell out filled with the module's defaults: what the run used, so
    a config that later spells a default out (``linear_skip: false``) has not changed."""
    import yaml

    read_text = read_text or (lambda rel: (ROOT / rel).read_text())

    def resolve(node: Any, rel: str) -> Any:
        if (target := referenced_file(node, rel)) is not None:
            return resolve(yaml.safe_load(read_text(target)), target)
        return {k: resolve(v, rel) for k, v in node.items()} if isinstance(node, dict) else node

    start = f"configs/{dataset}/{model}.yaml"
    config = resolve(yaml.safe_load(read_text(start)), start)
    return {**config, "model": {**module_defaults(read_text), **config.get("model", {})}}


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys where two config trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [key for k in sorted(a.keys() | b.keys(), key=str)
                for key in config_differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def config_value(dataset: str, model: str, key: str, read_text: Any = None) -> Any:
    """The value of a dotted `titans-ts fit` key (``model.lr``) in the shipped config of a cell, following the
    config's file references (``model: ../model/mal.yaml``). `read_text(path relative to the repo)` reads the
    files (default: the working tree), so the same lookup works at an old commit."""
    import yaml

    read_text = read_text or (lambda rel: (ROOT / rel).read_text())
    start = rel = f"configs/{dataset}/{model}.yaml"
    node: Any = yaml.safe_load(read_text(rel))
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            missing = f"{key} is not spelled out in {rel}" + (f" (reached from {start})" if rel != start else "")
            if key.startswith("model.") and key.count(".") == 1:
                return module_default(key.split(".")[1], read_text, missing)
            raise KeyError(missing)
        node = node[part]
        if (target := referenced_file(node, rel)) is not None:
            rel, node = target, yaml.safe_load(read_text(target))
    return node


def module_default(name: str, read_text: Any, missing: str) -> Any:
    """The default of TitansForecastingModule's argument `name` (see `module_defaults`)."""
    if name in (defaults := module_defaults(read_text)):
        return defaults[name]
    raise KeyError(f"{missing}, and TitansForecastingModule has no argument {name!r}")


def module_defaults(read_text: Any) -> dict[str, Any]:
    """TitansForecastingModule's argument defaults in ``forecasters/module.py`` as `read_text` reads it: what a
    config that does not spell an argument out runs with. An argument the module did not have yet reads as
    today's default, since a new option's default keeps the behaviour from before it."""
    import ast

    def defaults(source: str) -> dict[str, Any]:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name == "__init__":
                args = node.args.args[len(node.args.args) - len(node.args.defaults):]
                values = {a.arg: ast.literal_eval(d) for a, d in zip(args, node.args.defaults)}
                return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}  # as YAML reads them
        return {}

    return {**defaults((ROOT / "forecasters/module.py").read_text()), **defaults(read_text("forecasters/module.py"))}


def git_reader(commit: str) -> Any:
    """`read_text` for `config_value` at a commit of this repository.

    A file the commit lacks is read as first committed after it: a run records the commit it was made
    on, and a config still uncommitted then (a new model run before its commit) landed in a later one.
    """
    import subprocess

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    def read_text(rel: str) -> str:
        shown = git("show", f"{commit}:{rel}")
        if shown.returncode:
            added = git("log", "--diff-filter=A", "--format=%h", "--reverse", f"{commit}..HEAD", "--", rel).stdout.split()
            shown = git("show", f"{added[0]}:{rel}") if added else shown
        if shown.returncode:
            raise KeyError(f"cannot read {rel} at commit {commit} or later: {shown.stderr.strip()}")
        return shown.stdout

    return read_text


def adopt(study_path: Path, out: Path, datasets: list[str], models: list[str]) -> Path:
    """Move a study's runs into the main grid once the shipped configs hold its settings.

    Same code, config and seed make the same run, so a study run whose overrides the configs now carry is
    a run of the grid: it moves in (marked ``adopted_from``, its overrides kept as ``run_with``). The grid's
    runs of the same (dataset, model) were made with the old settings, read from the configs at each
    run's commit; they move out to a study file of those settings next to `study_path`. Returns that file.
    """
    import yaml

    study = [r for r in load_records(study_path) if r["dataset"] in datasets and r["model"] in models]
    if not study:
        raise SystemExit(f"{study_path} has no runs of {models} on {datasets}")
    overrides = study[0]["overrides"]
    if not overrides:
        raise SystemExit(f"{study_path} holds runs of the shipped configs, not a study")
    pairs = sorted({(d, r["model"]) for d in datasets for r in study})  # a dataset the study lacks is retired too
    new_values = {key: yaml.safe_load(value) for key, value in overrides.items()}
    for dataset, model in pairs:
        for key, value in new_values.items():
            shipped = config_value(dataset, model, key)
            if shipped != value:
                raise SystemExit(f"configs/{dataset}/{model}.yaml has {key}={shipped}, the study ran {key}={overrides[key]}: "
                                 f"change the config first, then adopt")
    # A study run made on other configs than the shipped ones, besides the study's own keys (e.g. before
    # another choice was adopted for its model), is not a run of the grid.
    shipped_configs = {pair: resolved_config(*pair) for pair in pairs}
    ran_on: dict[tuple[str, str, str], dict[str, Any]] = {}
    for record in study:
        pair = (record["dataset"], record["model"])
        if (at := (record["git_commit"], *pair)) not in ran_on:
            try:
                ran_on[at] = resolved_config(*pair, git_reader(record["git_commit"]))
            except KeyError as exc:
                raise SystemExit(f"cannot read the configs of the study's run {Cell.of(record)}: {exc.args[0]}") from exc
        differ = [key for key in config_differences(ran_on[at], shipped_configs[pair]) if key not in overrides]
        if differ:
            raise SystemExit(f"the study's run {Cell.of(record)} was made on configs that differ from configs/{pair[0]}/"
                             f"{pair[1]}.yaml in {', '.join(differ)}: move its runs of {pair} out of {study_path} and "
                             f"run them again with --resume, then adopt")

    def run_settings(record: dict[str, Any]) -> dict[str, Any]:
        """The study's keys as a grid run had them: its overrides (an adopted run's `run_with`), else its
        config at its commit."""
        ran_with = record.get("run_with") or record.get("overrides") or {}
        try:
            return {key: yaml.safe_load(ran_with[key]) if key in ran_with else
                    config_value(record["dataset"], record["model"], key, git_reader(record["git_commit"]))
                    for key in overrides}
        except KeyError as exc:
            raise SystemExit(f"cannot tell the settings of the grid's run {Cell.of(record)} from its commit: "
                             f"{exc.args[0]}; re-run that cell instead of adopting") from exc

    grid_records = load_records(out)
    study_models = {model for _, model in pairs}
    # each run's settings once: they come from `git show` at its commit
    ran = [(r, run_settings(r) if r["model"] in study_models else None) for r in grid_records]
    # The grid's runs of `pairs` with the old setting retire; runs that already have the new one (adopted
    # before, or run since the config changed) stay, and the study adds only the cells they lack.
    retiring = [((r["dataset"], r["model"]) in pairs and settings != new_values, r, settings) for r, settings in ran]
    retired = [r for leaves, r, _ in retiring if leaves]
    kept = [r for leaves, r, _ in retiring if not leaves]
    # A config may serve several datasets: runs outside `pairs` must still match the configs after adoption.
    stale = sorted({(r["dataset"], r["model"]) for leaves, r, settings in retiring
                    if settings is not None and not leaves and (r["dataset"], r["model"]) not in pairs
                    and settings != {key: config_value(r["dataset"], r["model"], key) for key in overrides}})
    if stale:
        raise SystemExit(f"the configs changed for {stale} too, and the grid's runs there have the old setting: "
                         f"adopt with their datasets as well (their missing cells are then re-run with --resume)")
    old_values = {json.dumps(settings, sort_keys=True): settings for leaves, _, settings in retiring if leaves}
    if len(old_values) > 1:
        raise SystemExit(f"the grid's runs of {pairs} were made with different settings {list(old_values)}: "
                         f"adopt per model")
    # spelled as on the command line (`--set model.linear_skip=false`), which also names the retired file
    old_overrides = {k: yaml.safe_dump(v).removesuffix("\n...\n") for k, v in next(iter(old_values.values()), {}).items()}
    retired_path = study_path.with_name("_".join(f"{k.split('.')[-1]}_{v}" for k, v in old_overrides.items()) + ".json")
    if retired:
        previous = [r for r in load_records(retired_path) if Cell.of(r) not in {Cell.of(x) for x in retired}]
        if any(r["overrides"] != old_overrides for r in previous):
            raise SystemExit(f"{retired_path} holds a different study: move it away first")
        save_records(previous + [{**r, "overrides": old_overrides} for r in retired], retired_path)
        write_outputs(load_records(retired_path), retired_path)
    relative = os.path.relpath(study_path, out.parent)
    have = {Cell.of(r) for r in kept}
    adopted = [{**r, "overrides": {}, "run_with": r["overrides"], "adopted_from": relative} for r in study
               if Cell.of(r) not in have]
    save_records(kept + adopted, out)
    write_outputs(load_records(out), out)
    print(f"adopted {len(adopted)} run(s) of {pairs} from {study_path}; "
          f"{len(retired)} run(s) with the old settings moved to {retired_path if retired else 'nowhere (none)'}")
    missing = {Cell.of(r) for r in retired} - {Cell.of(r) for r in adopted} - have
    if missing:
        print(f"{len(missing)} cell(s) the grid had now lack a run with the new settings "
              f"(e.g. {min(missing, key=astuple)}): `--resume` runs them")
    return retired_path


# --- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke pass: ETTh1, mac and dlinear, H=96, a few batches")
    parser.add_argument("--resume", action="store_true", help="keep the records in --out and run only the missing cells")
    parser.add_argument("--overwrite", action="store_true", help="start a new --out even if it has records")
    parser.add_argument("--summary_only", action="store_true", help="only rebuild the summary and PNG from --out")
    parser.add_argument("--lookback_study", action="store_true",
                        help="L in {96, 336, 720} for the best variant (on val, at L=96), patchtst and dlinear")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--horizons", nargs="+", type=int, default=list(HORIZONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--lookbacks", nargs="+", type=int, default=[96])
    parser.add_argument("--max_runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument("--data_dir", type=Path, default=Path(os.environ.get("TITANS_TS_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--tracking_uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--experiment", default=EXPERIMENT)
    parser.add_argument("--workdir", type=Path, default=ROOT, help="where mlflow.db and checkpoints/ go (default: the repo)")
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker (default 1, as every committed record ran: one worker per core)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a `titans-ts fit` override for every run (e.g. model.lr=0.0001); needs its own --out")
    parser.add_argument("--baseline", type=Path, nargs="+", default=None, metavar="FILE",
                        help="for a study: compare its runs with these files' runs of the same cells in the summary")
    parser.add_argument("--agreement", type=Path, nargs="+", default=None, metavar="FILE",
                        help="rank val against test within each model over every run in FILEs (the grid and the "
                             "studies); writes validation_agreement.md beside --out")
    parser.add_argument("--adopt", type=Path, default=None, metavar="STUDY",
                        help="move STUDY's runs (of --datasets, --models) into --out, once the configs hold its settings; "
                             "--out's runs with the old settings move to a study file of their own")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.adopt and args.overrides:
        parser.error("--adopt moves finished runs; it takes no --set")
    args.overrides = parse_overrides(args.overrides, parser)
    if args.overrides and args.out.resolve() == (RESULTS / "accuracy.json").resolve():
        parser.error("runs with --set are a study: give them their own --out, the main grid keeps the shipped configs")
    if args.quick:
        args.datasets, args.models, args.horizons, args.seeds, args.lookbacks = ["etth1"], ["mac", "dlinear"], [96], [0], [96]
    args.out, args.data_dir = args.out.resolve(), args.data_dir.resolve()
    return args


def parse_overrides(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """``["model.lr=0.0001", ...]`` -> ``{"model.lr": "0.0001", ...}``, refusing malformed pairs."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or key.startswith("-"):
            parser.error(f"--set takes KEY=VALUE with a `titans-ts fit` key (e.g. model.lr=0.0001), got {pair!r}")
        overrides[key] = value
    return overrides


def cells_to_run(args: argparse.Namespace, records: list[dict[str, Any]]) -> list[Cell]:
    models = args.models
    if args.lookback_study:
        best = best_variant(records)
        if best is None:
            raise SystemExit("the lookback study needs L=96 results of every Titans variant to pick the best on val")
        print(f"lookback study: best variant on validation MSE at L=96 is {best}")
        # The linear model too: it is the target's reference, and what a longer window gives it is cheap to learn.
        models, args.lookbacks = [best, "patchtst", "dlinear"], list(LOOKBACKS)
    others = {json.dumps(r.get("overrides", {}), sort_keys=True) for r in records} - {json.dumps(args.overrides, sort_keys=True)}
    if others:
        raise SystemExit(f"{args.out} holds runs with other overrides ({', '.join(sorted(others))}): "
                         f"give this study its own --out")
    done = {Cell.of(r) for r in records}
    return [c for c in grid(args.datasets, models, args.horizons, args.seeds, args.lookbacks) if c not in done]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.adopt:
        adopt(args.adopt.resolve(), args.out, args.datasets, args.models)
        return
    if args.agreement:
        table = "\n".join(validation_agreement_by_model(pooled_records(args.agreement))) + "\n"
        args.out.with_name("validation_agreement.md").write_text(table)
        print(table)
        return
    records = load_records(args.out)
    if args.summary_only:
        write_outputs(records, args.out, args.baseline)
        print(summary_table(records))
        return
    if records and not (args.resume or args.overwrite):
        raise SystemExit(f"{args.out} already has {len(records)} records: pass --resume to continue or --overwrite")
    if args.overwrite:
        records = []
        save_records(records, args.out)
    todo = cells_to_run(args, records)[: args.max_runs]
    print(f"{len(todo)} run(s) to do; {len(records)} already in {args.out}", flush=True)
    args.code_version = code_version()  # read once: the code this process imported
    import torch

    # Set, not left to torch: its default is the machine's physical cores, so on a 2-core machine without
    # hyperthreads two workers of 2 threads each fight over the cores (MKL's OpenMP barriers spin) and
    # train 3-6x slower than two workers of 1, with epoch times that no longer compare.
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)  # the default MLflow store (./mlflow.db) and checkpoints/ go here
    for i, cell in enumerate(todo, 1):
        if cell in {Cell.of(r) for r in load_records(args.out)}:
            continue  # another worker finished it meanwhile
        print(f"[{i}/{len(todo)}] {cell} ...", flush=True)
        try:
            record = run_cell(cell, args)
        except Exception as exc:  # one failed cell (e.g. a diverged fit) must not stop the grid
            print(f"    FAILED: {type(exc).__name__}: {exc}; the cell stays missing", flush=True)
            continue
        records = append_record(record, args.out)
        write_outputs(records, args.out, args.baseline)
        print(f"    test_mse={record['test_mse']:.4f} test_mae={record['test_mae']:.4f} val_mse={record['best_val_mse']:.4f} "
              f"epochs={record['epochs_trained']} s/epoch={record['epoch_seconds']:.1f} fit={record['fit_seconds']:.0f}s "
              f"load={record['load_avg_before']}", flush=True)
    if not todo:
        write_outputs(records, args.out, args.baseline)
    print(summary_table(records))


if __name__ == "__main__":
    main()
