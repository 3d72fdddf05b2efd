"""Reliability (issue 7): bad input, numerical faults, crash and resume, MLflow failures, reproducibility.

Everything is tiny (width 8, one layer, a few batches) and runs in temporary folders with their own
MLflow stores; the crash test runs the CLI in subprocesses with one thread.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sktime.base import load

from datamodules import TimeSeriesDataModule
from forecasters import tracking
from forecasters.checkpointing import AtomicCheckpointIO
from forecasters.cli import run_cli
from forecasters.module import TitansForecastingModule
from forecasters.sktime import TitansForecaster
from forecasters.tracking import TitansMLFlowLogger

REPO = Path(__file__).resolve().parents[1]
LOOKBACK, HORIZON = 24, 12
TINY = dict(dim=8, n_layers=1, heads=2, memory_depth=1, chunk_size=2, patch_len=4, patch_stride=4, segment_len=2,
            window=4, n_persistent=1)
CLI_MODEL = [f"--model.{k}={v}" for k, v in TINY.items()]
CLI_TRAINER = ["--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", "--trainer.num_sanity_val_steps=0",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
               "--trainer.log_every_n_steps=1", "--trainer.logger.init_args.log_forecast_model=false",
               "--trainer.logger.init_args.plot_windows=0"]
FORECASTER = dict(variant="lmm", lookback=LOOKBACK, dim=8, n_layers=1, heads=2, memory_depth=1, chunk_size=4,
                  patch_len=4, patch_stride=4, max_epochs=2, batch_size=32, validation_size=0, random_state=0)


def frame(n: int = 600, channels: int = 3, freq: str = "h", seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    values = np.sin(2 * np.pi * t[:, None] / 24 + np.arange(channels)) + 0.1 * rng.standard_normal((n, channels))
    df = pd.DataFrame(values, columns=[f"c{i}" for i in range(channels)])
    df.insert(0, "date", pd.date_range("2020-01-01", periods=n, freq=freq))
    return df


def series(n: int = 120) -> pd.Series:
    return pd.Series(np.sin(np.arange(n) / 3.0), index=pd.date_range("2021-01-01", periods=n, freq="h"), name="y")


def cli_data(csv: Path, *extra: str) -> list[str]:
    return ["--data", "TimeSeriesDataModule", f"--data.path={csv}", f"--data.lookback={LOOKBACK}",
            f"--data.horizon={HORIZON}", "--data.batch_size=8", *extra]


def quiet_cli(args: list[str]) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):
        return run_cli(args)


def mlflow_runs(db: Path) -> list[Any]:
    import mlflow

    if not db.is_file():
        return []
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store with its tables made; copying it is much faster than creating one."""
    import mlflow

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def store_in(folder: Path, empty_store: Path) -> Path:
    """``folder/mlflow.db``, the CLI's default store when run there, as a copy of the empty store."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(empty_store, folder / "mlflow.db"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CSV of 3 channels, a real checkpoint trained on it, a checkpoint of another model and a non-checkpoint."""
    folder = tmp_path_factory.mktemp("files")
    csv = folder / "three.csv"
    frame().to_csv(csv, index=False)
    pl.seed_everything(0)
    module = TitansForecastingModule(n_channels=3, lookback=LOOKBACK, horizon=HORIZON, **TINY)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=folder)
    trainer.fit(module, TimeSeriesDataModule(path=str(csv), lookback=LOOKBACK, horizon=HORIZON, batch_size=8))
    trainer.save_checkpoint(folder / "three.ckpt")
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2)}, "hyper_parameters": {"hidden_size": 4},
                "pytorch-lightning_version": pl.__version__, "epoch": 0, "global_step": 0}, folder / "other.ckpt")
    (folder / "garbage.ckpt").write_bytes(os.urandom(256))
    return {"csv": csv, "ckpt": folder / "three.ckpt", "other": folder / "other.ckpt", "garbage": folder / "garbage.ckpt"}


@pytest.fixture(scope="module")
def fitted_forecaster() -> TitansForecaster:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TitansForecaster(**FORECASTER).fit(series(), fh=[1, 2, 3])


# -- bad input everywhere -------------------------------------------------------------------------


@dataclass
class Ctx:
    files: dict[str, Path]
    forecaster: TitansForecaster
    tmp: Path


@dataclass
class Row:
    call: Callable[[Ctx], Any]
    error: type[BaseException]
    problem: str  # a phrase of the message that names the problem
    fix: str  # ... and one that names the fix


def dm(df: pd.DataFrame, **kwargs: Any) -> None:
    TimeSeriesDataModule(df=df, **{"lookback": LOOKBACK, "horizon": HORIZON, **kwargs}).setup()


def module(**kwargs: Any) -> TitansForecastingModule:
    return TitansForecastingModule(**{"n_channels": 3, "lookback": LOOKBACK, "horizon": HORIZON, **TINY, **kwargs})


def fit_forecaster(y: Any, fh: Any = (1, 2, 3), **kwargs: Any) -> None:
    TitansForecaster(**{**FORECASTER, **kwargs}).fit(y, fh=list(fh))


def cli(c: Ctx, *args: str, subcommand: str = "fit") -> None:
    quiet_cli([subcommand, *cli_data(c.files["csv"]), *CLI_MODEL, *CLI_TRAINER, *args])


def with_value(df: pd.DataFrame, row: int, value: Any) -> pd.DataFrame:
    df = df.copy()
    if isinstance(value, str):
        df["c1"] = df["c1"].astype(object)
    df.loc[row, "c1"] = value
    return df


def dropped(df: pd.DataFrame, rows: list[int]) -> pd.DataFrame:
    return df.drop(index=rows).reset_index(drop=True)


def unknown_key_config(c: Ctx) -> str:
    path = c.tmp / "typo.yaml"
    path.write_text("model:\n  dimm: 8\n")
    return str(path)


BAD_INPUT: dict[str, Row] = {
    # data modules
    "data-nan": Row(lambda c: dm(with_value(frame(), 50, np.nan)), ValueError, "NaN or inf values", "fill_method="),
    "data-inf": Row(lambda c: dm(with_value(frame(), 50, np.inf)), ValueError, "NaN or inf values", "fill_method="),
    "data-empty": Row(lambda c: dm(frame().iloc[:0]), ValueError, "too short", "longer series or a smaller lookback"),
    "data-too-short": Row(lambda c: dm(frame(60)), ValueError, "too short", "longer series or a smaller lookback"),
    "data-text-column": Row(lambda c: dm(with_value(frame(), 5, "n/a")), ValueError, "non-numeric", "pd.to_numeric"),
    "data-duplicated-time": Row(lambda c: dm(pd.concat([frame()[:300], frame()[299:]], ignore_index=True)), ValueError,
                                "duplicated timestamps", "drop_duplicates"),
    "data-unsorted-time": Row(lambda c: dm(frame().iloc[::-1].reset_index(drop=True)), ValueError, "not sorted",
                              "sort the data by time"),
    "data-irregular-time": Row(lambda c: dm(dropped(frame(), [100, 101, 350])), ValueError, "irregular timestamps",
                               "resample"),
    "data-lookback-0": Row(lambda c: dm(frame(), lookback=0), ValueError, "lookback must be an integer >= 1",
                           "pass e.g. lookback=96"),
    # the Lightning module
    "module-dim-0": Row(lambda c: module(dim=0), ValueError, "dim must be an integer >= 1", "e.g. 64"),
    "module-negative-lr": Row(lambda c: module(lr=-1e-3), ValueError, "lr must be positive", "e.g. 1e-3"),
    "module-nan-lr": Row(lambda c: module(lr=float("nan")), ValueError, "lr must be positive and finite", "e.g. 1e-3"),
    "module-chunk-0": Row(lambda c: module(chunk_size=0), ValueError, "chunk_size must be an integer >= 1", "e.g. 16"),
    "module-lookback-0": Row(lambda c: module(lookback=0), ValueError, "lookback must be an integer >= 1", "e.g. 96"),
    "module-float-layers": Row(lambda c: module(n_layers=1.5), ValueError, "n_layers must be an integer", "e.g. 2"),
    "module-dim-vs-heads": Row(lambda c: module(dim=10, heads=4), ValueError, "must be a multiple of heads",
                               "dim=8 or heads=2"),
    "module-dropout-1.5": Row(lambda c: module(dropout=1.5), ValueError, "dropout must be a number in [0, 1)",
                              "e.g. 0.1"),
    "module-other-channels": Row(lambda c: module()(torch.zeros(2, LOOKBACK, 5)), ValueError,
                                 "expected a window of shape [batch, 24, 3]", "same columns"),
    "module-nan-window": Row(lambda c: module().predict_step(torch.full((2, LOOKBACK, 3), float("nan")), 0),
                             ValueError, "NaN or inf inputs", "impute"),
    "module-other-model-ckpt": Row(lambda c: TitansForecastingModule.load_from_checkpoint(
        c.files["other"], weights_only=True), ValueError, "holds a different model", "written by TitansForecastingModule"),
    # the command line
    "cli-unknown-config-key": Row(lambda c: cli(c, "--config", unknown_key_config(c)), SystemExit,
                                  "does not accept option 'model.dimm'", "For details of accepted options run"),
    "cli-width-0": Row(lambda c: cli(c, "--model.dim=0"), ValueError, "dim must be an integer >= 1", "e.g. 64"),
    "cli-negative-lr": Row(lambda c: cli(c, "--model.lr=-0.01"), ValueError, "lr must be positive", "e.g. 1e-3"),
    "cli-chunk-0": Row(lambda c: cli(c, "--model.chunk_size=0"), ValueError, "chunk_size must be", "e.g. 16"),
    "cli-lookback-0": Row(lambda c: cli(c, "--data.lookback=0"), ValueError, "lookback must be an integer >= 1",
                          "pass e.g. lookback=96"),
    "cli-missing-ckpt": Row(lambda c: cli(c, f"--ckpt_path={c.tmp / 'nope.ckpt'}", subcommand="test"),
                            FileNotFoundError, "no checkpoint file", "--ckpt_path last"),
    "cli-garbage-ckpt": Row(lambda c: cli(c, f"--ckpt_path={c.files['garbage']}", subcommand="predict"), ValueError,
                            "not a readable checkpoint", "pass a .ckpt file written by"),
    "cli-other-model-ckpt": Row(lambda c: cli(c, f"--ckpt_path={c.files['other']}", subcommand="predict"), ValueError,
                                "checkpoint of another model", "pass a checkpoint written by"),
    "cli-other-channels-at-predict": Row(lambda c: cli(c, "--data.features=S", f"--ckpt_path={c.files['ckpt']}",
                                                       subcommand="predict"), ValueError,
                                         "n_channels=3 in the checkpoint but 1 here", "use the data and model settings"),
    "cli-unreachable-server": Row(lambda c: cli(c, "--trainer.logger.init_args.tracking_uri=http://127.0.0.1:9"),
                                  ConnectionError, "is unreachable", "--trainer.logger false"),
    # the sktime forecaster
    "sktime-nan": Row(lambda c: fit_forecaster(series().where(series().index != series().index[7])), ValueError,
                      "missing data", "impute first"),
    "sktime-inf": Row(lambda c: fit_forecaster(series().where(series().index != series().index[7], np.inf)), ValueError,
                      "infinite values", "impute first"),
    "sktime-empty": Row(lambda c: fit_forecaster(series().iloc[:0]), ValueError, "empty y", "at least lookback"),
    "sktime-too-short": Row(lambda c: fit_forecaster(series(20)), ValueError, "too short", "smaller lookback"),
    "sktime-text-column": Row(lambda c: fit_forecaster(pd.DataFrame({"y": series(), "kind": "a"})), TypeError,
                              "non-numeric", "drop or encode"),
    "sktime-unsorted": Row(lambda c: fit_forecaster(series().iloc[::-1]), ValueError, "sorted by time",
                           "y.sort_index()"),
    "sktime-duplicated-time": Row(lambda c: fit_forecaster(pd.concat([series()[:60], series()[59:]])), ValueError,
                                  "duplicated time points", "drop or aggregate"),
    "sktime-chunk-0": Row(lambda c: fit_forecaster(series(), chunk_size=0), ValueError, "chunk_size must be", "e.g. 16"),
    "sktime-negative-lr": Row(lambda c: fit_forecaster(series(), lr=-1.0), ValueError, "lr must be positive",
                              "e.g. 1e-3"),
    "sktime-fh-beyond-horizon": Row(lambda c: c.forecaster.predict(fh=[1, 2, 3, 4]), ValueError,
                                    "different forecasting horizon", "re-fit the forecaster"),
    "sktime-other-channels-at-update": Row(lambda c: pickle.loads(pickle.dumps(c.forecaster)).update(
        pd.DataFrame({"y": [0.0], "z": [1.0]}, index=pd.date_range(c.forecaster.cutoff[0], periods=2, freq="h")[1:]),
        update_params=False), ValueError, "columns", "same columns in the same order"),
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_is_refused_before_training_with_the_fix(
    name: str, files: dict[str, Path], fitted_forecaster: TitansForecaster, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    row = BAD_INPUT[name]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started although the input is bad")

    monkeypatch.setattr(pl.Trainer, "fit", no_training)
    with warnings.catch_warnings(), pytest.raises(row.error) as caught:
        warnings.simplefilter("ignore")
        row.call(Ctx(files, fitted_forecaster, tmp_path))
    message = capsys.readouterr().err if row.error is SystemExit else str(caught.value)
    assert row.problem in message, message
    assert row.fix in message, message
    # Nothing half-written: no checkpoint folder, no MLflow run.
    assert not (tmp_path / "checkpoints").exists()
    assert mlflow_runs(tmp_path / "mlflow.db") == []


# -- numerical faults -----------------------------------------------------------------------------


def test_nan_loss_stops_the_cli_fit_fails_the_run_and_writes_no_nan_checkpoint(
    files: dict[str, Path], empty_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    store_in(tmp_path, empty_store)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    loss = TitansForecastingModule._loss

    def nan_from_step_3(self: TitansForecastingModule, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        value = loss(self, out, y)
        return value * float("nan") if self.training and self.global_step >= 3 else value

    monkeypatch.setattr(TitansForecastingModule, "_loss", nan_from_step_3)
    with pytest.raises(FloatingPointError, match=r"training loss became nan at step 3 \(epoch 1, batch 1\)"):
        cli(Ctx(files, None, tmp_path), "--trainer.max_epochs=3", "--trainer.limit_train_batches=2")  # type: ignore[arg-type]

    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("FloatingPointError: training loss became nan at step 3 ")
    import mlflow

    text = Path(mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").download_artifacts(
        run.info.run_id, "traceback.txt", str(tmp_path))).read_text()
    assert "Traceback (most recent call last)" in text and "training_step" in text
    # Epoch 0 (steps 0-1) was checkpointed; nothing after the fault, and nothing non-finite.
    checkpoints = sorted((tmp_path / "checkpoints" / run.info.run_id).iterdir())
    assert {p.name for p in checkpoints} >= {"last.ckpt"} and all(p.suffix == ".ckpt" for p in checkpoints)
    for path in checkpoints:
        saved = torch.load(path, weights_only=True)
        assert saved["global_step"] == 2
        assert all(v.isfinite().all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_non_finite_gradient_stops_training_and_nan_weights_are_never_saved(tmp_path: Path) -> None:
    pl.seed_everything(0)
    net = module()
    net.model.head[-1].weight.register_hook(lambda grad: grad * float("inf"))
    x, y = torch.randn(16, LOOKBACK, 3), torch.randn(16, HORIZON, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match=r"gradient of model\.head\.2\.weight became non-finite at step 0"):
        trainer.fit(net, loader)
    assert net.model.head[-1].weight.isfinite().all()  # the step never ran
    with torch.no_grad():
        net.model.embed.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="refusing to write a checkpoint whose weight model.embed.weight"):
        trainer.save_checkpoint(tmp_path / "nan.ckpt")
    assert not any(tmp_path.glob("*.ckpt"))


EXTREMES = {
    "level-1e6": lambda t: 1e6 + 10.0 * np.sin(t / 3.0),
    "constant": lambda t: np.full(len(t), 5.0),
    "single-spike": lambda t: np.where(t == 70, 1e4, 0.0),
}


@pytest.mark.parametrize("kind", list(EXTREMES))
def test_extreme_inputs_train_and_forecast_finite_numbers(kind: str) -> None:
    t = np.arange(120, dtype=np.float64)
    y = pd.Series(EXTREMES[kind](t), index=pd.date_range("2021-01-01", periods=120, freq="h"), name="y")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forecast = TitansForecaster(**FORECASTER).fit(y, fh=[1, 2, 3]).predict()
    assert np.isfinite(forecast.to_numpy()).all()
    if kind == "constant":
        np.testing.assert_allclose(forecast.to_numpy(), 5.0, atol=0.5)
    # The Lightning module on the raw, unscaled windows (RevIN alone faces the scale).
    pl.seed_everything(0)
    net = TitansForecastingModule(n_channels=1, lookback=LOOKBACK, horizon=HORIZON, **TINY)
    values = torch.tensor(y.to_numpy(), dtype=torch.float32)
    windows = values.unfold(0, LOOKBACK + HORIZON, 1)  # [n, L + H]
    x, target = windows[:, :LOOKBACK, None], windows[:, LOOKBACK:, None]
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(net, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, target), batch_size=16))
    with torch.no_grad():
        assert net.eval()(x).isfinite().all()


# -- crash and resume -------------------------------------------------------------------------------


def titans_ts(workdir: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    code = "import sys; from forecasters.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill_after_checkpoint_of_epoch(process: subprocess.Popen[str], workdir: Path, epoch: int) -> str:
    """SIGKILL ``process`` once ``last.ckpt`` holds ``epoch`` (it is then busy in the next one); what happened."""
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        for last in workdir.glob("checkpoints/*/last.ckpt"):
            with contextlib.suppress(Exception):  # caught mid-rename on some platforms: look again
                if torch.load(last, weights_only=True)["epoch"] >= epoch:
                    process.send_signal(signal.SIGKILL)
                    process.communicate()
                    return "killed"
        time.sleep(0.01)
    process.kill()
    return f"no checkpoint of epoch {epoch} seen before the fit ended: {process.communicate()[0][-3000:]}"


def test_sigkill_mid_epoch_then_ckpt_path_last_reaches_the_same_metrics(
    files: dict[str, Path], empty_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = ["fit", *cli_data(files["csv"]), *CLI_MODEL, *CLI_TRAINER, "--trainer.max_epochs=3",
            "--trainer.limit_train_batches=8", "--seed_everything=7"]
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    store_in(whole, empty_store), store_in(crashed, empty_store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The fit to be killed runs in a subprocess, beside the uninterrupted reference run in this process.
    killed = titans_ts(crashed, *args)
    outcome: list[str] = []
    killer = threading.Thread(target=lambda: outcome.append(kill_after_checkpoint_of_epoch(killed, crashed, 1)))
    killer.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess: the same kernels, the same sums
    try:
        monkeypatch.chdir(whole)
        reference = quiet_cli(args)
        killer.join()
        assert outcome == ["killed"] and killed.returncode == -signal.SIGKILL, outcome
        (run_before,) = mlflow_runs(crashed / "mlflow.db")
        assert run_before.info.status == "RUNNING"  # it had no chance to finish

        monkeypatch.chdir(crashed)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exported the first store
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            resumed = run_cli([*args, "--ckpt_path", "last"])
    finally:
        torch.set_num_threads(threads)
    assert f"Resuming from {crashed / 'checkpoints' / run_before.info.run_id / 'last.ckpt'}" in printed.getvalue()
    (run_after,) = mlflow_runs(crashed / "mlflow.db")
    assert run_after.info.run_id == run_before.info.run_id and run_after.info.status == "FINISHED"
    # Exactly equal: the checkpoint carries the random generators, so the replayed epoch draws the same
    # batches and dropout masks, and the CPU kernels are deterministic on one thread.
    assert resumed.test_metrics == reference.test_metrics and set(resumed.test_metrics) >= {"test_mse", "test_mae"}
    assert resumed.trainer.current_epoch == reference.trainer.current_epoch == 3
    assert not list(crashed.glob("checkpoints/*/.*"))  # no temporary files left over


_SLOW_SAVE = """
import sys, time, torch
from pathlib import Path
from forecasters.checkpointing import AtomicCheckpointIO

target, marker = Path(sys.argv[1]), Path(sys.argv[2])
real_save = torch.save

def save_then_hang(obj, handle):
    real_save(obj, handle)  # a whole new checkpoint ...
    handle.truncate(handle.tell() // 2)  # ... of which half is on disk when the process dies
    handle.flush()
    marker.touch()
    time.sleep(600)

torch.save = save_then_hang
AtomicCheckpointIO().save_checkpoint({"version": "new", "weights": torch.randn(256, 256)}, target)
"""


def test_kill_while_saving_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    target, marker = tmp_path / "last.ckpt", tmp_path / "saving"
    AtomicCheckpointIO().save_checkpoint({"version": "old", "weights": torch.ones(3)}, target)
    process = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(target), str(marker)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), process.communicate()[0]
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert torch.load(target, weights_only=True)["version"] == "old"
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]
    leftovers = list(tmp_path.glob(".last.ckpt.*"))
    assert len(leftovers) == 1  # the half-written temporary file, never a .ckpt ...
    AtomicCheckpointIO().save_checkpoint({"version": "next", "weights": torch.ones(3)}, target)
    assert not any(p.exists() for p in leftovers)  # ... and the next save clears it away
    assert torch.load(target, weights_only=True)["version"] == "next"


def test_the_cli_trainer_writes_checkpoints_atomically(files: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli_object = run_cli([*cli_data(files["csv"]), "--trainer.logger=false"], run=False)
    assert isinstance(cli_object.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# -- MLflow ----------------------------------------------------------------------------------------


def test_exception_after_training_also_ends_the_run_failed_with_its_traceback(
    files: dict[str, Path], empty_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    store_in(tmp_path, empty_store)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("model store is full")

    monkeypatch.setattr(TitansMLFlowLogger, "log_forecaster", broken)
    with pytest.raises(RuntimeError, match="model store is full"):
        cli(Ctx(files, None, tmp_path), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2")  # type: ignore[arg-type]
    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: model store is full"
    import mlflow

    assert "traceback.txt" in {a.path for a in mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
                               .list_artifacts(run.info.run_id)}


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts connections and never answers (a hung server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.timeout(120)  # MLflow alone would retry for minutes
def test_a_tracking_server_that_never_answers_fails_within_the_probe_timeout(
    silent_server: str, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking, "SERVER_PROBE_TIMEOUT_S", 1.0)
    with pytest.raises(ConnectionError, match=f"tracking server {silent_server} is unreachable .*timed out"):
        cli(Ctx(files, None, tmp_path), f"--trainer.logger.init_args.tracking_uri={silent_server}")  # type: ignore[arg-type]
    assert not (tmp_path / "checkpoints").exists()


# -- reproducibility --------------------------------------------------------------------------------


def train_and_forecast(seed: int, root: Path, x: torch.Tensor) -> tuple[torch.Tensor, Path]:
    pl.seed_everything(seed)
    net = TitansForecastingModule(n_channels=3, lookback=LOOKBACK, horizon=HORIZON, **TINY)
    data = TimeSeriesDataModule(df=frame(), lookback=LOOKBACK, horizon=HORIZON, batch_size=8)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=6, limit_val_batches=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         callbacks=[ModelCheckpoint(dirpath=root, save_last=True)])
    trainer.fit(net, data)
    with torch.no_grad():
        return net.eval()(x), root / "last.ckpt"


def test_same_seed_gives_bit_identical_forecasts_on_cpu_and_after_save_and_load(tmp_path: Path) -> None:
    x = torch.randn(4, LOOKBACK, 3, generator=torch.Generator().manual_seed(1))
    first, checkpoint = train_and_forecast(3, tmp_path / "a", x)
    second, _ = train_and_forecast(3, tmp_path / "b", x)
    other, _ = train_and_forecast(4, tmp_path / "c", x)
    assert torch.equal(first, second) and not torch.equal(first, other)
    loaded = TitansForecastingModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), first)
    # The sktime estimator: two fits, a pickle round trip and save/load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = TitansForecaster(**FORECASTER).fit(series(), fh=[1, 2, 3])
        b = TitansForecaster(**FORECASTER).fit(series(), fh=[1, 2, 3])
        copies = (b, pickle.loads(pickle.dumps(a)), load(a.save()))
        forecasts = [f.predict().to_numpy() for f in (a, *copies)]
    assert all(np.array_equal(forecasts[0], f) for f in forecasts[1:])
