"""The Lightning side of the ``titans-ts`` command: LightningCLI for TitansForecastingModule, with MLflow
tracking. The console entry point and the examples are in :mod:`forecasters.command`.

The model class is fixed; the data module is any LightningDataModule (``--data ETTh1DataModule`` or
``class_path: datamodules.ETTh1DataModule``) exposing ``n_channels``, ``n_targets``, ``lookback`` and
``horizon``, which are linked into the model. Defaults: MLflow logging (:mod:`forecasters.tracking`),
early stopping and best-checkpoint selection on ``val_mse`` (plus ``last.ckpt`` for resuming with
``--ckpt_path``), ``seed_everything: 42``; ``fit`` tests the best checkpoint when it ends.

Nothing heavy is imported at module level beyond Lightning itself: mlflow is imported when a run
starts, matplotlib when a figure is drawn.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

# Imported so that short names resolve: --data ETTh1DataModule (jsonargparse knows imported subclasses).
import datamodules  # noqa: F401
from forecasters.checkpointing import LAST_CHECKPOINT, find_last_checkpoint, read_checkpoint, use_atomic_checkpoints
from forecasters.command import DESCRIPTION, compare_main, main  # noqa: F401 - main and compare_main re-exported
from forecasters.module import TitansForecastingModule
from forecasters.tracking import DEFAULT_EXPERIMENT, TitansMLFlowLogger, dataset_name, run_tags
from forecasters.validation import check_checkpoint_fits

__all__ = ["MLflowSaveConfigCallback", "TitansCLI", "compare_main", "main", "run_cli"]


#: Properties of the data module that fix the model's shapes (linked, so they are set in one place).
LINKED_FROM_DATA = ("n_channels", "n_targets", "lookback", "horizon")

#: Defaults of every subcommand; a config or the command line replaces them
#: (``--trainer.logger false`` turns MLflow off, ``--trainer.callbacks+=...`` appends a callback).
DEFAULT_CALLBACKS: list[dict[str, Any]] = [
    {
        "class_path": "lightning.pytorch.callbacks.EarlyStopping",
        "init_args": {"monitor": "val_mse", "mode": "min", "patience": 3},
    },
    {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "monitor": "val_mse", "mode": "min", "save_top_k": 1, "save_last": True,
            "filename": "best-{epoch:02d}-{val_mse:.4f}",
        },
    },
]
DEFAULT_LOGGER: dict[str, Any] = {
    "class_path": "forecasters.tracking.TitansMLFlowLogger",
    "init_args": {"experiment_name": DEFAULT_EXPERIMENT},
}


class MLflowSaveConfigCallback(SaveConfigCallback):
    """Logs the resolved config to the MLflow run (params + ``config.yaml``) instead of writing it to disk.

    Writing ``config.yaml`` to the log dir, LightningCLI's default, would put it in the working
    directory (an MLflow logger on a database or server has no local log dir) and clash between runs.
    """

    def __init__(self, parser: LightningArgumentParser, config: Any, config_filename: str = "config.yaml",
                 overwrite: bool = False, multifile: bool = False, save_to_log_dir: bool = False) -> None:
        super().__init__(parser, config, config_filename=config_filename, overwrite=overwrite,
                         multifile=multifile, save_to_log_dir=save_to_log_dir)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TitansMLFlowLogger)]
        if not loggers:
            return
        text = self.parser.dump(self.config, skip_none=False)
        config = yaml.safe_load(text)
        for logger in loggers:
            logger.log_config(config, text)


class TitansCLI(LightningCLI):
    """LightningCLI with TitansForecastingModule, any data module, MLflow defaults and a test after fit.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``), or a dict / Namespace config.
        run: run the subcommand (``False``: only parse and instantiate, without subcommands).
        **kwargs: further LightningCLI arguments (e.g. ``parser_kwargs``).

    After ``fit`` (and ``test``) the metrics of the final test are in ``test_metrics`` (after
    ``validate``: ``val_metrics``); after ``fit`` the best checkpoint is ``best_model_path`` and the
    logged MLflow model ``model_uri``; after ``predict`` the raw outputs are in ``predictions``.
    """

    def __init__(self, args: list[str] | dict[str, Any] | None = None, run: bool = True, **kwargs: Any) -> None:
        self.test_metrics: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}
        self.best_model_path: str | None = None
        self.model_uri: str | None = None
        self.predictions: list[Any] | None = None
        parser_kwargs = {"description": DESCRIPTION, **kwargs.pop("parser_kwargs", {})}
        kwargs.setdefault("seed_everything_default", 42)
        super().__init__(
            model_class=TitansForecastingModule,
            datamodule_class=LightningDataModule,
            subclass_mode_data=True,
            save_config_callback=MLflowSaveConfigCallback,
            # The module configures its own AdamW + cosine schedule from its hyperparameters.
            auto_configure_optimizers=False,
            parser_kwargs=parser_kwargs,
            args=args,
            run=run,
            **kwargs,
        )

    # --- parser ------------------------------------------------------------------------------
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED_FROM_DATA:
            # On instantiate: n_channels and n_targets are properties known once the data module exists.
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.set_defaults({"trainer.logger": DEFAULT_LOGGER, "trainer.callbacks": DEFAULT_CALLBACKS})

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        # Options of one subcommand only (add_arguments_to_parser would add them to all of them).
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            parser.add_argument("--test_after_fit", type=bool, default=True,
                                help="Test the best checkpoint when training ends (and log test_mse/test_mae).")
        if subcommand == "predict":
            parser.add_argument("--predictions_path", type=str | None, default=None,
                                help="Write the forecasts (scaled and in original units) to this .npz file.")
        return parser

    def _parse_ckpt_path(self) -> None:
        # LightningCLI re-reads the model's hyperparameters from --ckpt_path; the linked ones come from
        # the data module and must not be given twice, so drop them from what the checkpoint offers.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path == "last":
            ckpt_path = self._resolve_last_checkpoint(subcommand)
        if not ckpt_path or ckpt_path in ("best", "last", "hpc") or "://" in str(ckpt_path):
            return  # left to Lightning
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"no checkpoint file at --ckpt_path {ckpt_path}; pass a .ckpt written by `titans-ts "
                                    "fit` (under checkpoints/<run_id>/) or --ckpt_path last to resume the latest fit")
        hparams = read_checkpoint(ckpt_path).get("hyper_parameters") or {}
        hparams = {k: v for k, v in hparams.items() if k not in LINKED_FROM_DATA and not k.startswith("_")}
        unknown = sorted(set(hparams) - set(inspect.signature(TitansForecastingModule.__init__).parameters))
        if unknown:
            raise ValueError(f"{ckpt_path} is a checkpoint of another model: its hyperparameters {unknown[:5]} are not "
                             "TitansForecastingModule's; pass a checkpoint written by `titans-ts fit`")
        if hparams:
            try:
                self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
            except SystemExit:
                sys.stderr.write(f"The hyperparameters stored in {ckpt_path} do not fit this model's arguments.\n")
                raise

    def _resolve_last_checkpoint(self, subcommand: str) -> str | None:
        """``--ckpt_path last``: ``checkpoints/<run_id>/last.ckpt`` of the given or the most recent run.

        A fit resumed this way continues that MLflow run (its id names the folder). Without the MLflow
        logger, or with a ModelCheckpoint writing to a folder of its own, Lightning resolves "last" itself.
        """
        config = self.config[subcommand]
        logger = config.trainer.get("logger")
        ours = isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("TitansMLFlowLogger")
        own_folder = any(isinstance(c, Namespace) and c.get("init_args") is not None and c.init_args.get("dirpath")
                         for c in config.trainer.get("callbacks") or [])
        if not ours or own_folder:
            return "last"
        run_id = logger.init_args.get("run_id")
        root = Path(config.trainer.get("default_root_dir") or Path.cwd())
        path = find_last_checkpoint(root, run_id)
        if path is None:
            where = root / "checkpoints" / (run_id or "*") / LAST_CHECKPOINT
            if subcommand != "fit":
                raise FileNotFoundError(f"--ckpt_path last: no {where}; pass the checkpoint's path instead")
            warnings.warn(f"--ckpt_path last: no {where} yet, so this fit starts from scratch")
            config.ckpt_path = None
            return None
        config.ckpt_path = str(path)
        if subcommand == "fit" and run_id is None:
            logger.init_args.run_id = path.parent.name  # resume in the same MLflow run
        print(f"Resuming from {path}" if subcommand == "fit" else f"Using {path}", flush=True)
        return str(path)

    # --- helpers -----------------------------------------------------------------------------
    def _mlflow_logger(self) -> TitansMLFlowLogger | None:
        return next((lg for lg in self.trainer.loggers if isinstance(lg, TitansMLFlowLogger)), None)

    def _start_run(self, stage: str) -> TitansMLFlowLogger | None:
        """Create the MLflow run now, with its tags, so checkpoints can be filed under its id."""
        self._check_checkpoint()  # a checkpoint that cannot load fails here, before a run exists
        logger = self._mlflow_logger()
        if logger is None or not self.trainer.is_global_zero:
            return logger
        pt2_quantile = logger.model_format == "pt2" and self.model.hparams.get("loss") == "quantile"
        if stage == "fit" and logger.log_forecast_model and pt2_quantile:
            # Found out now rather than after training: torch.export cannot trace the median pick.
            raise ValueError("model_format='pt2' cannot export a model trained with loss='quantile'; set "
                             "--trainer.logger.init_args.model_format=pickle")
        tags = {**run_tags(self.model, self.datamodule), "stage": stage}
        hp = self.model.hparams
        name = f"{tags['dataset'].lower()}-{hp.get('variant')}-L{hp.get('lookback')}-H{hp.get('horizon')}"
        logger.start(tags, run_name=name if stage == "fit" else f"{name}-{stage}")
        # A database or server store has no local folder, where Lightning would put checkpoints: file
        # them under checkpoints/<run_id>. Evaluation stages write none; pointing them at the folder of
        # the checkpoint they load keeps Lightning from inventing (and warning about) another one.
        ckpt_path = self._option("ckpt_path", None)
        folder = (Path(self.trainer.default_root_dir) / "checkpoints" / str(logger.run_id)
                  if stage == "fit" or not ckpt_path or not Path(ckpt_path).is_file() else Path(ckpt_path).parent)
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(folder.resolve())
        return logger

    def _option(self, key: str, default: Any) -> Any:
        return self.config.get(str(self.subcommand), self.config).get(key, default)

    def _check_checkpoint(self) -> None:
        ckpt_path = self._option("ckpt_path", None)
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_fits(read_checkpoint(ckpt_path), self.model.hparams, set(self.model.state_dict()),
                                  source=str(ckpt_path))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer, writing checkpoints atomically (see :mod:`forecasters.checkpointing`)."""
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            # Lightning marks the run FAILED for errors inside trainer calls; this also covers the CLI's own
            # steps (e.g. logging the model after fit). The logger reads the exception being handled.
            logger = self._mlflow_logger()
            if logger is not None and logger.started and self.trainer.is_global_zero:
                logger.finalize("failed")
            raise

    # --- subcommand hooks ----------------------------------------------------------------------
    def before_fit(self) -> None:
        self._start_run("fit")

    def after_fit(self) -> None:
        callback = self.trainer.checkpoint_callback
        best = callback.best_model_path if isinstance(callback, ModelCheckpoint) else ""
        self.best_model_path = best or None
        if self._option("test_after_fit", True) and not self.trainer.interrupted:
            if best and any(isinstance(c, WeightAveraging) for c in self.trainer.callbacks):
                # Validation, hence "best", judged the averaged weights, which the file's state_dict holds; Lightning's
                # WeightAveraging would load the file's raw (unaveraged) weights into this fit's trainer instead.
                self.model.load_state_dict(read_checkpoint(best)["state_dict"])
                self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=None)
            else:
                self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)
            self.test_metrics = _metrics(self.trainer, "test_")
        logger = self._mlflow_logger()
        if logger is not None and self.trainer.is_global_zero:
            summary = {"epochs_trained": float(self.trainer.current_epoch)}
            if isinstance(callback, ModelCheckpoint) and callback.best_model_score is not None:
                summary[f"best_{callback.monitor}"] = float(callback.best_model_score)
            logger.log_metrics(summary, step=self.trainer.global_step)
            module = (TitansForecastingModule.load_from_checkpoint(best, map_location="cpu", weights_only=True)
                      if best else self.model)
            self.model_uri = logger.log_forecaster(module, self.datamodule)
            logger.finalize("success")
        self._report("fit", logger)

    def before_validate(self) -> None:
        self._start_run("validate")

    def after_validate(self) -> None:
        self.val_metrics = _metrics(self.trainer, "val_")
        self._report("validate", self._mlflow_logger())

    def before_test(self) -> None:
        self._start_run("test")

    def after_test(self) -> None:
        self.test_metrics = _metrics(self.trainer, "test_")
        self._report("test", self._mlflow_logger())

    def before_predict(self) -> None:
        self._start_run("predict")

    def predict(self, **kwargs: Any) -> None:
        """Trainer.predict, keeping the forecasts (LightningCLI drops what a subcommand returns)."""
        self.predictions = self.trainer.predict(**kwargs)

    def after_predict(self) -> None:
        import numpy as np
        import torch

        if not self.predictions:
            return
        arrays = {key: torch.cat([p[key] for p in self.predictions]).numpy() for key in self.predictions[0]}
        path = self._option("predictions_path", None)
        print(f"Predicted {len(next(iter(arrays.values())))} windows: "
              + ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items()))
        if path:
            np.savez(path, **arrays)
            print(f"Forecasts written to {Path(path).resolve()}")
            logger = self._mlflow_logger()
            if logger is not None:
                logger.experiment.log_artifact(logger.run_id, path)

    def _report(self, stage: str, logger: TitansMLFlowLogger | None) -> None:
        """Print the outcome: test metrics, where the checkpoint and the MLflow run are, how to look at them."""
        if not self.trainer.is_global_zero:
            return
        lines = [""]
        if stage == "validate" and self.val_metrics:
            metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(self.val_metrics.items()))
            lines.append(f"{dataset_name(self.datamodule)} {self.model.hparams.get('variant')} validation: {metrics}")
        if self.test_metrics:
            source = f"best checkpoint {self.best_model_path}" if stage == "fit" and self.best_model_path else stage
            metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(self.test_metrics.items()))
            lines.append(f"{dataset_name(self.datamodule)} {self.model.hparams.get('variant')} "
                         f"L={self.model.hparams.get('lookback')} H={self.model.hparams.get('horizon')} "
                         f"test ({source}): {metrics}")
        elif stage == "fit" and self.best_model_path:
            lines.append(f"Best checkpoint: {self.best_model_path}")
        if logger is not None and logger.started:
            uri = logger.tracking_uri
            lines.append(f"MLflow run {logger.run_id} (experiment {logger.experiment_name!r}) in {uri}")
            if self.model_uri:
                lines.append(f"  model: {self.model_uri}  (mlflow.pytorch.load_model)")
            lines.append(f"  compare runs: titans-ts compare --experiment {logger.experiment_name}")
            if uri.startswith(("http://", "https://")):
                lines.append(f"  UI: open {uri}")
            else:
                lines.append(f"  UI: mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")
        print("\n".join(lines), flush=True)


def _metrics(trainer: Trainer, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


def run_cli(args: list[str] | None = None, **kwargs: Any) -> TitansCLI:
    """Run a Lightning subcommand (fit, validate, test, predict) and return the CLI object.

    ``args`` replaces ``sys.argv[1:]`` (e.g. ``run_cli(["fit", "--config", "configs/etth1/mac.yaml"])``).
    """
    if args is None:
        return TitansCLI(args=None, **kwargs)
    with warnings.catch_warnings():
        # Explicit args while sys.argv has its own (pytest, notebooks) is this function's purpose.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return TitansCLI(args=args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
