"""The titans-ts command line: help, configs, linking, fit -> test -> MLflow, determinism, checkpoints, compare.

Runs are tiny (dim 16, one layer, a few batches) and happen in a temporary working directory, so
nothing is written into the repository. One module-scoped pair of fits with the same seed serves
most tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from forecasters import TitansForecastingModule
from forecasters.cli import TitansCLI, main, run_cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DATA_CLASSES = {
    "etth1": "ETTh1DataModule", "etth2": "ETTh2DataModule", "ettm1": "ETTm1DataModule", "ettm2": "ETTm2DataModule",
    "ecl": "ECLDataModule", "traffic": "TrafficDataModule", "weather": "WeatherDataModule",
}
DATASETS = tuple(DATA_CLASSES)
VARIANTS = ("mac", "mag", "mal", "lmm")
BASELINES = ("patchtst", "dlinear")  # trained by the same harness (forecasters/baselines.py)

#: Overrides that make any config a run of a few seconds.
TINY = [
    "--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2", "--trainer.limit_predict_batches=2", "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1",
    "--model.dim=16", "--model.n_layers=1", "--model.heads=2", "--data.init_args.batch_size=16",
]


def etth1_args(data_dir: Path, variant: str = "mac") -> list[str]:
    return ["--config", str(CONFIGS / "etth1" / f"{variant}.yaml"), f"--data.init_args.data_dir={data_dir}", *TINY]


@dataclass
class Fit:
    workdir: Path
    cli: TitansCLI
    output: str


def quiet_run(args: list[str]) -> tuple[TitansCLI, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli = run_cli(args)
    return cli, out.getvalue()


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[list[Fit]]:
    """Two identical tiny fits (seed 42) in a fresh working directory with the default MLflow store."""
    workdir = tmp_path_factory.mktemp("work")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        results = []
        # The first logs its model as a torch.export graph, the second pickled (the default).
        for model_format in ("pt2", "pickle"):
            cli, output = quiet_run(["fit", *etth1_args(data_dir), "--seed_everything=42",
                                     f"--trainer.logger.init_args.model_format={model_format}"])
            results.append(Fit(workdir, cli, output))
        yield results


@pytest.fixture
def in_workdir(fits: list[Fit], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(fits[0].workdir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return fits[0].workdir


# -- help and configs -------------------------------------------------------------------------------


def test_help_does_not_import_mlflow_sktime_or_matplotlib_eagerly() -> None:
    script = """
import json, sys
import forecasters.cli
from forecasters.cli import main
seen = {"import": [m for m in ("mlflow", "sktime") if m in sys.modules]}
for args in (["--help"], ["fit", "--help"], ["compare", "--help"]):
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
    seen[" ".join(args)] = [m for m in ("mlflow", "sktime") if m in sys.modules]
print("RESULT" + json.dumps(seen))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.split("RESULT")[-1])
    assert result == {"import": [], "--help": [], "fit --help": [], "compare --help": []}
    assert "{fit,validate,test,predict,compare}" in proc.stdout and "--model.variant" in proc.stdout  # fit --help
    assert "--experiment" in proc.stdout and "--chart" in proc.stdout
    # The module itself does not pull in matplotlib's pyplot (Lightning may import matplotlib proper).
    source = (REPO / "forecasters" / "cli.py").read_text() + (REPO / "forecasters" / "tracking.py").read_text()
    assert "import matplotlib.pyplot" not in source and "\nimport mlflow" not in source


def test_console_script_points_at_main() -> None:
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="titans-ts")
    assert script.value == "forecasters.command:main" and script.load() is main


def test_top_level_help_version_and_compare_help_load_neither_torch_nor_lightning() -> None:
    script = """
import json, sys
from forecasters.command import main
codes = [main(["--help"]), main(["--version"])]
try:
    main(["compare", "--help"])
except SystemExit as exc:
    codes.append(exc.code)
print("RESULT" + json.dumps({"codes": codes, "heavy": [m for m in ("torch", "lightning", "mlflow") if m in sys.modules]}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.split("RESULT")[-1]) == {"codes": [0, 0, 0], "heavy": []}
    assert "{fit,validate,test,predict,compare}" in proc.stdout and "titans-ts fit --config" in proc.stdout
    assert "titans-ts 0." in proc.stdout and "--experiment" in proc.stdout
    assert main([]) == 2  # no subcommand: the overview, and a usage error's status


def test_print_config_of_every_shipped_config(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = sorted(CONFIGS.glob("*/*.yaml"))
    runnable = [p for p in shipped if p.parent.name in DATASETS]
    assert len(runnable) == len(DATASETS) * (len(VARIANTS) + len(BASELINES)), [str(p) for p in runnable]
    for path in runnable:
        with pytest.raises(SystemExit) as exc:
            main(["fit", "--config", str(path), "--print_config"])
        assert exc.value.code in (0, None), path
        printed = capsys.readouterr().out
        assert f"variant: {path.stem}" in printed, path
        assert f"class_path: datamodules.{DATA_CLASSES[path.parent.name]}" in printed, path
        assert "monitor: val_mse" in printed and "forecasters.tracking.TitansMLFlowLogger" in printed
        assert "seed_everything: 42" in printed
    # The quick overlay stacks onto any of them.
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "etth1" / "mac.yaml"), "--config", str(CONFIGS / "quick.yaml"),
              "--print_config"])
    assert "limit_train_batches: 120" in capsys.readouterr().out


#: Settings a dataset's config chose on validation over the shared `configs/model/<model>.yaml`.
PER_DATASET_SETTINGS = {("etth1", "mac"): {"dim": 32, "weight_decay": 1.0}, ("etth1", "mal"): {"dropout": 0.5},
                        ("etth2", "lmm"): {"memory_depth": 1},
                        ("etth2", "mal"): {"linear_skip": True}, ("etth2", "mag"): {"dropout": 0.3}}


def test_a_dataset_config_differs_from_its_shared_model_file_only_where_chosen() -> None:
    import yaml

    for path in sorted(CONFIGS.glob("*/*.yaml")):
        model = yaml.safe_load(path.read_text()).get("model") if path.parent.name in DATASETS else None
        if isinstance(model, str):
            assert model == f"../model/{path.stem}.yaml", path
            model = yaml.safe_load((path.parent / model).read_text())
        if model is None:
            continue
        shared = yaml.safe_load((CONFIGS / "model" / f"{path.stem}.yaml").read_text())
        assert model.keys() == shared.keys(), path  # a copy with a key added or lost would drift
        chosen = {key: value for key, value in model.items() if shared[key] != value}
        assert chosen == PER_DATASET_SETTINGS.get((path.parent.name, path.stem), {}), path


def test_stacked_configs_and_overrides_reach_the_model(data_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  dim: 24\n  lr: 0.005\ntrainer:\n  max_epochs: 7\n")
    cli = run_cli([
        "--config", str(CONFIGS / "etth1" / "mac.yaml"), "--config", str(overlay),
        "--model.variant", "mag", "--data.horizon", "48", "--data.features", "MS", "--data.data_dir", str(data_dir),
        "--trainer.logger", "false",
    ], run=False)
    hp = cli.model.hparams
    assert (hp.variant, hp.dim, hp.lr) == ("mag", 24, 0.005)
    # Linked from the data module: one place sets the shapes.
    assert (hp.lookback, hp.horizon, hp.n_channels, hp.n_targets) == (96, 48, 7, 1)
    assert cli.model(torch.zeros(2, 96, 7)).shape == (2, 48, 1)
    assert cli.trainer.max_epochs == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.yaml"]


def test_data_module_by_short_class_name(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["--data", "ETTh1DataModule", "--data.data_dir", str(data_dir), "--data.lookback", "48",
                   "--data.horizon", "24", "--model.patch_len", "8", "--trainer.logger", "false"], run=False)
    assert type(cli.datamodule).__name__ == "ETTh1DataModule"
    assert (cli.model.hparams.lookback, cli.model.hparams.horizon, cli.model.hparams.n_channels) == (48, 24, 7)
    # Without a config the CLI's own defaults apply: early stopping and checkpointing on val_mse.
    monitors = {type(c).__name__: c.monitor for c in cli.trainer.callbacks if hasattr(c, "monitor")}
    assert monitors == {"EarlyStopping": "val_mse", "ModelCheckpoint": "val_mse"}


def test_linked_model_arguments_cannot_be_set_twice(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "etth1" / "mac.yaml"), "--model.horizon", "12", "--print_config"])
    assert "horizon" in capsys.readouterr().err


def test_compare_of_a_missing_experiment_names_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    assert main(["compare", "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no experiment 'nope'" in err and "empty.db" in err


# -- fit, test, predict ------------------------------------------------------------------------------


def test_fit_tests_the_best_checkpoint_and_prints_metrics(fits: list[Fit]) -> None:
    fit = fits[0]
    metrics = fit.cli.test_metrics
    assert set(metrics) >= {"test_mse", "test_mae"} and all(np.isfinite(v) for v in metrics.values())
    assert f"test_mse={metrics['test_mse']:.4f}" in fit.output
    assert f"mlflow ui --backend-store-uri sqlite:///{fit.workdir / 'mlflow.db'}" in fit.output
    best = Path(fit.cli.best_model_path)
    run_id = fit.cli.trainer.logger.run_id
    # Checkpoints are filed under the MLflow run: best (selected on val_mse) and last (for resuming).
    assert best.parent == fit.workdir / "checkpoints" / run_id and best.name.startswith("best-")
    assert (best.parent / "last.ckpt").is_file()


def test_same_seed_gives_the_same_metrics(fits: list[Fit]) -> None:
    first, second = (f.cli.test_metrics for f in fits)
    assert first == second
    assert fits[0].cli.trainer.logger.run_id != fits[1].cli.trainer.logger.run_id


def test_checkpoint_loads_with_weights_only(fits: list[Fit], data_dir: Path) -> None:
    path = fits[0].cli.best_model_path
    module = TitansForecastingModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    hp = dict(module.hparams)
    plain = (str, int, float, bool, type(None), list, tuple, dict)
    assert all(isinstance(v, plain) for v in hp.values()), hp
    assert (hp["n_channels"], hp["lookback"], hp["horizon"], hp["dim"]) == (7, 96, 96, 16)
    # The scaler statistics travel with the checkpoint (forecasts in original units).
    trained = fits[0].cli.model
    assert torch.equal(module.target_std, trained.target_std) and not torch.all(module.target_std == 1)
    module.eval()
    x = torch.from_numpy(np.stack([fits[0].cli.datamodule.test_dataset[i][0].numpy() for i in range(3)]))
    with torch.no_grad():
        out = module.predict_step(x, 0)
    assert out["forecast"].shape == (3, 96, 7)
    assert torch.allclose(out["forecast_original_units"], module.to_original_units(out["forecast"]))


def test_test_subcommand_reproduces_the_fit_metrics(fits: list[Fit], in_workdir: Path, data_dir: Path) -> None:
    fit = fits[0]
    cli, output = quiet_run(["test", *etth1_args(data_dir), "--ckpt_path", fit.cli.best_model_path])
    assert cli.test_metrics["test_mse"] == pytest.approx(fit.cli.test_metrics["test_mse"], rel=1e-6)
    assert "test_mse=" in output
    # Its own MLflow run, tagged as a test.
    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{in_workdir / 'mlflow.db'}").get_run(cli.trainer.logger.run_id)
    assert run.data.tags["stage"] == "test" and run.data.metrics["test_mse"] == pytest.approx(
        cli.test_metrics["test_mse"])


def test_fit_with_weight_averaging_tests_the_averaged_weights_validation_chose(data_dir: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Validation (and so the best checkpoint) sees the average; the checkpoint also keeps the raw weights.
    # The module's ema_decay and Lightning's callback on the command line are the same fit.
    results = []
    for name, averaging in [("callback", ["--trainer.callbacks+=EMAWeightAveraging", "--trainer.callbacks.decay=0.5"]),
                            ("hparam", ["--model.ema_decay=0.5"])]:
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        cli, _ = quiet_run(["fit", *etth1_args(data_dir), "--trainer.logger=false", *averaging])
        checkpoint = torch.load(cli.best_model_path, map_location="cpu", weights_only=True)
        average, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
        assert any(not torch.equal(average[key], raw[key]) for key in average)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tested, _ = quiet_run(["test", *etth1_args(data_dir), "--trainer.logger=false", "--ckpt_path",
                                   cli.best_model_path])
        assert cli.test_metrics["test_mse"] == pytest.approx(tested.test_metrics["test_mse"], rel=1e-6)
        results.append(cli.test_metrics["test_mse"])
        # Lightning asks for the callback that made the checkpoint, unless the module owns it (ema_decay).
        missing = [w for w in caught if "callbacks used to create the checkpoint" in str(w.message)]
        assert len(missing) == (1 if name == "callback" else 0)
    assert results[0] == results[1]


def test_predict_writes_forecasts(fits: list[Fit], in_workdir: Path, data_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "forecasts.npz"
    cli, output = quiet_run(["predict", *etth1_args(data_dir), "--ckpt_path", fits[0].cli.best_model_path,
                             "--predictions_path", str(target)])
    saved = np.load(target)
    assert saved["forecast"].shape == (32, 96, 7)  # 2 batches of 16 test windows
    dm = fits[0].cli.datamodule
    np.testing.assert_allclose(saved["forecast_original_units"], dm.inverse_transform(saved["forecast"]), rtol=1e-4,
                               atol=1e-3)
    assert "Predicted 32 windows" in output


# -- MLflow -----------------------------------------------------------------------------------------


def test_local_store_is_sqlite_in_the_working_directory(fits: list[Fit]) -> None:
    logger = fits[0].cli.trainer.logger
    # The default store: mlflow.db in the working directory (absolute, so MLflow's store cache is safe).
    assert logger.tracking_uri == f"sqlite:///{fits[0].workdir / 'mlflow.db'}"
    assert (fits[0].workdir / "mlflow.db").is_file()
    # Its artifacts (config, plot, model) sit next to it, in ./mlruns.
    assert (fits[0].workdir / "mlruns").is_dir()


def test_run_records_config_metrics_tags_plot_and_model(fits: list[Fit], in_workdir: Path) -> None:
    import mlflow
    import mlflow.pytorch

    cli = fits[0].cli
    store = f"sqlite:///{in_workdir / 'mlflow.db'}"
    client = mlflow.MlflowClient(store)
    run = client.get_run(cli.trainer.logger.run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "etth1-mac-L96-H96"
    # The resolved config, flattened, plus the hyperparameters Lightning logs.
    assert params["model.variant"] == "mac" and params["model.dim"] == "16"
    assert params["data.class_path"] == "datamodules.ETTh1DataModule" and params["trainer.max_epochs"] == "2"
    assert params["trainer.callbacks.0.init_args.monitor"] == "val_mse"
    assert params["n_channels"] == "7"
    assert {"test_mse", "test_mae", "val_mse", "val_mae", "train_loss_epoch", "epochs_trained"} <= set(metrics)
    assert metrics["test_mse"] == pytest.approx(cli.test_metrics["test_mse"])
    assert metrics["epochs_trained"] == 2
    history = client.get_metric_history(run.info.run_id, "val_mse")
    assert len(history) == 2 and min(m.value for m in history) == pytest.approx(metrics["best_val_mse"])
    assert {k: tags[k] for k in ("dataset", "variant", "lookback", "horizon")} == {
        "dataset": "ETTh1", "variant": "mac", "lookback": "96", "horizon": "96"}
    assert tags["git_commit"] == "unknown" or len(tags["git_commit"]) == 40
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "forecasts.png"} <= artifacts
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(in_workdir / "dl")))
    assert "class_path: datamodules.ETTh1DataModule" in config.read_text()
    png = Path(client.download_artifacts(run.info.run_id, "forecasts.png", str(in_workdir / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The best checkpoint as an MLflow model: [batch, L, C] float32 -> [batch, H, n_targets], stored as a
    # torch.export graph by the first fit and pickled by the second; any batch size goes through.
    mlflow.set_tracking_uri(store)
    x = torch.from_numpy(np.stack([cli.datamodule.test_dataset[i][0].numpy() for i in range(3)]))
    for fit in fits:
        uri = f"runs:/{fit.cli.trainer.logger.run_id}/model"
        assert fit.cli.model_uri == uri
        model = mlflow.pytorch.load_model(uri)
        best = TitansForecastingModule.load_from_checkpoint(fit.cli.best_model_path, map_location="cpu",
                                                            weights_only=True).eval()
        with torch.no_grad():
            assert torch.allclose(model(x), best(x), atol=1e-5)
            # and through MLflow's generic interface, numpy in and out, as a serving endpoint would call it
            served = mlflow.pyfunc.load_model(uri).predict(x.numpy())
            assert isinstance(served, np.ndarray) and np.allclose(served, best(x).numpy(), atol=1e-5)
        signature = mlflow.models.get_model_info(uri).signature
        assert signature.inputs.inputs[0].shape == (-1, 96, 7) and signature.outputs.inputs[0].shape == (-1, 96, 7)
    assert isinstance(model, TitansForecastingModule) and not model.training  # the pickled one


def test_compare_prints_the_runs_and_writes_a_chart(fits: list[Fit], in_workdir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    chart = in_workdir / "charts" / "runs.png"
    assert main(["compare", "--experiment", "titans-ts", "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    assert f"Experiment 'titans-ts' in sqlite:///{in_workdir / 'mlflow.db'}" in out
    header = next(line for line in out.splitlines() if "test_mse" in line and "dataset" in line)
    for column in ("dataset", "variant", "horizon", "test_mse", "test_mae", "duration_s", "dim", "epochs"):
        assert column in header
    for fit in fits:
        assert fit.cli.trainer.logger.run_id[:8] in out
        assert f"{fit.cli.test_metrics['test_mse']:.4g}" in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tracking_can_be_turned_off(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli, output = quiet_run(["fit", *etth1_args(data_dir), "--trainer.logger=false", "--trainer.max_epochs=1",
                             "--test_after_fit=false"])
    assert not (tmp_path / "mlflow.db").exists() and cli.test_metrics == {}
    assert Path(cli.best_model_path).is_file() and "MLflow" not in output


def test_resume_continues_the_run_from_last_ckpt(fits: list[Fit], in_workdir: Path, data_dir: Path) -> None:
    # Last in this file on purpose: it continues the second fit's MLflow run (two more epochs).
    first = fits[1].cli
    run_id = first.trainer.logger.run_id
    last = Path(first.best_model_path).parent / "last.ckpt"
    with pytest.warns(UserWarning, match="keeps its first value"):  # max_epochs and ckpt_path changed
        cli, _ = quiet_run(["fit", *etth1_args(data_dir), "--trainer.max_epochs=3", "--ckpt_path", str(last),
                            f"--trainer.logger.init_args.run_id={run_id}"])
    assert cli.trainer.logger.run_id == run_id and cli.trainer.current_epoch == 3
    assert Path(cli.best_model_path).parent == last.parent  # same checkpoint folder

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{in_workdir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.metrics["epochs_trained"] == 3 and run.data.params["trainer.max_epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "val_mse")][-1] > 0
    assert len(client.get_metric_history(run_id, "val_mse")) == 3
    names = {a.path for a in client.list_artifacts(run_id)}
    assert "config.yaml" in names and any(n.startswith("config-") for n in names)
