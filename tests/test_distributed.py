"""Scale-out: DDP on CPU (gloo), torchrun, bf16-mixed and torch.compile.

The DDP test launches the real command line (`titans-ts fit --trainer.strategy ddp --trainer.devices 2
--trainer.accelerator cpu`) on ETTh1 with a tiny model for two full epochs. A probe callback
(:class:`WindowProbe`, imported by the child processes from this file) records on every rank which
training windows it was given, which checkpoint files it wrote and what it saw of MLflow. The
reference is one process with the same effective batch (2 x the per-rank batch) that walks the
windows in the order the two ranks share them (:class:`PaddedOrderETTh1DataModule`), so the
weights, the per-epoch metrics and the test metrics must agree up to float32 summation order.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, Sampler

from datamodules import ETTh1DataModule
from forecasters import TitansForecastingModule
from forecasters.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TITANS_TS = Path(sys.executable).parent / "titans-ts"
PROBE_ENV = "TITANS_TS_TEST_PROBE_DIR"
WORLD_SIZE = 2
PER_RANK_BATCH = 256
KEY_ROWS = 48

#: A tiny MAC model on the target channel, two full epochs, full validation and test: seconds per rank.
TINY = [
    "--config", str(REPO / "configs" / "etth1" / "mac.yaml"), "--data.init_args.features=S",
    "--trainer.max_epochs=2", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=10",
    "--model.dim=8", "--model.n_layers=1", "--model.heads=2", "--model.dropout=0",
    "--seed_everything=42",
]
#: DDP against one process: the same arithmetic up to float32 summation order (measured: ~1e-7 relative).
RTOL = 1e-4


# -- helpers imported by the DDP child processes -------------------------------------------------------


class WindowProbe(Callback):
    """Records on each rank: the training windows of every epoch, checkpoint writes, and MLflow use.

    Windows are identified by content (their first KEY_ROWS rows, unique in ETTh1's training split),
    so the record is what the batches really held. Written as JSON to $TITANS_TS_TEST_PROBE_DIR.
    """

    def __init__(self) -> None:
        self.epochs: list[list[int]] = []
        self.written: list[str] = []
        self.index_of: dict[bytes, int] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.index_of:
            return
        data = trainer.datamodule.train_dataset.data
        n_windows = len(trainer.datamodule.train_dataset)
        self.index_of = {data[i : i + KEY_ROWS].tobytes(): i for i in range(n_windows)}
        assert len(self.index_of) == n_windows, "windows are not told apart by their first rows; raise KEY_ROWS"
        io_plugin = trainer.strategy.checkpoint_io
        save = io_plugin.save_checkpoint

        def recording_save(checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            self.written.append(str(path))
            save(checkpoint, path, storage_options)

        io_plugin.save_checkpoint = recording_save

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        x = batch[0].numpy()
        self.epochs[-1].extend(self.index_of[x[j, :KEY_ROWS].tobytes()] for j in range(len(x)))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = trainer.logger
        record = {
            "rank": trainer.global_rank, "world_size": trainer.world_size,
            "environment": type(trainer.strategy.cluster_environment).__name__,
            "epochs": self.epochs, "written": self.written,
            "checkpoint_dirpath": trainer.checkpoint_callback.dirpath,
            "logger_started": bool(getattr(logger, "started", False)),
            "experiment": type(logger.experiment).__name__ if logger is not None else None,
        }
        folder = Path(os.environ[PROBE_ENV])
        (folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class DDPOrderSampler(Sampler[int]):
    """The windows that `world_size` DDP ranks train on together, in one process's order.

    DistributedSampler shuffles with seed + epoch, pads the permutation with its own first windows
    to a multiple of world_size, and deals it out round-robin; rank r's batch j then holds positions
    2bj + r, 2bj + r + 2, ... So one process taking batches of world_size * b from the padded
    permutation sees, at every step, exactly the union of the ranks' batches.
    """

    def __init__(self, n_windows: int, world_size: int, seed: int) -> None:
        self.n_windows, self.world_size, self.seed, self.epoch = n_windows, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before every epoch
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n_windows, generator=generator).tolist()
        return iter(order + order[: len(self) - self.n_windows])

    def __len__(self) -> int:
        return -(-self.n_windows // self.world_size) * self.world_size


class PaddedOrderETTh1DataModule(ETTh1DataModule):
    """ETTh1 whose training loader walks the windows as two DDP ranks do together (see DDPOrderSampler)."""

    def train_dataloader(self) -> DataLoader:
        self.setup()
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # the seed Lightning gives DistributedSampler
        sampler = DDPOrderSampler(len(self.train_dataset), WORLD_SIZE, seed)
        return self._loader(self.train_dataset, shuffle=False, drop_last=self.drop_last, sampler=sampler)


# -- fixtures ----------------------------------------------------------------------------------------


def child_env(probe_dir: Path, store: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": "1", PROBE_ENV: str(probe_dir), "MLFLOW_TRACKING_URI": store,
        # The children import WindowProbe from this file.
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), str(REPO), env.get("PYTHONPATH", "")) if p),
    })
    for key in [k for k in env if k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_", "SLURM_"))]:
        del env[key]  # a stray launcher variable would make Lightning think it is a child
    return env



@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    """`titans-ts fit` with DDP on 2 CPU processes; returns the probes, the MLflow run and the output."""
    workdir = tmp_path_factory.mktemp("ddp")
    probe_dir = workdir / "probe"
    probe_dir.mkdir()
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    command = [str(TITANS_TS), "fit", *TINY, f"--data.init_args.data_dir={data_dir}",
               f"--data.init_args.batch_size={PER_RANK_BATCH}",
               "--trainer.strategy=ddp", f"--trainer.devices={WORLD_SIZE}", "--trainer.accelerator=cpu",
               "--trainer.callbacks+=test_distributed.WindowProbe"]
    proc = subprocess.run(command, cwd=workdir, env=child_env(probe_dir, store), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    import mlflow

    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("titans-ts")
    runs = client.search_runs([experiment.experiment_id])
    probes = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    return {"workdir": workdir, "store": store, "probes": probes, "runs": runs, "client": client,
            "output": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, ddp_run: dict[str, Any]) -> Any:
    """The reference: one process, batch 2 x 256, the windows in the order the two ranks share them."""
    workdir = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        # The DDP run's store (creating one takes seconds), under an experiment of its own.
        mp.setenv("MLFLOW_TRACKING_URI", ddp_run["store"])
        with contextlib.redirect_stdout(io.StringIO()):
            cli = run_cli(["fit", *TINY, "--data=test_distributed.PaddedOrderETTh1DataModule",
                           f"--data.data_dir={data_dir}", f"--data.batch_size={WORLD_SIZE * PER_RANK_BATCH}",
                           "--trainer.logger.init_args.experiment_name=single-process"])
    return cli


# -- DDP ---------------------------------------------------------------------------------------------


def test_ddp_runs_two_gloo_processes_from_the_cli(ddp_run: dict[str, Any]) -> None:
    assert [p["rank"] for p in ddp_run["probes"]] == [0, 1]
    assert all(p["world_size"] == WORLD_SIZE for p in ddp_run["probes"])
    assert "distributed_backend=gloo" in ddp_run["output"]


def test_every_training_window_is_seen_once_per_epoch(ddp_run: dict[str, Any]) -> None:
    rank0, rank1 = (p["epochs"] for p in ddp_run["probes"])
    n_windows = 8640 - 96 - 96 + 1  # ETTh1's training rows, L=96, H=96
    padding = -n_windows % WORLD_SIZE  # DistributedSampler repeats this many windows to even out the ranks
    assert len(rank0) == len(rank1) == 2
    for first, second in zip(rank0, rank1):
        assert len(first) == len(second) == (n_windows + padding) // WORLD_SIZE  # equal steps: no DDP hang
        seen = collections.Counter(first + second)
        assert set(seen) == set(range(n_windows))  # every window, on one rank or the other
        repeated = [i for i, count in seen.items() if count > 1]
        # The only repeats are the padding: the permutation's first windows, dealt out again at the end.
        assert len(repeated) == padding and all(seen[i] == 2 for i in repeated)
        assert repeated == first[:padding] and second[-padding:] == first[:padding]
    assert rank0[0] != rank0[1]  # each epoch reshuffles (set_epoch)


def test_only_rank_zero_logs_to_mlflow_and_writes_checkpoints(ddp_run: dict[str, Any]) -> None:
    rank0, rank1 = ddp_run["probes"]
    (run,) = ddp_run["runs"]  # one MLflow run, not one per rank
    assert run.info.status == "FINISHED" and "test_mse" in run.data.metrics
    assert rank0["logger_started"] and rank0["experiment"] == "MlflowClient"
    assert not rank1["logger_started"] and rank1["experiment"] == "_DummyExperiment"
    folder = ddp_run["workdir"] / "checkpoints" / run.info.run_id
    # Rank 1 was told rank 0's checkpoint folder (the run id exists only there) but wrote nothing.
    assert rank0["checkpoint_dirpath"] == rank1["checkpoint_dirpath"] == str(folder)
    assert rank1["written"] == [] and rank0["written"]
    assert {Path(p).parent for p in rank0["written"]} == {folder}
    assert (folder / "last.ckpt").is_file()
    assert sorted(p.name for p in (ddp_run["workdir"] / "checkpoints").iterdir()) == [run.info.run_id]
    # The model and the report come from rank 0 alone.
    artifacts = {a.path for a in ddp_run["client"].list_artifacts(run.info.run_id)}
    assert {"config.yaml", "forecasts.png"} <= artifacts
    assert ddp_run["output"].count(f"MLflow run {run.info.run_id}") == 1


def test_ddp_metrics_match_one_process_with_the_same_effective_batch(ddp_run: dict[str, Any],
                                                                     single_run: Any) -> None:
    (run,) = ddp_run["runs"]
    client = ddp_run["client"]
    single = single_run.trainer.logger
    single_client = single.experiment
    for metric in ("val_mse", "val_mae", "train_loss_epoch"):
        ddp_history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]
        single_history = [m.value for m in sorted(single_client.get_metric_history(single.run_id, metric),
                                                  key=lambda m: m.step)]
        assert len(ddp_history) == len(single_history) == 2, metric
        np.testing.assert_allclose(ddp_history, single_history, rtol=RTOL, err_msg=metric)
    for metric in ("test_mse", "test_mae"):
        assert run.data.metrics[metric] == pytest.approx(single_run.test_metrics[metric], rel=RTOL), metric
    # The trained weights themselves.
    ddp_best = ddp_run["workdir"] / "checkpoints" / run.info.run_id / "last.ckpt"
    ddp_state = torch.load(ddp_best, map_location="cpu", weights_only=True)["state_dict"]
    single_state = single_run.model.state_dict()
    for name, value in single_state.items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_ddp_test_scores_every_test_window_once(ddp_run: dict[str, Any], data_dir: Path) -> None:
    """The test after fit shards the windows without padding: its metrics equal one process's on the checkpoint."""
    (run,) = ddp_run["runs"]
    checkpoint = next((ddp_run["workdir"] / "checkpoints" / run.info.run_id).glob("best-*.ckpt"))
    module = TitansForecastingModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    data = ETTh1DataModule(data_dir=str(data_dir), features="S", batch_size=256)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                      devices=1)
    (metrics,) = trainer.test(module, datamodule=data, verbose=False)
    assert run.data.metrics["test_mse"] == pytest.approx(metrics["test_mse"], rel=1e-5)
    assert run.data.metrics["test_mae"] == pytest.approx(metrics["test_mae"], rel=1e-5)


# -- other launchers ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_launches_the_cli_under_torch_elastic(tmp_path: Path, data_dir: Path) -> None:
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={WORLD_SIZE}",
               "--no-python", str(TITANS_TS), "fit", *TINY, f"--data.init_args.data_dir={data_dir}",
               "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
               "--trainer.logger=false", "--test_after_fit=false", "--trainer.strategy=ddp",
               f"--trainer.devices={WORLD_SIZE}", "--trainer.accelerator=cpu",
               "--trainer.callbacks+=test_distributed.WindowProbe"]
    proc = subprocess.run(command, cwd=tmp_path, env=child_env(probe_dir, f"sqlite:///{tmp_path / 'unused.db'}"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    probes = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert [p["environment"] for p in probes] == ["TorchElasticEnvironment"] * WORLD_SIZE
    assert [p["world_size"] for p in probes] == [WORLD_SIZE] * WORLD_SIZE
    assert probes[1]["written"] == [] and probes[0]["written"]
    assert not (tmp_path / "unused.db").exists()  # --trainer.logger=false: no MLflow store at all


def test_slurm_job_is_recognised_by_the_cli(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under srun each task reads its rank from SLURM's variables (here: task 3 of 2 nodes x 2)."""
    monkeypatch.chdir(tmp_path)
    slurm = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "titans", "SLURM_JOB_ID": "77",
             "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NODELIST": "node[1-2]"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    # The Trainer records its rank process-wide; put rank 0 back for the tests that follow in this process.
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

    for function in {rank_zero_only, utils_rank_zero_only}:
        monkeypatch.setattr(function, "rank", getattr(function, "rank", 0))
    cli = run_cli(["--config", str(REPO / "configs" / "etth1" / "mac.yaml"), f"--data.init_args.data_dir={data_dir}",
                   "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.num_nodes=2",
                   "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)
    trainer = cli.trainer
    assert type(trainer.strategy.cluster_environment).__name__ == "SLURMEnvironment"
    assert (trainer.world_size, trainer.global_rank, trainer.node_rank, trainer.local_rank) == (4, 3, 1, 1)
    assert not trainer.is_global_zero and trainer.strategy.cluster_environment.main_address == "node1"


# -- mixed precision and torch.compile ---------------------------------------------------------------


def test_memory_recurrence_stays_float32_under_bf16_autocast() -> None:
    from titans_ts import NeuralMemory

    torch.manual_seed(0)
    memory = NeuralMemory(dim=16, heads=2, depth=2, chunk_size=4)
    x = torch.randn(3, 24, 16)
    reference, _ = memory(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = memory(x)
    assert all(w.dtype == torch.float32 for w in (*state.weights, *state.momentum))
    relative = (y.float() - reference).norm() / reference.norm()
    assert relative < 3e-2  # bf16 projections around a float32 recurrence
    y.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in memory.parameters() if p.requires_grad)


def tiny_fit(data_dir: Path, *extra: str) -> Any:
    args = ["fit", *TINY, f"--data.init_args.data_dir={data_dir}", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
            "--data.init_args.batch_size=32", "--trainer.logger=false", *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        return run_cli(args)


def test_bf16_mixed_precision_trains_from_the_cli(data_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = tiny_fit(data_dir, "--trainer.precision=bf16-mixed")
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.test_metrics and all(np.isfinite(v) for v in cli.test_metrics.values())
    # The weights stay float32 (autocast computes in bf16; the optimizer updates float32 masters).
    assert all(p.dtype == torch.float32 for p in cli.model.parameters())


def test_compile_option_compiles_inside_the_trainer_only(data_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    import torch._dynamo

    monkeypatch.chdir(tmp_path)
    # Inductor's C++ code generation takes minutes on 2 CPU cores: trace with TorchDynamo and run eagerly.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cli = tiny_fit(data_dir, "--model.compile=true")
    assert cli.model.hparams.compile is True
    assert cli.model.model._compiled_call_impl is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the network really went through dynamo
    assert not torch._dynamo.utils.counters["graph_break"]  # as one graph: breaks would recompile piecemeal
    assert all(np.isfinite(v) for v in cli.test_metrics.values())
    # A checkpoint loaded for serving stays eager and forecasts the same.
    loaded = TitansForecastingModule.load_from_checkpoint(cli.best_model_path, map_location="cpu", weights_only=True)
    assert loaded.model._compiled_call_impl is None
    # (The trained module holds the best weights after the test; a test batch's shape needs no new trace.)
    x = torch.from_numpy(np.stack([cli.datamodule.test_dataset[i][0].numpy() for i in range(32)]))
    with torch.no_grad():
        torch.testing.assert_close(cli.model.eval()(x), loaded.eval()(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_gpu_overlay_sets_the_gpu_and_bf16(capsys: pytest.CaptureFixture[str]) -> None:
    from forecasters.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "etth1" / "mac.yaml"), "--config",
              str(REPO / "configs" / "gpu.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    assert "precision: bf16-mixed" in printed and "accelerator: gpu" in printed
    assert "compile: false" in printed  # opt-in: its gain on a GPU is not measured yet
