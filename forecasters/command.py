"""The ``titans-ts`` console entry point, kept light: ``titans-ts --help``, ``--version`` and
``titans-ts compare --help`` answer without importing torch or Lightning (seconds); the Lightning
subcommands load :mod:`forecasters.cli` when they run.

    titans-ts fit --config configs/etth1/mac.yaml                 # train, test the best checkpoint, log to MLflow
    titans-ts fit --config configs/etth1/mac.yaml --config configs/quick.yaml --model.variant mag --data.horizon 336
    titans-ts test --config configs/etth1/mac.yaml --ckpt_path checkpoints/<run_id>/best-....ckpt
    titans-ts fit --config configs/etth1/mac.yaml --ckpt_path last   # resume the latest fit, in its MLflow run
    titans-ts predict --config configs/etth1/mac.yaml --ckpt_path ... --predictions_path forecasts.npz
    titans-ts compare --experiment titans-ts --chart runs.png      # table (and chart) of the logged runs
    titans-ts fit --config configs/etth1/mac.yaml --print_config  # the resolved config
    mlflow ui --backend-store-uri sqlite:///mlflow.db             # browse the runs (default local store)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["DESCRIPTION", "compare_main", "main"]

DESCRIPTION = (
    "Train, evaluate and compare Titans time-series forecasters. Subcommands: fit, validate, test, predict "
    "(Lightning CLI: `titans-ts fit --help`) and compare (`titans-ts compare --help`: a table of MLflow runs)."
)

SUBCOMMANDS = {
    "fit": "train (early stopping and checkpoints on val_mse), then test the best checkpoint; logged to MLflow",
    "validate": "score a checkpoint on the validation split",
    "test": "score a checkpoint on the test split",
    "predict": "forecast the test windows with a checkpoint (--predictions_path writes them)",
    "compare": "a table (and chart) of an MLflow experiment's runs",
}


def main(args: list[str] | None = None) -> int:
    """Console entry point ``titans-ts``: ``compare`` or a Lightning subcommand; returns the exit status."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv == ["-h"] or argv == ["--help"]:
        print(_overview().format_help(), end="")
        return 0 if argv else 2
    if argv == ["--version"]:
        from importlib.metadata import version

        print(f"titans-ts {version('titans-ts')}")
        return 0
    if argv[0] == "compare":
        return compare_main(argv[1:])
    from forecasters.cli import run_cli

    # None lets LightningCLI read sys.argv itself (passing both makes it warn).
    try:
        run_cli(None if args is None else argv)
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Tear down a DDP process group before the process exits. Lightning leaves it open, and a gloo group
    still alive at interpreter exit can abort a rank (`terminate called without an active exception`),
    failing a torchrun job whose work had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _overview() -> argparse.ArgumentParser:
    """The top-level help: what each subcommand does, and examples."""
    parser = argparse.ArgumentParser(prog="titans-ts", description=DESCRIPTION,
                                     epilog="examples:\n" + __doc__.split("\n\n", 1)[1].rstrip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subcommands = parser.add_subparsers(title="subcommands", metavar="{fit,validate,test,predict,compare}")
    for name, text in SUBCOMMANDS.items():
        subcommands.add_parser(name, help=text)
    return parser


def compare_main(args: list[str] | None = None) -> int:
    """``titans-ts compare``: print a table of an experiment's runs; optionally write a chart."""
    parser = argparse.ArgumentParser(
        prog="titans-ts compare",
        description="Compare the MLflow runs of an experiment: dataset, variant, horizon, test metrics, "
                    "duration and key parameters, best test_mse first within each dataset and horizon.",
    )
    parser.add_argument("--experiment", default=None, help="MLflow experiment name (default: titans-ts)")
    parser.add_argument("--tracking_uri", default=None,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")
    parser.add_argument("--chart", type=Path, default=None, help="write a PNG bar chart of --metric per run here")
    parser.add_argument("--metric", default="test_mse", help="metric for the chart (default: %(default)s)")
    parser.add_argument("--max_runs", type=int, default=1000, help="most recent runs to include (default: %(default)s)")
    opts = parser.parse_args(args)

    import pandas as pd

    from forecasters.tracking import DEFAULT_EXPERIMENT, compare_runs, resolve_tracking_uri

    experiment = opts.experiment or DEFAULT_EXPERIMENT
    try:
        table = compare_runs(experiment, opts.tracking_uri, max_runs=opts.max_runs)
    except ValueError as exc:
        print(f"titans-ts compare: {exc}", file=sys.stderr)
        return 2
    uri = resolve_tracking_uri(opts.tracking_uri)
    print(f"Experiment {experiment!r} in {uri}: {len(table)} run(s)")
    if len(table):
        with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_rows", None):
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
    if opts.chart is not None:
        from forecasters.plots import comparison_figure

        try:
            fig = comparison_figure(table, opts.metric)
        except ValueError as exc:
            print(f"titans-ts compare: no chart: {exc}", file=sys.stderr)
            return 2
        opts.chart.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(opts.chart, dpi=100)
        print(f"Chart of {opts.metric} written to {opts.chart.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
