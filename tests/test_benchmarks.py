"""Smoke passes of the benchmark scripts (`--quick`): they run and write what they promise."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--quick", *args], check=True, cwd=ROOT, timeout=600)


def test_memory_speed_quick(tmp_path):
    out = tmp_path / "memory_speed.json"
    run_script("memory_speed.py", "--no-peer", "--out", str(out))
    records = json.loads(out.read_text())
    assert records and all(r["ours_ms"] > 0 for r in records)
    assert {"dim", "chunk", "batch", "T", "ours_ms", "peer_ms", "speedup"} <= set(records[0])

    # --summary-only rebuilds the derived fields from the files alone: give the point a peer time
    # and the ceiling (the speedup were the counted products at the measured rate) follows. How the
    # ceiling compares with the speedup depends on timings (under load the quick pass's rate
    # measurement can come out below our own rate), so only the relation is checked.
    records[0].update(peer_ms=4 * records[0]["ours_ms"], speedup=4.0)
    out.write_text(json.dumps(records))
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_speed.py"), "--summary-only", "--out", str(out)],
                   check=True, cwd=ROOT, timeout=120)
    point = json.loads(out.read_text())[0]
    assert point["speedup_ceiling"] == pytest.approx(4.0 / point["frac_of_peak_small"])
    assert point["frac_of_peak_small"] > 0 and out.with_suffix(".png").exists()


def test_context_scaling_quick(tmp_path):
    out = tmp_path / "context_scaling.json"
    run_script("context_scaling.py", "--out", str(out))
    summary = json.loads(out.read_text())
    assert {r["model"] for r in summary["records"]} == {"mac", "lmm", "attention"}
    assert out.with_suffix(".png").exists()


def test_train_step_quick_times_precisions_side_by_side(tmp_path):
    out = tmp_path / "train_step.json"
    run_script("train_step.py", "--modes", "fp32", "bf16", "--batch", "4", "--out", str(out))
    result = json.loads(out.read_text())
    assert sorted((r["model"], r["mode"], r["batch"]) for r in result["records"]) == [
        ("dlinear", "bf16", 4), ("dlinear", "fp32", 4), ("mal", "bf16", 4), ("mal", "fp32", 4)]
    for model, row in result["summary"].items():
        assert row["this_ms"] > 0 and row["this_bf16_ms"] > 0
        ms = {r["mode"]: r["min_ms"] for r in result["records"] if r["model"] == model}  # one round: unrounded
        assert row["fp32_over_bf16"] == pytest.approx(ms["fp32"] / ms["bf16"], abs=0.001)
    assert all(r["peak_mb"] is None for r in result["records"])  # GPU memory: measured on CUDA only
    assert result["settings"]["modes"] == ["fp32", "bf16"] and result["settings"]["batch"] == 4


def test_train_step_quick_compares_two_checkouts(tmp_path):
    out = tmp_path / "train_step.json"
    run_script("train_step.py", "--compare", str(ROOT), "--out", str(out))  # this checkout against itself
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"mal", "dlinear"}
    assert all(r["min_ms"] > 0 for r in result["records"]) and len(result["records"]) == 4
    assert all(row["compare_over_this"] > 0 for row in result["summary"].values())
    # the memory update's time is part of MAL's step; the DLinear-style model has no memory
    for record in result["records"]:
        if record["model"] == "mal":
            assert 0 < record["memory_update_ms"] < record["min_ms"]
        else:
            assert record["memory_update_ms"] == 0.0
    assert 0 < result["summary"]["mal"]["this_memory_update_share"] < 1


def synthetic_etth1(folder: Path) -> Path:
    """A file with ETTh1's schema and length, so the smoke passes never need the real data or a download."""
    import numpy as np
    import pandas as pd

    t = np.arange(14400)
    values = np.sin(2 * np.pi * t[:, None] / 24 + np.arange(7)) + 0.1 * np.random.default_rng(0).standard_normal((14400, 7))
    frame = pd.DataFrame(values, columns=["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"])
    frame.insert(0, "date", pd.date_range("2016-07-01", periods=14400, freq="h").strftime("%Y-%m-%d %H:%M:%S"))
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / "ETTh1.csv", index=False)
    return folder


def test_accuracy_quick_writes_records_and_resumes(tmp_path):
    out, data = tmp_path / "accuracy.json", synthetic_etth1(tmp_path / "data")
    args = ("--out", str(out), "--data_dir", str(data), "--workdir", str(tmp_path / "work"),
            "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_script("accuracy.py", *args)
    records = json.loads(out.read_text())
    assert [(r["dataset"], r["model"], r["lookback"], r["horizon"], r["seed"]) for r in records] == [
        ("etth1", "mac", 96, 96, 0), ("etth1", "dlinear", 96, 96, 0)]
    assert all(r["test_mse"] > 0 and r["test_mae"] > 0 and r["epoch_seconds"] > 0 and r["mlflow_run_id"] for r in records)
    assert all(r["n_test_windows"] == 2 * 32 for r in records)  # two test batches of 32 in the smoke pass
    assert all(r["torch_threads"] == 1 for r in records)  # --threads' default, whatever torch's own default is here
    assert out.with_suffix(".png").exists() and "| mac |" in (tmp_path / "accuracy_summary.md").read_text()
    run_script("accuracy.py", *args, "--resume")  # every cell is done: nothing runs, nothing is duplicated
    assert json.loads(out.read_text()) == records


def test_streaming_quick(tmp_path):
    out = tmp_path / "streaming.json"
    run_script("streaming.py", "--out", str(out), "--data_dir", str(synthetic_etth1(tmp_path / "data")))
    result = json.loads(out.read_text())
    assert [b["position"] for b in result["cost"]["buckets"]] == [0, 500, 1000]
    assert all(b["ms_median"] > 0 for b in result["cost"]["buckets"])
    carried, reset = result["accuracy"]["etth1"]
    assert (carried["carry_memory"], reset["carry_memory"]) == (True, False)
    assert carried["n_test_windows"] == reset["n_test_windows"] == 30
    assert carried["test_mse"] != reset["test_mse"]  # the carried memory does change the forecasts
    assert out.with_suffix(".png").exists()


def load_benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_streaming_passes_model_settings_to_the_forecaster():
    streaming = load_benchmark("streaming")
    default = streaming.build_forecaster(streaming.parse_args([]), validation_size=100)
    assert default.get_params()["model_kwargs"]["forget_bias"] == -6.0  # the model's own default
    args = streaming.parse_args(["--forget_bias", "-3", "--lookback", "384", "--forecast_window", "96"])
    params = streaming.build_forecaster(args, validation_size=100).get_params()
    assert params["lookback"] == 384
    assert params["model_kwargs"] == {"segment_len": 4, "forecast_window": 96, "forget_bias": -3.0}


def test_accuracy_study_overrides_reach_the_run_and_stay_apart(tmp_path, capsys):
    import pytest

    accuracy = load_benchmark("accuracy")
    out = tmp_path / "lr_study.json"
    args = accuracy.parse_args(["--set", "model.lr=0.0001", "--set", "model.dropout=0.2", "--out", str(out)])
    assert args.overrides == {"model.lr": "0.0001", "model.dropout": "0.2"}
    argv = accuracy.cli_args(accuracy.Cell("etth1", "lmm", 96, 336, 0), args)
    assert argv[-2:] == ["--model.lr=0.0001", "--model.dropout=0.2"]  # after the config, so they win

    study_record = {"dataset": "etth1", "model": "lmm", "lookback": 96, "horizon": 336, "seed": 0,
                    "overrides": {"model.lr": "0.0001", "model.dropout": "0.2"}}
    assert accuracy.cells_to_run(args, [study_record]) == [
        c for c in accuracy.grid(list(accuracy.DATASETS), list(accuracy.MODELS), list(accuracy.HORIZONS),
                                 list(accuracy.SEEDS), [96]) if c != accuracy.Cell.of(study_record)]
    other = accuracy.parse_args(["--set", "model.lr=0.001", "--out", str(out)])
    with pytest.raises(SystemExit, match="other overrides"):
        accuracy.cells_to_run(other, [study_record])  # a file holds one study: no mixed settings
    with pytest.raises(SystemExit, match="other overrides"):
        accuracy.cells_to_run(accuracy.parse_args(["--out", str(out)]), [study_record])

    for bad in (["--set", "model.lr"], ["--set", "=3"], ["--set", "model.lr=0.0001"]):  # the last: main grid's file
        with pytest.raises(SystemExit):
            accuracy.parse_args(bad if bad[1] == "model.lr=0.0001" else [*bad, "--out", str(out)])
    assert "own --out" in capsys.readouterr().err


def test_accuracy_target_verdicts_need_every_horizon():
    accuracy = load_benchmark("accuracy")

    def record(dataset, model, horizon, mse, val):
        return {"dataset": dataset, "model": model, "lookback": 96, "horizon": horizon, "seed": 0, "test_mse": mse,
                "test_mae": mse, "best_val_mse": val, "epoch_seconds": 1.0}

    records = [record("etth1", m, h, mse, val) for h in accuracy.HORIZONS
               for m, mse, val in [("mac", 0.41, 0.5), ("mag", 0.43, 0.6), ("mal", 0.45, 0.7), ("dlinear", 0.44, 0.9)]]
    records += [record("etth1", "lmm", h, 0.40, 0.8) for h in accuracy.HORIZONS[:3]]  # one horizon short
    lines = accuracy.target_verdicts(records)
    assert "- ETTH1, best variant on validation (mac) at or below the Titans paper: 0.410 vs 0.420: met" in lines
    assert "- ETTH1, mag below the linear baseline: 0.430 vs 0.440: met" in lines
    assert "- ETTH1, mal below the linear baseline: 0.450 vs 0.440: not met" in lines
    assert "- ETTH1, lmm below the linear baseline: not yet known (horizons missing)" in lines


def test_accuracy_summary_shows_the_validation_margin_and_no_spread_for_one_seed():
    accuracy = load_benchmark("accuracy")

    def record(model, horizon, seed, val):
        return {"dataset": "etth1", "model": model, "lookback": 96, "horizon": horizon, "seed": seed, "test_mse": 0.4,
                "test_mae": 0.5, "best_val_mse": val, "epoch_seconds": 1.0}

    vals = {"mac": 0.9, "mag": 0.6, "mal": 0.7, "lmm": 0.8}
    records = [record(m, h, 0, v) for h in accuracy.HORIZONS for m, v in vals.items()]
    records += [record("mal", 96, 1, 0.1)]  # a cell only MAL has run is not compared
    assert accuracy.variant_validation(records) == ({"mac": 0.9, "mag": 0.6, "mal": 0.7, "lmm": 0.8}, 4)
    summary = accuracy.summary_table(records)
    assert ("Best Titans variant on validation MSE at L=96: mag (mean best val MSE over the 4 cells every variant "
            "finished: mag 0.6000, mal 0.7000, lmm 0.8000, mac 0.9000).") in summary
    assert "| mac | 0.400 / 0.500 (seed 0) |" in summary  # one seed: no spread shown
    assert "| mal | 0.400±0.000 / 0.500±0.000 (seeds 0,1) |" in summary
    assert accuracy.variant_validation(records[:3]) == ({}, 0) and accuracy.best_variant(records[:3]) is None


def test_accuracy_study_at_a_longer_lookback_only(tmp_path):
    """A study run at L=336 alone: no L=96 targets to judge, and its plot shows L=336, not empty L=96 panels."""
    accuracy = load_benchmark("accuracy")
    records = [{"dataset": "etth1", "model": "mal", "lookback": 336, "horizon": h, "seed": 0, "test_mse": 0.4,
                "test_mae": 0.4, "best_val_mse": 0.9, "epoch_seconds": 1.0} for h in accuracy.HORIZONS]
    summary = accuracy.summary_table(records)
    assert "### ETTH1, L=336" in summary and "Targets" not in summary and "Best Titans variant" not in summary
    assert accuracy.plotted_lookback(records) == 336
    assert accuracy.plotted_lookback(records + [{**records[0], "lookback": 96}]) == 96
    accuracy.plot(records, tmp_path / "study.png")
    assert (tmp_path / "study.png").exists()


def test_accuracy_lookback_study_table_and_plot(tmp_path):
    accuracy = load_benchmark("accuracy")

    def record(model, lookback, seed, mse):
        return {"dataset": "etth1", "model": model, "lookback": lookback, "horizon": 96, "seed": seed, "test_mse": mse,
                "test_mae": mse + 0.1, "best_val_mse": mse + 0.2, "epoch_seconds": 1.0}

    records = [record("mal", 96, 0, 0.40), record("mal", 96, 1, 0.42), record("mal", 336, 0, 0.38),
               record("patchtst", 720, 0, 0.39), record("patchtst", 96, 0, 0.45), record("lmm", 96, 0, 0.5)]
    lines = accuracy.lookback_table(records)
    assert "| ETTH1 | mal | 96 | 0.410 / 0.510 (0.610; seeds 0,1) | 0.380 / 0.480 (0.580; seeds 0) | — | L=336: 0.380 |" in lines
    assert "| ETTH1 | patchtst | 96 | 0.450 / 0.550 (0.650; seeds 0) | — | 0.390 / 0.490 (0.590; seeds 0) | L=720: 0.390 |" in lines
    worse_on_val = [{**r, "best_val_mse": 0.9} if r["lookback"] == 336 else r for r in records]
    assert "| ETTH1 | mal | 96 | 0.410 / 0.510 (0.610; seeds 0,1) | 0.380 / 0.480 (0.900; seeds 0) | — | L=96: 0.410 |" \
        in accuracy.lookback_table(worse_on_val)  # the pick follows validation, not test
    assert not any("| lmm |" in line for line in lines)  # one lookback only: not part of the study
    assert accuracy.plot_lookback(records, tmp_path / "lookback.png") and (tmp_path / "lookback.png").exists()
    assert accuracy.lookback_table(records[-1:]) == [] and not accuracy.plot_lookback(records[-1:], tmp_path / "none.png")
    assert "| ETTH1 | mal | incomplete | incomplete | incomplete | incomplete |" in lines  # H=96 alone: no average


def test_accuracy_lookback_averages_follow_validation_per_horizon():
    accuracy = load_benchmark("accuracy")

    def record(lookback, horizon, mse, val):
        return {"dataset": "etth2", "model": "mal", "lookback": lookback, "horizon": horizon, "seed": 0,
                "test_mse": mse, "test_mae": mse, "best_val_mse": val, "epoch_seconds": 1.0}

    # L=336 tests better at every horizon; validation picks it at H=96 and 192 only
    records = [record(96, h, 0.40, 1.0) for h in accuracy.HORIZONS] + [
        record(336, h, 0.30, 0.9 if h < 336 else 1.1) for h in accuracy.HORIZONS]
    lines = accuracy.lookback_table(records)
    assert "| ETTH2 | mal | 0.400 | 0.300 | 0.350 (L=336, L=336, L=96, L=96) |" in lines
    partial = [r for r in records if (r["lookback"], r["horizon"]) != (336, 720)]
    assert "| ETTH2 | mal | 0.400 | incomplete | incomplete |" in accuracy.lookback_table(partial)


def test_allocator_quick(tmp_path):
    out = tmp_path / "allocator.json"
    run_script("allocator.py", "--out", str(out))
    records = json.loads(out.read_text())["records"]
    assert [r["setting"] for r in records] == ["default", "recompute", "malloc", "malloc + recompute"]
    assert all(r["ms"] > 0 and r["peak_rss_gb"] > 0 and r["minor_faults_per_step"] >= 0 for r in records)
    assert [r["recompute_chunks"] for r in records] == [None, 8, None, 8]
    # the knobs change where memory goes, never the result
    assert len({r["grad_norm"] for r in records}) == 1


def test_accuracy_config_value_follows_references_at_any_commit():
    import pytest

    accuracy = load_benchmark("accuracy")
    assert accuracy.config_value("etth2", "mal", "model.variant") == "mal"
    assert accuracy.config_value("etth1", "lmm", "data.init_args.batch_size") == 32
    assert accuracy.config_value("etth1", "mal", "trainer.max_epochs") == accuracy.config_value(
        "etth1", "mal", "trainer.max_epochs", accuracy.git_reader("HEAD"))
    # a config added after a commit reads as first committed (a run made before its model's config landed)
    first = subprocess.run(["git", "log", "--format=%h", "--reverse"], cwd=ROOT, capture_output=True, text=True).stdout.split()[0]
    assert accuracy.config_value("etth1", "mal", "model.variant", accuracy.git_reader(first)) == "mal"
    with pytest.raises(KeyError, match=r"model.no_such_key is not spelled out in configs/model/lmm.yaml \(reached from "
                       r"configs/etth1/lmm.yaml\), and TitansForecastingModule has no argument 'no_such_key'"):
        accuracy.config_value("etth1", "lmm", "model.no_such_key")
    # a module argument the config leaves out runs at the module's default, at that commit if it had the
    # argument (max_lr: there from the first commit), else today's (linear_skip came later, off by default)
    assert accuracy.config_value("etth1", "mal", "model.max_lr", accuracy.git_reader(first)) == 0.1
    assert accuracy.config_value("etth1", "mal", "model.linear_skip", accuracy.git_reader(first)) is False
    assert accuracy.config_value("etth1", "mal", "model.linear_skip") is False


def test_accuracy_config_value_agrees_with_the_cli(capsys):
    """What the harness reads from a shipped config is what `titans-ts fit` runs with."""
    import yaml

    from forecasters.command import main

    accuracy = load_benchmark("accuracy")
    for dataset in accuracy.DATASETS:
        for model in accuracy.MODELS:
            with pytest.raises(SystemExit):
                main(["fit", "--config", str(ROOT / "configs" / dataset / f"{model}.yaml"), "--print_config"])
            printed = yaml.safe_load(capsys.readouterr().out)
            for key in ("variant", "dim", "lr", "dropout", "weight_decay", "memory_depth", "linear_skip_lr"):
                assert accuracy.config_value(dataset, model, f"model.{key}") == printed["model"][key], (dataset, model, key)


def grid_record(model, horizon, seed, val, overrides=None, dataset="etth1"):
    return {"dataset": dataset, "model": model, "lookback": 96, "horizon": horizon, "seed": seed, "test_mse": val / 2,
            "test_mae": val / 2, "best_val_mse": val, "epoch_seconds": 1.0, "epochs_trained": 4, "git_commit": "abc1234",
            "overrides": overrides or {}}


def test_accuracy_validation_agreement_ranks_runs():
    import math

    accuracy = load_benchmark("accuracy")
    assert accuracy.rank_correlation([1, 2, 3, 4], [10, 20, 30, 45]) == 1.0  # ranks, not values
    assert accuracy.rank_correlation([1, 2, 3], [3, 2, 1]) == -1.0
    assert accuracy.rank_correlation([1, 1, 2, 3], [5, 5, 6, 7]) == 1.0  # ties share a rank on both sides
    assert math.isnan(accuracy.rank_correlation([1, 2, 3], [4, 4, 4]))
    agreeing = [grid_record("mal", 96, s, v) for s, v in enumerate([0.70, 0.71, 0.72])]
    disagreeing = [{**grid_record("mal", 720, s, v), "test_mse": t}
                   for s, (v, t) in enumerate([(1.56, 0.50), (1.57, 0.48), (1.58, 0.49)])]
    lines = accuracy.validation_agreement(agreeing + disagreeing + [grid_record("mal", 336, 0, 1.3)])
    assert "| ETTH1 | 96 | 3 | 1.00 |" in lines and "| ETTH1 | 720 | 3 | -0.50 |" in lines
    assert not any("| 336 |" in line for line in lines)  # one run ranks nothing
    assert accuracy.validation_agreement([]) == []


def test_accuracy_agreement_pools_every_run_once_and_ranks_within_each_model(tmp_path, capsys):
    accuracy = load_benchmark("accuracy")
    # MAG: lower val tests higher at H=720 over its settings; MAC: lower val tests lower
    mag = [{**grid_record("mag", 720, 0, v, {"model.dropout": d}), "test_mse": t, "mlflow_run_id": f"mag{d}"}
           for d, v, t in [(0.1, 1.55, 0.55), (0.2, 1.56, 0.50), (0.3, 1.57, 0.49), (0.4, 1.58, 0.48), (0.5, 1.59, 0.47)]]
    mac = [{**grid_record("mac", 720, s, 1.5 + s / 100), "mlflow_run_id": f"mac{s}"} for s in range(5)]
    grid, study = tmp_path / "accuracy.json", tmp_path / "study.json"
    accuracy.save_records(mag[:1] + mac, grid)  # the grid holds MAG's adopted run, which its study file also holds
    accuracy.save_records(mag + [{**mac[0], "quick": True, "mlflow_run_id": "smoke"}], study)
    (tmp_path / "windows_read.json").write_text('{"runs": []}')
    accuracy.main(["--agreement", str(grid), str(study), str(tmp_path / "windows_read.json"), "--out", str(grid)])
    table = (tmp_path / "validation_agreement.md").read_text()
    assert "| dataset | H | mac | mag |" in table and "| ETTH1 | 720 | +1.00 (5) | -1.00 (5) |" in table
    assert "windows_read.json: not a file of accuracy records" in capsys.readouterr().err
    assert "– (4)" in "\n".join(accuracy.validation_agreement_by_model(mac[:4]))  # too few runs to rank


def test_accuracy_study_comparison_puts_validation_first():
    accuracy = load_benchmark("accuracy")
    study = [grid_record("lmm", 96, 0, 0.69, {"model.lr": "0.0001"}), grid_record("lmm", 336, 0, 1.31, {"model.lr": "0.0001"}),
             grid_record("mal", 96, 0, 0.70, {"model.lr": "0.0001"})]
    base = [grid_record("lmm", 96, 0, 0.70), grid_record("lmm", 336, 0, 1.30), grid_record("dlinear", 96, 0, 0.5)]
    lines = accuracy.study_comparison(study, base)
    assert "| etth1 | lmm | 96 | 96 | 0 | 0.7000 | **0.6900** | 0.350 / 0.350 | 0.345 / 0.345 | 4, 4 |" in lines
    assert "| etth1 | lmm | 96 | 336 | 0 | 1.3000 | 1.3100 | 0.650 / 0.650 | 0.655 / 0.655 | 4, 4 |" in lines
    ratio = (0.69 / 0.70 + 1.31 / 1.30) / 2
    assert f"| lmm | 2 | 1 | {ratio:.4f} |" in lines
    assert not any(line.startswith("| mal") or "| mal |" in line for line in lines)  # no base cell: not compared
    assert accuracy.study_comparison(study, []) == ["No cell of this study is in the baseline file yet."]
    adopted = [{**r, "mlflow_run_id": f"run{i}"} for i, r in enumerate(study)]  # the study's runs, now in the grid too
    assert accuracy.study_comparison(adopted, [*base, *({**r, "overrides": {}} for r in adopted)]) == [
        line for line in lines]  # compared with the old runs, never with themselves


def test_accuracy_study_with_a_forecast_window_is_compared_with_the_plain_model_of_that_window():
    accuracy = load_benchmark("accuracy")
    study = [{**grid_record("mal", 96, 0, 0.68, {"model.forecast_window": "96"}), "lookback": 384}]
    base = [grid_record("mal", 96, 0, 0.70), {**grid_record("mal", 96, 0, 0.75), "lookback": 336}]
    lines = accuracy.study_comparison(study, base)
    assert "| etth1 | mal | 384 | 96 | 0 | 0.7000 | **0.6800** | 0.350 / 0.350 | 0.340 / 0.340 | 4, 4 |" in lines
    assert accuracy.base_cell(grid_record("mal", 96, 0, 0.7, {"model.lr": "0.0001"})) == accuracy.Cell("etth1", "mal", 96, 96, 0)


def test_accuracy_adopt_moves_study_runs_in_and_old_runs_out(tmp_path, monkeypatch, capsys):
    import pytest

    accuracy = load_benchmark("accuracy")
    shipped = {"lr": 0.001}
    # the configs: `shipped` in the working tree, 0.001 at every recorded commit
    monkeypatch.setattr(accuracy, "config_value", lambda d, m, key, read_text=None: shipped["lr"] if read_text is None else 0.001)
    monkeypatch.setattr(accuracy, "git_reader", lambda commit: lambda rel: (ROOT / rel).read_text())  # no other change
    out, study_path = tmp_path / "accuracy.json", tmp_path / "studies" / "lr_0.0001.json"
    grid = [grid_record("lmm", 96, 0, 0.70), grid_record("lmm", 96, 1, 0.71), grid_record("dlinear", 96, 0, 0.5),
            grid_record("lmm", 96, 0, 0.30, dataset="etth2")]
    study = [grid_record("lmm", 96, 0, 0.69, {"model.lr": "0.0001"}), grid_record("mal", 96, 0, 0.68, {"model.lr": "0.0001"})]
    accuracy.save_records(grid, out)
    accuracy.save_records(study, study_path)

    with pytest.raises(SystemExit, match=r"configs/etth1/lmm.yaml has model.lr=0.001, the study ran model.lr=0.0001: change"):
        accuracy.adopt(study_path, out, ["etth1"], ["lmm"])
    assert accuracy.load_records(out) == grid  # refused: nothing moved

    shipped["lr"] = 0.0001
    with pytest.raises(SystemExit, match=r"the configs changed for \[\('etth2', 'lmm'\)\] too"):
        accuracy.adopt(study_path, out, ["etth1"], ["lmm"])  # one config serves both datasets
    retired_path = accuracy.adopt(study_path, out, ["etth1", "etth2"], ["lmm"])
    assert retired_path == tmp_path / "studies" / "lr_0.001.json"
    records = accuracy.load_records(out)
    assert sorted((r["dataset"], r["model"], r["seed"], r["best_val_mse"]) for r in records) == [
        ("etth1", "dlinear", 0, 0.5), ("etth1", "lmm", 0, 0.69)]
    adopted = next(r for r in records if r["model"] == "lmm" and r["dataset"] == "etth1")
    assert adopted["overrides"] == {} and adopted["run_with"] == {"model.lr": "0.0001"}
    assert adopted["adopted_from"] == "studies/lr_0.0001.json"
    retired = accuracy.load_records(retired_path)  # every run with the old setting moves out
    assert sorted((r["dataset"], r["seed"], r["best_val_mse"]) for r in retired) == [
        ("etth1", 0, 0.70), ("etth1", 1, 0.71), ("etth2", 0, 0.30)]
    assert all(r["overrides"] == {"model.lr": "0.001"} for r in retired)
    assert "2 cell(s) the grid had now lack a run with the new settings" in capsys.readouterr().out  # seed 1, etth2
    assert accuracy.load_records(study_path) == study  # the study itself stays as it was
    accuracy.adopt(study_path, out, ["etth1", "etth2"], ["lmm"])  # again: its runs are in, nothing moves
    assert accuracy.load_records(out) == records and accuracy.load_records(retired_path) == retired
    assert (tmp_path / "accuracy_summary.md").exists() and (tmp_path / "studies" / "lr_0.001_summary.md").exists()


def test_accuracy_adopt_refuses_study_runs_made_on_other_configs(tmp_path, monkeypatch):
    """A study run from before another choice was adopted for its model (MAC on ETTh1 ran its skip study at
    dim 64, then moved to dim 32) is not a run of the grid, whatever the study's own key says."""
    accuracy = load_benchmark("accuracy")
    # the configs hold the skip; the grid's ETTh2 run was made without it
    monkeypatch.setattr(accuracy, "config_value", lambda d, m, key, read_text=None: read_text is None or d == "etth1")

    def configs_at(commit):  # the shipped configs, but MAC on ETTh1 still at dim 64
        def read_text(rel):
            text = (ROOT / rel).read_text()
            return text.replace("dim: 32", "dim: 64") if rel == "configs/etth1/mac.yaml" else text
        return read_text

    monkeypatch.setattr(accuracy, "git_reader", configs_at)
    out, study_path = tmp_path / "accuracy.json", tmp_path / "studies" / "linear_skip_true.json"
    grid = [grid_record("mac", 96, 0, 0.70), grid_record("mac", 96, 0, 0.30, dataset="etth2")]
    study = [grid_record("mac", 96, 0, 0.69, {"model.linear_skip": "true"}),
             grid_record("mac", 96, 1, 0.29, {"model.linear_skip": "true"}, dataset="etth2")]
    accuracy.save_records(grid, out)
    accuracy.save_records(study, study_path)
    with pytest.raises(SystemExit, match=r"run Cell\(dataset='etth1', model='mac', lookback=96, horizon=96, seed=0\) was "
                                         r"made on configs that differ from configs/etth1/mac.yaml in model.dim: move"):
        accuracy.adopt(study_path, out, ["etth1"], ["mac"])
    assert accuracy.load_records(out) == grid  # refused: nothing moved
    retired_path = accuracy.adopt(study_path, out, ["etth2"], ["mac"])  # ETTh2's MAC config is as the study ran it
    assert {(r["dataset"], r["seed"]) for r in accuracy.load_records(out)} == {("etth1", 0), ("etth2", 1)}
    assert retired_path.name == "linear_skip_false.json"  # named as the command line spells the old value
    assert [r["overrides"] for r in accuracy.load_records(retired_path)] == [{"model.linear_skip": "false"}]


def test_accuracy_resolved_config_reads_references_in():
    import yaml

    accuracy = load_benchmark("accuracy")

    def yaml_file(rel):
        return yaml.safe_load((ROOT / rel).read_text())

    config = accuracy.resolved_config("etth2", "mac")
    spelled = yaml_file("configs/model/mac.yaml")
    assert config["data"] == yaml_file("configs/data/etth2.yaml")
    assert {k: config["model"][k] for k in spelled} == spelled
    # what the config leaves out is what the run used: the module's default
    assert config["model"]["loss"] == "mse" and config["model"]["quantiles"] == [0.1, 0.5, 0.9] and "loss" not in spelled
    assert accuracy.config_value("etth1", "mac", "model.dim") == accuracy.resolved_config("etth1", "mac")["model"]["dim"]
    assert accuracy.config_differences({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 4}, "e": 3}) == ["a.c", "d", "e"]
    assert accuracy.config_differences(config, accuracy.resolved_config("etth2", "mac")) == []


def test_accuracy_config_spelling_out_a_default_is_no_difference():
    """A run made before a config spelled `linear_skip: false` out ran with the module's default, false: the
    two configs are the same run (adopt compares them), while another value is a difference."""
    accuracy = load_benchmark("accuracy")
    shipped = (ROOT / "configs/model/mal.yaml").read_text()
    assert "linear_skip: false" in shipped

    def reader(model_yaml):
        return lambda rel: model_yaml if rel == "configs/model/mal.yaml" else (ROOT / rel).read_text()

    # ETTm1's config reads the shared model file (ETTh1's and ETTh2's spell out their own model sections)
    left_out = shipped.replace("linear_skip: false", "")
    now = accuracy.resolved_config("ettm1", "mal")
    assert accuracy.config_differences(accuracy.resolved_config("ettm1", "mal", reader(left_out)), now) == []
    other = shipped.replace("linear_skip: false", "linear_skip: true")
    assert accuracy.config_differences(accuracy.resolved_config("ettm1", "mal", reader(other)), now) == ["model.linear_skip"]


def test_windows_read_quick_scores_the_read_training_used_as_the_model_does(tmp_path):
    """The diagnostic's forecast after the k windows a model was trained to read first equals that model's own
    forecast, for a plain model (k=0) and a forecast_window one (k=1); the state moves once the memory reads."""
    import lightning.pytorch as pl
    import torch

    from datamodules import ETTh1DataModule
    from forecasters.module import TitansForecastingModule

    data, work = synthetic_etth1(tmp_path / "data"), tmp_path / "work"
    records = []
    for i, (lookback, window) in enumerate(((96, None), (192, 96))):
        torch.manual_seed(i)
        module = TitansForecastingModule(variant="mal", lookback=lookback, horizon=96, forecast_window=window, dim=16,
                                         n_layers=1, heads=2, lr=1e-3)
        dm = ETTh1DataModule(data_dir=str(data), lookback=lookback, horizon=96)
        trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, dm)
        trainer.save_checkpoint(work / "checkpoints" / f"run{i}" / "best-epoch=00-val_mse=1.0000.ckpt")
        dm.setup("test")
        x, y = next(iter(dm.test_dataloader()))[:2]
        with torch.no_grad():
            test_mse = float((module.eval()(x[:16]) - y[:16]).square().mean())
        records.append({"dataset": "etth1", "model": "mal", "horizon": 96, "seed": 0, "mlflow_run_id": f"run{i}",
                        "test_mse": test_mse})
    runs, out = tmp_path / "runs.json", tmp_path / "windows_read.json"
    runs.write_text(json.dumps(records))
    run_script("windows_read.py", "--runs", str(runs), "--workdir", str(work), "--data_dir", str(data), "--out", str(out))
    plain, read_first = json.loads(out.read_text())["results"]
    assert (plain["trained_windows_read"], read_first["trained_windows_read"]) == (0, 1)
    for result, record in zip((plain, read_first), records):
        assert [r["windows_read"] for r in result["rows"]] == [0, 1, 2] and result["n_test_windows"] == 16
        trained = result["rows"][result["trained_windows_read"]]
        assert trained["test_mse"] == pytest.approx(record["test_mse"], rel=1e-5)
        assert result["rows"][0]["state_shift"] == 0 and all(r["state_shift"] > 0 for r in result["rows"][1:])
        assert len({r["test_mse"] for r in result["rows"]}) == 3  # what the memory read changes the forecast
    assert plain["rows"][1]["shift_from_trained"] is None and read_first["rows"][1]["shift_from_trained"] == 0
    assert read_first["rows"][0]["shift_from_trained"] == pytest.approx(1.0)  # W_0 is ||W_t - W_0|| from W_t
    assert out.with_suffix(".png").exists()


def test_ema_checkpoints_quick_scores_the_average_and_the_raw_weights_of_one_step(tmp_path):
    """A weight-averaged checkpoint's two sets of weights, each scored as `titans-ts validate` / `test` score it."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    from datamodules import ETTh1DataModule
    from forecasters.module import TitansForecastingModule

    data, work = synthetic_etth1(tmp_path / "data"), tmp_path / "work"
    torch.manual_seed(0)
    module = TitansForecastingModule(variant="mag", n_channels=7, n_targets=7, lookback=96, horizon=96, dim=16, n_layers=1,
                                     heads=2, lr=1e-2)
    path = work / "checkpoints" / "run0" / "best-epoch=00-val_mse=1.0000.ckpt"
    # Saved during training, as a best checkpoint is: at the end the average replaces the raw weights.
    saving = ModelCheckpoint(dirpath=path.parent, filename=path.stem, every_n_train_steps=4)
    trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[EMAWeightAveraging(decay=0.5), saving])
    trainer.fit(module, ETTh1DataModule(data_dir=str(data), lookback=96, horizon=96))
    runs, out = tmp_path / "runs.json", tmp_path / "ema_checkpoints.json"
    runs.write_text(json.dumps([{"dataset": "etth1", "model": "mag", "lookback": 96, "horizon": 96, "seed": 0,
                                 "mlflow_run_id": "run0"}]))
    run_script("ema_checkpoints.py", "--runs", str(runs), "--workdir", str(work), "--data_dir", str(data), "--out", str(out))
    (result,) = json.loads(out.read_text())["results"]
    average, raw = result["average"], result["raw"]
    assert all(math.isfinite(v) for v in (*average.values(), *raw.values()))
    assert average["test_mse"] != raw["test_mse"] and average["val_mse"] != raw["val_mse"]
    # The raw weights are the trained module's own: scored directly on the same two test batches, they agree.
    dm = ETTh1DataModule(data_dir=str(data), lookback=96, horizon=96)
    dm.setup("test")
    module.load_state_dict(torch.load(path, weights_only=True)["current_model_state"])
    module.eval()
    with torch.no_grad():
        errors = [(module(x) - y).square() for x, y, *_ in itertools.islice(dm.test_dataloader(), 2)]
    assert raw["test_mse"] == pytest.approx(float(torch.cat(errors).mean()), rel=1e-4)


def test_cycle_prototype_quick_adds_the_cycle_to_every_network(tmp_path):
    data, out = synthetic_etth1(tmp_path / "data"), tmp_path / "cycle.json"
    common = ("--data_dir", str(data), "--workdir", str(tmp_path / "work"), "--tracking_uri",
              f"sqlite:///{tmp_path / 'mlflow.db'}", "--set", "data.time_features=true")
    run_script("cycle_prototype.py", *common, "--out", str(out))
    run_script("accuracy.py", *common, "--out", str(tmp_path / "plain.json"))
    cycle, plain = ({r["model"]: r for r in json.loads(path.read_text())} for path in (out, tmp_path / "plain.json"))
    for model in ("mac", "dlinear"):
        assert cycle[model]["n_params"] == plain[model]["n_params"] + 24 * 7  # one profile of 24 hours per channel
        assert cycle[model]["cycle_len"] == 24 and math.isfinite(cycle[model]["test_mse"])
        assert cycle[model]["test_mse"] != plain[model]["test_mse"]
    # the comparison names the script that made the study's runs, not only their --set
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--summary_only", "--out", str(out),
                    "--baseline", str(tmp_path / "plain.json")], check=True, cwd=ROOT, timeout=600)
    summary = (tmp_path / "cycle_summary.md").read_text()
    assert "data.time_features=true with benchmarks/cycle_prototype.py, CYCLE_LEN=24 (study)" in summary


def test_cycle_prototype_takes_out_the_profile_at_each_steps_hour_and_puts_it_back_after():
    import pandas as pd
    import torch

    from datamodules.time_features import time_features

    prototype = load_benchmark("cycle_prototype")
    CycleRevIN, phase_of = prototype.CycleRevIN, prototype.phase_of

    lookback, horizon, hours = 96, 48, torch.arange(300)
    series = torch.stack([torch.sin(2 * torch.pi * hours / 24 + c) for c in range(3)], dim=1)  # [300, 3], period 24
    revin = CycleRevIN(3, lookback)
    windows = torch.stack([series[s : s + lookback] for s in (0, 5, 17)])
    # the hour of each window's first step, read back from the calendar features as the steps do
    marks = torch.from_numpy(time_features(pd.date_range("2016-07-01", periods=300, freq="h"), "h"))
    revin.phase = phase_of(torch.stack([marks[s : s + lookback] for s in (0, 5, 17)]))
    assert revin.phase.tolist() == [0, 5, 17]
    with torch.no_grad():
        normalised, mean, std = super(CycleRevIN, revin).normalize(windows)
        revin.cycle.copy_(normalised[0, :24])  # the normalised profile of the first day
        residual, mean, std = revin.normalize(windows)
        forecast = revin.denormalize(torch.zeros(3, horizon, 3, 1), mean, std, slice(None))[..., 0]
    assert residual.abs().max() < 1e-4  # a purely periodic window leaves nothing for the backbone
    future = torch.stack([series[s + lookback : s + lookback + horizon] for s in (0, 5, 17)])
    torch.testing.assert_close(forecast, future, atol=1e-4, rtol=0)  # the cycle continues at the right hour
