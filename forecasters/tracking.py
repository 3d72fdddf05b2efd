"""MLflow tracking for titans-ts: where runs are stored, the Lightning logger, and what a run records.

A run of ``titans-ts fit`` records (see :class:`TitansMLFlowLogger`):

* the resolved config, flattened as params (``model.dim``, ``trainer.max_epochs``, ...) and whole
  as the artifact ``config.yaml``; Lightning adds the model's and data module's hyperparameters;
* per-epoch ``train_loss_epoch``, ``val_loss``, ``val_mse``, ``val_mae`` and the final ``test_mse``,
  ``test_mae``;
* the best checkpoint as an MLflow model (``runs:/<run_id>/model``): a module mapping float32
  windows [batch, L, C] to point forecasts [batch, H, n_targets];
* ``forecasts.png``: forecasts against the truth on a few test windows;
* tags ``dataset``, ``variant``, ``lookback``, ``horizon``, ``git_commit``.

The store is ``$MLFLOW_TRACKING_URI`` when set, else an embedded SQLite database ``mlflow.db`` in
the working directory (MLflow 3 no longer accepts the old ``./mlruns`` file store); artifacts of
such a local store go to ``./mlruns/<experiment_id>/``. mlflow itself is imported only when a
run is started, so importing this module (and ``titans-ts --help``) stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DEFAULT_DB_FILE",
    "DEFAULT_EXPERIMENT",
    "DEFAULT_TRACKING_URI",
    "TitansMLFlowLogger",
    "check_tracking_server",
    "compare_runs",
    "dataset_name",
    "flatten_config",
    "folder_lock",
    "git_commit",
    "local_store_lock",
    "resolve_tracking_uri",
    "run_tags",
]

#: The default store: an embedded SQLite database in the working directory (made absolute when resolved).
DEFAULT_DB_FILE = "mlflow.db"
DEFAULT_TRACKING_URI = f"sqlite:///{DEFAULT_DB_FILE}"
DEFAULT_EXPERIMENT = "titans-ts"
#: MLflow's limits on one param (key and value lengths) and on one log_batch call.
_MAX_PARAM_KEY, _MAX_PARAM_VALUE, _MAX_BATCH = 250, 6000, 100


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The store to use: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the cwd.

    The default is returned with an absolute path (``sqlite:////abs/cwd/mlflow.db``): MLflow caches
    stores by URI, so a relative one would keep pointing at the first directory it was used in.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri else f"sqlite:///{Path.cwd() / DEFAULT_DB_FILE}"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (POSIX ``flock``; a no-op where that is missing).

    The folder, not a file in it, is locked: the files it guards may be replaced or created under the lock.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; callers there run unguarded, as MLflow itself does
        yield
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the lock


@contextlib.contextmanager
def local_store_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise the first use of a local SQLite store across processes; other stores pass through.

    MLflow creates and migrates a new ``sqlite:///`` database on first use, and looks up or creates the
    experiment, without a lock: several fits started at once on a fresh ``mlflow.db`` (a sweep, parallel
    benchmark workers) then fail with "table ... already exists" or a duplicate experiment.
    """
    prefix = "sqlite:///"
    location = tracking_uri[len(prefix):] if tracking_uri.startswith(prefix) else ""
    folder = Path(location).absolute().parent
    if location in ("", ":memory:") or not folder.is_dir():
        yield  # a server, another backend, or a folder MLflow will refuse with its own error
        return
    with folder_lock(folder):
        yield


#: Seconds to wait for a tracking server to answer before giving up (MLflow itself retries for minutes).
SERVER_PROBE_TIMEOUT_S = 5.0


def check_tracking_server(tracking_uri: str, timeout: float | None = None) -> None:
    """For an ``http(s)://`` store, fail fast with a clear ConnectionError when nothing answers there.

    Waits ``timeout`` seconds at most (default :data:`SERVER_PROBE_TIMEOUT_S`). Any HTTP answer (even
    an error status) counts as reachable; other stores are not probed.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    timeout = SERVER_PROBE_TIMEOUT_S if timeout is None else timeout
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # the server answered
    except (OSError, ValueError) as exc:  # URLError, refused, timeout, bad host
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(
            f"the MLflow tracking server {tracking_uri} is unreachable ({reason}); start it (mlflow server "
            "--backend-store-uri sqlite:///mlflow.db --port <port>), fix the URI (--trainer.logger.init_args."
            "tracking_uri or $MLFLOW_TRACKING_URI), or turn tracking off with --trainer.logger false"
        ) from exc


def git_commit(path: str | os.PathLike[str] | None = None) -> str:
    """The commit of the git checkout holding ``path`` (default: this package's source), or "unknown"."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "unknown"


def dataset_name(datamodule: LightningDataModule | None) -> str:
    """A short dataset name: the benchmark's ``name``, a CSV's file stem, else the class name."""
    if datamodule is None:
        return "unknown"
    name = getattr(type(datamodule), "name", None)
    if isinstance(name, str):
        return name
    path = getattr(datamodule, "path", None)
    if isinstance(path, (str, os.PathLike)):
        return Path(path).stem
    return type(datamodule).__name__


def run_tags(model: LightningModule, datamodule: LightningDataModule | None) -> dict[str, str]:
    """Tags that identify a run in comparisons: dataset, variant, lookback, horizon and git commit."""
    hp = model.hparams
    commit = git_commit()
    return {
        "dataset": dataset_name(datamodule),
        "variant": str(hp.get("variant", "unknown")),
        "lookback": str(hp.get("lookback", getattr(datamodule, "lookback", "unknown"))),
        "horizon": str(hp.get("horizon", getattr(datamodule, "horizon", "unknown"))),
        "git_commit": commit,
        # MLflow's own key for the commit, so the UI shows it in the run's source column.
        "mlflow.source.git.commit": commit,
    }


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.0.c": "value"}: dicts by key, lists by index, leaves as strings."""
    flat: dict[str, str] = {}

    def visit(value: Any, key: str) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                visit(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)) and value and any(isinstance(v, (Mapping, list, tuple)) for v in value):
            for i, v in enumerate(value):
                visit(v, f"{key}.{i}")
        else:
            flat[key] = str(list(value) if isinstance(value, tuple) else value)

    visit(config, prefix)
    return flat


class TitansMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with titans-ts defaults and the extra records of a forecasting run.

    Unlike the parent class the store is resolved when the logger is created (not when Lightning is
    imported): ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the working directory.

    Args:
        experiment_name: MLflow experiment (created when missing).
        run_name: run name; default ``<dataset>-<variant>-L<lookback>-H<horizon>``.
        tracking_uri: MLflow store URI (``sqlite:///...``, ``http://host:port``, ...); default
            ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the working directory.
        tags: extra run tags.
        artifact_location: artifact root of a newly created experiment (default: the store's choice).
        run_id: continue this existing run instead of starting a new one (e.g. when resuming a fit).
        log_forecast_model: log the best checkpoint as an MLflow model after fit.
        model_format: how that model is stored: ``"pickle"`` (any configuration; loading needs this
            package installed) or ``"pt2"`` (a ``torch.export`` graph: pickle-free and loadable without
            titans-ts, but slower to log and impossible for ``loss="quantile"``, whose median pick is
            data-dependent).
        plot_windows: number of test windows in ``forecasts.png`` (0: no plot).
        synchronous: block on every logging call (MLflow's ``synchronous``; default: MLflow's).
    """

    def __init__(
        self,
        experiment_name: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, str] | None = None,
        artifact_location: str | None = None,
        run_id: str | None = None,
        log_forecast_model: bool = True,
        model_format: Literal["pickle", "pt2"] = "pickle",
        plot_windows: int = 4,
        synchronous: bool | None = None,
    ) -> None:
        if plot_windows < 0:
            raise ValueError(f"plot_windows must be >= 0, got {plot_windows}")
        if model_format not in ("pickle", "pt2"):
            raise ValueError(f"model_format must be 'pickle' or 'pt2', got {model_format!r}")
        tracking_uri = resolve_tracking_uri(tracking_uri)
        with local_store_lock(tracking_uri):  # the parent's MlflowClient creates a fresh store
            super().__init__(
                experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                tags=dict(tags) if tags else None, artifact_location=artifact_location, run_id=run_id,
                log_model=False, synchronous=synchronous,
            )
        self.log_forecast_model = log_forecast_model
        self.model_format = model_format
        self.plot_windows = plot_windows
        self._failure_logged = False
        self._server_checked = False

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment's name."""
        return self._experiment_name

    @property
    def tracking_uri(self) -> str:
        """The MLflow store this logger writes to."""
        return self._tracking_uri

    @property
    def experiment(self) -> Any:
        """The MLflow client; the first use checks that an ``http(s)://`` server answers (see :func:`check_tracking_server`)."""
        if not self._server_checked and rank_zero_only.rank == 0:
            check_tracking_server(self._tracking_uri)
            self._server_checked = True
        # The first use finds or creates the experiment, then the run.
        lock = contextlib.nullcontext() if self._initialized else local_store_lock(self._tracking_uri)
        with lock, _tracking_env_kept():
            return super().experiment

    def finalize(self, status: str = "success") -> None:
        """End the run. On ``"failed"`` (Lightning's status when a trainer call raises) the exception being
        handled is recorded first: see :meth:`log_failure`."""
        if status == "failed" and self._initialized:
            self.log_failure(sys.exc_info()[1])
        super().finalize(status)

    def log_failure(self, error: BaseException | None) -> None:
        """Record why the run failed: the tag ``error`` (type and message) and the artifact ``traceback.txt``.

        Once per run; a store that cannot be written to only gets a warning, so the original error is the
        one that surfaces.
        """
        if error is None or self._failure_logged or not self._initialized:
            return
        self._failure_logged = True
        try:
            self.experiment.set_tag(self.run_id, "error", f"{type(error).__name__}: {error}"[:_MAX_PARAM_VALUE])
            self.experiment.log_text(self.run_id, "".join(traceback.format_exception(error)), "traceback.txt")
        except Exception as exc:  # noqa: BLE001 - never mask the training error
            rank_zero_warn(f"could not record the failure in MLflow run {self.run_id}: {exc}")

    @property
    def started(self) -> bool:
        """Whether the MLflow run exists yet (it is created lazily, on first use)."""
        return self._initialized

    def start(self, tags: Mapping[str, str], run_name: str | None = None) -> str:
        """Create (or reopen) the run with ``tags``; a ``run_name`` applies when none was configured."""
        if not self._initialized:
            if self._run_name is None and self._run_id is None:
                self._run_name = run_name
            self.tags = {**(self.tags or {}), **tags}
            return str(self.run_id)
        from mlflow.entities import RunTag

        self.experiment.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return str(self.run_id)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        """Log hyperparameters as params (flattened); see :meth:`log_params_dict` for values already set."""
        flat = _flatten_dict(_convert_params(params))
        self.log_params_dict({k: str(v) for k, v in flat.items()})

    def log_params_dict(self, params: Mapping[str, str]) -> list[str]:
        """Log string params (clipped to MLflow's limits) that the run does not have yet; returns changed keys.

        MLflow params are immutable: a continued run (``run_id=...``, e.g. resuming a fit) keeps the
        first value of a param. A different new value is not logged but reported with a warning, so
        resuming with, say, a longer ``max_epochs`` does not fail.
        """
        from mlflow.entities import Param

        clipped = {k[:_MAX_PARAM_KEY]: v[:_MAX_PARAM_VALUE] for k, v in params.items()}
        existing = self.experiment.get_run(self.run_id).data.params
        changed = sorted(k for k, v in clipped.items() if k in existing and existing[k] != v)
        if changed:
            shown = ", ".join(f"{k}: {existing[k]!r} -> {clipped[k]!r}" for k in changed[:5])
            rank_zero_warn(f"MLflow run {self.run_id} keeps its first value of {len(changed)} param(s) that changed "
                           f"({shown}{', ...' if len(changed) > 5 else ''}); the new values are in its config files")
        items = [Param(k, v) for k, v in clipped.items() if k not in existing]
        for i in range(0, len(items), _MAX_BATCH):
            self.experiment.log_batch(self.run_id, params=items[i : i + _MAX_BATCH], **self._log_batch_kwargs)
        return changed

    def log_config(self, config: Mapping[str, Any], config_yaml: str) -> None:
        """Log the resolved config: flattened as params and whole as ``config.yaml``.

        When the run already has a ``config.yaml`` (a continued run) the new one is added as
        ``config-<UTC time>.yaml`` instead of replacing it.
        """
        self.log_params_dict(flatten_config(config))
        name = "config.yaml"
        if any(a.path == name for a in self.experiment.list_artifacts(self.run_id)):
            name = f"config-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.yaml"
        self.experiment.log_text(self.run_id, config_yaml, name)

    def log_forecaster(self, module: LightningModule, datamodule: LightningDataModule | None) -> str | None:
        """Log ``module`` as the run's MLflow model and a forecast plot; returns the model URI (or None).

        ``module`` must map [batch, L, C] float32 windows to [batch, H, n_targets] (TitansForecastingModule
        does); it is logged in eval mode on the CPU. Sample windows come from the data module's test split.
        """
        module = module.to("cpu").eval()
        windows = _test_windows(datamodule, max(self.plot_windows, 2))
        if windows is None:
            hp = module.hparams
            x = torch.zeros(2, int(hp["lookback"]), int(hp["n_channels"]))
            y, indices = None, []
        else:
            x, y, indices = windows
        with torch.no_grad():
            forecast = module(x)
        uri = None
        if self.log_forecast_model:
            # Two windows: torch.export (pt2) treats a batch of one as a fixed size.
            uri = self._log_pytorch_model(module, x[:2].numpy(), forecast[:2].numpy())
        if self.plot_windows and y is not None:
            n = self.plot_windows
            self._log_forecast_plot(module, datamodule, x[:n], y[:n], forecast[:n], indices[:n])
        return uri

    def _log_pytorch_model(self, module: LightningModule, x: np.ndarray, forecast: np.ndarray) -> str:
        import mlflow.pytorch
        from mlflow.models import infer_signature

        import lightning

        signature = infer_signature(x, forecast)
        # Explicit requirements: MLflow would otherwise infer them by re-importing the model in a subprocess.
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"lightning=={lightning.__version__}"]
        # The fluent API logs to the global store; Lightning's MLFlowLogger has already pointed it here.
        with _tracking_env_kept():
            mlflow.set_tracking_uri(self.tracking_uri)
        active = mlflow.active_run()
        # The run must be the active one (not just passed as run_id): MLflow 3 files the model under the
        # active run's experiment, and runs:/<id>/model only resolves from there. Ending it marks it
        # FINISHED, as Lightning's finalize does anyway.
        run = (contextlib.nullcontext() if active is not None and active.info.run_id == self.run_id
               else mlflow.start_run(run_id=self.run_id, nested=active is not None))
        with run:
            mlflow.pytorch.log_model(
                module, name="model", signature=signature, input_example=x, pip_requirements=requirements,
                serialization_format=self.model_format,
            )
        return f"runs:/{self.run_id}/model"

    def _log_forecast_plot(self, module: LightningModule, datamodule: LightningDataModule | None, x: torch.Tensor,
                           y: torch.Tensor, forecast: torch.Tensor, indices: list[int]) -> None:
        from forecasters.plots import forecast_figure

        names = list(getattr(datamodule, "target_names", []) or [])
        inverse = getattr(datamodule, "inverse_transform", None)
        history, truth, pred = x.numpy(), y.numpy(), forecast.numpy()
        if callable(inverse):
            # Plot in the data's own units; the model scores on the scaled data.
            history, truth, pred = inverse(history), inverse(truth), inverse(pred)
        n_targets = truth.shape[-1]
        target_in_x = history.shape[-1] - 1  # channels are ordered with the target last
        fig = forecast_figure(
            history[..., target_in_x], truth[..., -1], pred[..., -1], window_indices=indices,
            title=f"{dataset_name(datamodule)} {module.hparams.get('variant', '')} "
                  f"L={history.shape[1]} H={truth.shape[1]}: test forecasts",
            channel=str(names[-1]) if len(names) == n_targets and names else "target",
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "forecasts.png"
            fig.savefig(path, dpi=100)
            self.experiment.log_artifact(self.run_id, str(path))


@contextlib.contextmanager
def _tracking_env_kept() -> Iterator[None]:
    """Undo the ``MLFLOW_TRACKING_URI`` export of ``mlflow.set_tracking_uri`` (which Lightning's logger calls).

    Left exported, it would send every later run of this process to this store: a second fit started
    in another folder would not get that folder's ``mlflow.db``.
    """
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def _test_windows(datamodule: LightningDataModule | None, n: int) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
    """``n`` evenly spaced (x, y) test windows of ``datamodule`` stacked, with their indices; None if unavailable."""
    if datamodule is None or not hasattr(datamodule, "test_dataset"):
        return None  # not a window data module: nothing to sample or plot
    if datamodule.test_dataset is None:
        datamodule.setup("test")
    dataset = datamodule.test_dataset
    if dataset is None or len(dataset) == 0:
        return None
    indices = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, num=min(n, len(dataset)))})
    items = [dataset[i] for i in indices]
    x = torch.stack([torch.as_tensor(item[0], dtype=torch.float32) for item in items])
    y = torch.stack([torch.as_tensor(item[1], dtype=torch.float32) for item in items])
    return x, y, indices


# Columns of the comparison table: (title, MLflow column candidates in order of preference).
_COMPARE_COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("dataset", ("tags.dataset",)),
    ("variant", ("tags.variant",)),
    ("stage", ("tags.stage",)),
    ("lookback", ("tags.lookback", "params.lookback")),
    ("horizon", ("tags.horizon", "params.horizon")),
    ("test_mse", ("metrics.test_mse",)),
    ("test_mae", ("metrics.test_mae",)),
    ("val_mse", ("metrics.best_val_mse", "metrics.val_mse")),
    ("dim", ("params.model.dim", "params.dim")),
    ("n_layers", ("params.model.n_layers", "params.n_layers")),
    ("lr", ("params.model.lr", "params.lr")),
    ("batch_size", ("params.data.init_args.batch_size", "params.batch_size")),
    ("epochs", ("metrics.epochs_trained",)),
    ("duration_s", ("duration_s",)),
]


def compare_runs(experiment: str = DEFAULT_EXPERIMENT, tracking_uri: str | None = None,
                 max_runs: int = 1000) -> pd.DataFrame:
    """One row per run of ``experiment``: dataset, variant, L, H, test/val metrics, key params, duration.

    Sorted by dataset, horizon and test_mse; ``val_mse`` is the best validation MSE, ``epochs`` the
    number of epochs trained and ``duration_s`` the wall time from the run's start to its end.
    Raises ``ValueError`` naming the store when the experiment does not exist.
    """
    import mlflow
    import pandas as pd

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri)
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no experiment {experiment!r} in the MLflow store {uri}; experiments there: {names}. "
                         "Pass --experiment NAME or --tracking_uri URI (or set MLFLOW_TRACKING_URI)")
    runs = client.search_runs([found.experiment_id], max_results=max_runs, order_by=["attributes.start_time DESC"])
    rows = []
    for run in runs:
        info, data = run.info, run.data
        row: dict[str, Any] = {"run_id": info.run_id[:8], "run_name": info.run_name, "status": info.status}
        row |= {f"tags.{k}": v for k, v in data.tags.items()}
        row |= {f"params.{k}": v for k, v in data.params.items()}
        row |= {f"metrics.{k}": v for k, v in data.metrics.items()}
        ended = info.end_time if info.end_time else None
        row["duration_s"] = round((ended - info.start_time) / 1000, 1) if ended and info.start_time else None
        rows.append(row)
    raw = pd.DataFrame(rows)
    table = pd.DataFrame({"run_id": raw.get("run_id", pd.Series(dtype=str)), "run_name": raw.get("run_name")})
    for title, candidates in _COMPARE_COLUMNS:
        column = next((c for c in candidates if c in raw.columns), None)
        table[title] = raw[column] if column is not None else None
    for numeric in ("lookback", "horizon", "dim", "n_layers", "batch_size", "lr", "test_mse", "test_mae", "val_mse",
                    "epochs", "duration_s"):
        table[numeric] = pd.to_numeric(table[numeric], errors="coerce")
    table["status"] = raw.get("status")
    return table.sort_values(["dataset", "horizon", "test_mse"], na_position="last", kind="stable").reset_index(drop=True)
