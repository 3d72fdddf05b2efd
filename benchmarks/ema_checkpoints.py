"""Weight averaging: the averaged weights of a checkpoint against the raw weights of the same step.

    .venv/bin/python benchmarks/ema_checkpoints.py --runs benchmarks/results/studies/ema_0.998.json \
        --workdir WORKDIR --models mag --horizons 720      # 3 checkpoints, 36 s here, idle
    .venv/bin/python benchmarks/ema_checkpoints.py --quick --runs RECORDS --workdir DIR  # smoke pass (its test, tiny model: 8.8 s)

A run of ``benchmarks/accuracy.py`` with Lightning's ``EMAWeightAveraging`` callback (``--set
trainer.callbacks+=EMAWeightAveraging``) validates and checkpoints the average of the weights. Its best
checkpoint (``<workdir>/checkpoints/<run id>/best-*.ckpt``, the ``--workdir`` the study ran with) holds
the average as ``state_dict`` and the raw weights of the same step as ``current_model_state``. The
average does not change the training path, so the raw weights are those a plain run of the same
seed had at that step. Each set is scored with ``titans-ts validate`` and ``titans-ts test`` on the
run's dataset, lookback and horizon: how much of a change in test MSE is the averaging's, and
whether validation sees it.

Writes ``benchmarks/results/studies/ema_checkpoints.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICK_LIMITS = ["--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2"]


def score(checkpoint: Path, record: dict[str, Any], data_dir: Path, quick: bool) -> dict[str, float]:
    """val_mse and test_mse of a checkpoint under the run's own config, lookback and horizon."""
    from forecasters.cli import run_cli

    scores = {}
    for stage, key in (("validate", "val_mse"), ("test", "test_mse")):
        args = [stage, "--config", str(ROOT / "configs" / record["dataset"] / f"{record['model']}.yaml"),
                f"--data.init_args.data_dir={data_dir}", f"--data.init_args.lookback={record.get('lookback', 96)}",
                f"--data.init_args.horizon={record['horizon']}", "--ckpt_path", str(checkpoint),
                "--trainer.logger=false", "--trainer.enable_progress_bar=false", *(QUICK_LIMITS if quick else [])]
        with contextlib.redirect_stdout(io.StringIO()):
            cli = run_cli(args)
        scores[key] = (cli.val_metrics if stage == "validate" else cli.test_metrics)[key]
    return scores


def compare(record: dict[str, Any], workdir: Path, data_dir: Path, quick: bool) -> dict[str, Any]:
    import torch

    (best,) = (workdir / "checkpoints" / record["mlflow_run_id"]).glob("best-*.ckpt")
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    if "current_model_state" not in checkpoint:
        raise SystemExit(f"{best} holds no raw weights (current_model_state): it was not trained with weight averaging")
    raw = {k: v for k, v in checkpoint.items() if k not in ("current_model_state", "averaging_state")}
    raw["state_dict"] = checkpoint["current_model_state"]
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / best.name
        torch.save(raw, raw_path)
        raw_scores = score(raw_path, record, data_dir, quick)
    average_scores = score(best, record, data_dir, quick)
    keys = ("dataset", "model", "lookback", "horizon", "seed", "mlflow_run_id")
    return {**{k: record.get(k) for k in keys}, "checkpoint": best.name,
            "average": average_scores, "raw": raw_scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="accuracy records (JSON) of weight-averaged runs")
    parser.add_argument("--workdir", type=Path, required=True, help="the --workdir the runs were made in")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--horizons", nargs="+", type=int, default=None)
    parser.add_argument("--data_dir", type=Path, default=ROOT.parent / "shared" / "data" / "ETT-small")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "studies" / "ema_checkpoints.json")
    parser.add_argument("--quick", action="store_true", help="smoke pass: 2 batches of val and test")
    args = parser.parse_args()

    records = [r for r in json.loads(args.runs.read_text())
               if (args.models is None or r["model"] in args.models)
               and (args.horizons is None or r["horizon"] in args.horizons)]
    if not records:
        raise SystemExit(f"no records in {args.runs} for models {args.models}, horizons {args.horizons}")
    results = []
    for record in sorted(records, key=lambda r: (r["dataset"], r["model"], r["horizon"], r["seed"])):
        result = compare(record, args.workdir, args.data_dir, args.quick)
        results.append(result)
        print(f"{result['dataset']} {result['model']} H={result['horizon']} seed {result['seed']} ({result['checkpoint']}): "
              f"average val {result['average']['val_mse']:.4f} test {result['average']['test_mse']:.4f}, "
              f"raw val {result['raw']['val_mse']:.4f} test {result['raw']['test_mse']:.4f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": str(args.runs), "quick": args.quick, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
