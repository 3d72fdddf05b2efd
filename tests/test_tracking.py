"""MLflow helpers: store resolution, tags, config flattening, figures, the logger, and a real tracking server."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from forecasters.plots import comparison_figure, forecast_figure
from forecasters.tracking import (
    DEFAULT_TRACKING_URI,
    TitansMLFlowLogger,
    dataset_name,
    flatten_config,
    folder_lock,
    git_commit,
    resolve_tracking_uri,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_ETTH1 = REPO.parent / "shared" / "data" / "ETT-small" / "ETTh1.csv"


# -- small helpers ----------------------------------------------------------------------------------


def test_tracking_uri_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri() == "http://127.0.0.1:1"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_git_commit(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown"  # not a checkout
    commit = git_commit(REPO)
    assert commit == "unknown" or (len(commit) == 40 and int(commit, 16) >= 0)


def test_flatten_config() -> None:
    config = {"model": {"dim": 16, "quantiles": [0.1, 0.9]}, "trainer": {"callbacks": [
        {"class_path": "a.B", "init_args": {"monitor": "val_mse"}}], "logger": False}, "empty": {}, "none": None}
    assert flatten_config(config) == {
        "model.dim": "16", "model.quantiles": "[0.1, 0.9]", "trainer.callbacks.0.class_path": "a.B",
        "trainer.callbacks.0.init_args.monitor": "val_mse", "trainer.logger": "False", "empty": "{}", "none": "None",
    }


def test_dataset_name() -> None:
    from datamodules import ETTh1DataModule, TimeSeriesDataModule

    assert dataset_name(ETTh1DataModule(data_dir="/nowhere")) == "ETTh1"
    assert dataset_name(TimeSeriesDataModule(path="/data/my_series.csv")) == "my_series"
    assert dataset_name(None) == "unknown"


def test_figures_render_to_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fig = forecast_figure(rng.normal(size=(3, 24)), rng.normal(size=(3, 12)), rng.normal(size=(3, 12)),
                          window_indices=[0, 5, 9], channel="OT")
    fig.savefig(tmp_path / "f.png")
    table = pd.DataFrame({"run_id": ["a", "b"], "dataset": ["ETTh1"] * 2, "variant": ["mac", "mag"],
                          "horizon": [96, 96], "test_mse": [0.4, np.nan]})
    comparison_figure(table).savefig(tmp_path / "c.png")
    for name in ("f.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="history"):
        forecast_figure(np.zeros((2, 5)), np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="no run has a test_mse"):
        comparison_figure(table.assign(test_mse=np.nan))


def test_logger_defaults_to_sqlite_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logger = TitansMLFlowLogger(experiment_name="unit")
    assert logger.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and not logger.started
    run_id = logger.start({"dataset": "toy"}, run_name="toy-run")
    logger.log_metrics({"val_mse": 1.5}, step=0)
    logger.log_config({"model": {"dim": 8}}, "model:\n  dim: 8\n")
    logger.finalize("success")
    assert (tmp_path / "mlflow.db").is_file()

    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.run_name == "toy-run" and run.data.tags["dataset"] == "toy"
    assert run.data.metrics == {"val_mse": 1.5} and run.data.params == {"model.dim": "8"}
    with pytest.raises(ValueError, match="plot_windows"):
        TitansMLFlowLogger(plot_windows=-1)


def test_a_second_logger_in_another_folder_gets_that_folders_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # mlflow.set_tracking_uri (called by Lightning's logger) exports MLFLOW_TRACKING_URI; left exported,
    # the second run of a process would go to the first run's store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)
        logger = TitansMLFlowLogger(experiment_name="unit")
        assert logger.tracking_uri == f"sqlite:///{folder / 'mlflow.db'}"
        logger.start({"dataset": "toy"})
        logger.finalize("success")
        assert (folder / "mlflow.db").is_file() and "MLFLOW_TRACKING_URI" not in os.environ


def _start_a_run(uri: str, barrier: Any, results: Any) -> None:
    barrier.wait()  # every process reaches the fresh store at once
    try:
        results.put(TitansMLFlowLogger(experiment_name="unit", tracking_uri=uri).run_id)
    except Exception as error:  # reported to the test, which names it
        results.put(f"{type(error).__name__}: {error}")


@pytest.mark.skipif(sys.platform == "win32", reason="flock and fork are POSIX")
def test_fits_started_at_once_share_a_fresh_sqlite_store(tmp_path: Path) -> None:
    # Unguarded, MLflow's creation and migration of a new database races: all but one process failed
    # with "table ... already exists" or "duplicate column name" on every try (4 processes).
    import multiprocessing

    import mlflow

    uri, n = f"sqlite:///{tmp_path / 'mlflow.db'}", 4
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(n), context.Queue()
    processes = [context.Process(target=_start_a_run, args=(uri, barrier, results)) for _ in range(n)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert all(len(o) == 32 and ":" not in o for o in outcomes), outcomes  # run ids, not errors
    client = mlflow.MlflowClient(uri)
    experiments = [e for e in client.search_experiments() if e.name == "unit"]
    assert len(experiments) == 1
    assert {r.info.run_id for r in client.search_runs([experiments[0].experiment_id])} == set(outcomes)


def _lock_without_waiting(folder: Path) -> None:
    """Take and drop an exclusive flock on ``folder``; BlockingIOError if another holder has it."""
    import fcntl

    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(handle)


def test_folder_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    with folder_lock(tmp_path):
        with pytest.raises(BlockingIOError):
            _lock_without_waiting(tmp_path)
    _lock_without_waiting(tmp_path)  # released on exit


# -- a real tracking server --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on a free local port with its own SQLite store and artifact folder; yields its URL."""
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts")]
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    except OSError as exc:
        pytest.skip(f"the mlflow server executable cannot start: {exc}")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.flush()
                pytest.skip(f"mlflow server exited with {proc.returncode} before serving: "
                            f"{(tmp_path / 'server.log').read_text()[-1500:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not answer /health in 120 s: "
                                     f"{(tmp_path / 'server.log').read_text()[-1500:]}")
            time.sleep(0.5)
        yield url
    finally:
        # The server runs in its own session: stop it and its workers, then reap it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


def _etth1_dir(tmp_path: Path) -> Path:
    if SHARED_ETTH1.is_file():
        return SHARED_ETTH1.parents[1]
    t = np.arange(14400)
    frame = pd.DataFrame(np.sin(2 * np.pi * t[:, None] / 24 + np.arange(7)),
                         columns=["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"])
    frame.insert(0, "date", pd.date_range("2016-07-01", periods=14400, freq="h").strftime("%Y-%m-%d %H:%M:%S"))
    folder = tmp_path / "data"
    folder.mkdir()
    frame.to_csv(folder / "ETTh1.csv", index=False)
    return folder


def test_fit_logs_to_a_tracking_server(mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forecasters.cli import run_cli

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    args = [
        "fit", "--config", str(REPO / "configs" / "etth1" / "lmm.yaml"), f"--data.data_dir={_etth1_dir(tmp_path)}",
        "--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1", "--model.dim=16", "--model.n_layers=1", "--model.heads=2",
        "--data.batch_size=16", "--trainer.logger.init_args.experiment_name=server-test",
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli = run_cli(args)
    assert f"UI: open {mlflow_server}" in out.getvalue()
    assert not (work / "mlflow.db").exists()  # everything went to the server

    import mlflow
    import mlflow.pytorch

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("server-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [cli.trainer.logger.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["variant"] == "lmm"
    assert run.data.metrics["test_mse"] == pytest.approx(cli.test_metrics["test_mse"])
    assert len(client.get_metric_history(run.info.run_id, "val_mse")) == 2
    assert {"config.yaml", "forecasts.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model", dst_path=str(tmp_path / "model"))
    x = torch.randn(3, 96, 7)
    with torch.no_grad():
        forecast = model(x)
        assert forecast.shape == (3, 96, 7) and torch.isfinite(forecast).all()
        assert torch.allclose(forecast, cli.model.to("cpu").eval()(x), atol=1e-5)
