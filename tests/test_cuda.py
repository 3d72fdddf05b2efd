"""The CUDA path: the memory update, the Titans blocks, Lightning training, sktime and the command line on a GPU.

Skipped where torch sees no CUDA device (CI has none). On a GPU machine: `pytest tests/test_cuda.py`.
The chunked update is held to the token-by-token reference on the GPU as on the CPU, and the GPU
to the CPU in float64 (where both must agree to rounding); float32 checks run with TF32 off, which
is torch's default for matmuls.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch

from forecasters import TitansForecastingModule, TitansForecastModel
from test_memory import BATCH, DIM, LENGTH, assert_states_close, eager_and_compiled_chunks, make_memory, relative_error
from test_model import SMALL, synthetic_loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("depth, chunk_size", [(1, 1), (2, 3), (2, 8), (3, 64)])
@pytest.mark.parametrize("carry_state", [False, True])
def test_chunked_update_matches_the_reference_on_cuda(dtype, tol, depth, chunk_size, carry_state):
    memory = make_memory(depth, chunk_size, dtype).to(CUDA)
    x = torch.randn(BATCH, LENGTH, DIM, dtype=dtype, device=CUDA)
    state = None
    with torch.no_grad():
        if carry_state:  # a state that ends mid-chunk, with nonzero momentum
            _, state = memory.reference(torch.randn(BATCH, 5, DIM, dtype=dtype, device=CUDA))
        y_fast, s_fast = memory(x, state)
        y_ref, s_ref = memory.reference(x, state)
    assert y_fast.device.type == "cuda" and all(w.device.type == "cuda" for w in s_fast.weights)
    assert relative_error(y_fast, y_ref) <= tol
    assert_states_close(s_fast, s_ref, tol)


@pytest.mark.parametrize("depth, chunk_size, max_grad_norm", [(1, 3, None), (2, 8, None), (2, 5, 0.05)])
def test_cuda_equals_cpu_in_float64_outputs_states_and_gradients(depth, chunk_size, max_grad_norm):
    results = []
    for device in ("cpu", CUDA):
        memory = make_memory(depth, chunk_size, max_grad_norm=max_grad_norm).to(device)
        torch.manual_seed(1)
        x = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64).to(device)
        y, state = memory(x)
        (y.square().sum() + sum(w.sum() for w in state.weights)).backward()
        grads = {name: p.grad.cpu() for name, p in memory.named_parameters()}
        results.append((y.detach().cpu(), [w.detach().cpu() for w in state.weights], grads))
    (y_cpu, w_cpu, g_cpu), (y_gpu, w_gpu, g_gpu) = results
    assert relative_error(y_gpu, y_cpu) <= 1e-10
    for a, b in zip(w_gpu, w_cpu, strict=True):
        assert relative_error(a, b) <= 1e-10
    for name, grad in g_cpu.items():
        assert relative_error(g_gpu[name], grad) <= 1e-10, name


def test_bf16_autocast_on_cuda_keeps_the_recurrence_float32():
    torch.manual_seed(0)
    memory = make_memory(2, chunk_size=8, dtype=torch.float32).to(CUDA)
    x = torch.randn(BATCH, 40, DIM, device=CUDA)
    y32, _ = memory(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16, state = memory(x)
    y16.float().sum().backward()
    assert all(w.dtype == torch.float32 for w in (*state.weights, *state.momentum))
    assert torch.isfinite(y16).all()
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in memory.parameters())
    assert relative_error(y16.float(), y32.detach()) < 0.1


def test_compiled_chunks_match_eager_on_cuda():
    """compile_chunks=True on CUDA (Triton kernels): outputs, states and gradients of the eager step."""
    (y_eager, s_eager, g_eager), (y_compiled, s_compiled, g_compiled), _ = eager_and_compiled_chunks(torch.float32, CUDA)
    assert relative_error(y_compiled, y_eager) <= 1e-5
    assert_states_close(s_compiled, s_eager, 1e-5)
    for name, grad in g_eager.items():
        assert relative_error(g_compiled[name], grad) <= 1e-4, name


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
def test_every_variant_on_cuda_equals_cpu_in_float64(variant):
    outputs = []
    for device in ("cpu", CUDA):
        torch.manual_seed(0)
        model = TitansForecastModel(3, lookback=24, horizon=5, variant=variant, patch_len=6, patch_stride=3,
                                    linear_skip=True, **{**SMALL, "dropout": 0.0}).double().to(device)
        x = torch.randn(4, 24, 3, dtype=torch.float64).to(device)
        out, _ = model(x)
        out.square().mean().backward()
        outputs.append((out.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}))
    (out_cpu, g_cpu), (out_gpu, g_gpu) = outputs
    assert relative_error(out_gpu, out_cpu) <= 1e-10
    for name, grad in g_cpu.items():
        assert relative_error(g_gpu[name], grad) <= 1e-8, name


class _TrainingDevice(pl.Callback):
    """The device the module trained on (Lightning moves it back to the CPU when fit ends)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.device = pl_module.device


def _fit(accelerator: str, precision: str = "32-true", **module_kwargs) -> tuple[TitansForecastingModule, dict, str]:
    pl.seed_everything(0)
    module = TitansForecastingModule(n_channels=2, lookback=16, horizon=4, patch_len=4, patch_stride=4, lr=3e-3,
                                     **{**SMALL, "dropout": 0.0}, **module_kwargs)
    seen = _TrainingDevice()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[seen])
    trainer.fit(module, synthetic_loader(), synthetic_loader())
    metrics = trainer.test(module, synthetic_loader(), verbose=False)[0]
    return module, metrics, seen.device.type


def test_lightning_training_on_gpu_matches_cpu_in_float32():
    cpu_module, cpu_metrics, _ = _fit("cpu")
    gpu_module, gpu_metrics, device = _fit("gpu")
    assert device == "cuda"
    for name, value in cpu_metrics.items():
        assert gpu_metrics[name] == pytest.approx(value, rel=1e-3), name
    for (name, a), b in zip(cpu_module.state_dict().items(), gpu_module.state_dict().values(), strict=True):
        if a.is_floating_point():
            assert relative_error(b.cpu().float(), a.float()) <= 1e-3, name


def test_lightning_training_on_gpu_in_bf16_with_compile_trains_float32_weights():
    module, metrics, device = _fit("gpu", precision="bf16-mixed", compile=True)
    assert device == "cuda"
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())
    assert np.isfinite([metrics["test_mse"], metrics["test_mae"]]).all()
    _, eager, _ = _fit("gpu", precision="bf16-mixed")  # the same run without compile: as good, within bf16 rounding
    assert metrics["test_mse"] == pytest.approx(eager["test_mse"], rel=0.05)


def test_sktime_forecaster_fits_on_gpu_and_returns_a_cpu_model():
    from titans_ts import TitansForecaster

    index = pd.period_range("2020-01-01", periods=120, freq="h")
    y = pd.DataFrame({"a": np.sin(np.arange(120) / 4), "b": np.cos(np.arange(120) / 6)}, index=index)
    # no dropout: CUDA draws its masks from another generator than the CPU, so the fits would differ
    settings = dict(variant="mac", lookback=24, max_epochs=2, random_state=0, dim=16, n_layers=1, heads=2,
                    chunk_size=4, patch_len=4, patch_stride=4, dropout=0.0)
    predictions = {}
    for accelerator in ("cpu", "gpu"):
        forecaster = TitansForecaster(accelerator=accelerator, **settings).fit(y, fh=range(1, 7))
        predictions[accelerator] = forecaster.predict()
        assert next(forecaster.network_.parameters()).device.type == "cpu"  # picklable and servable anywhere
        forecaster.update(y.iloc[-10:].set_axis(pd.period_range(index[-1] + 1, periods=10, freq="h")),
                          update_params=False)
        assert np.isfinite(forecaster.predict().to_numpy()).all()
    pd.testing.assert_index_equal(predictions["gpu"].index, predictions["cpu"].index)
    np.testing.assert_allclose(predictions["gpu"].to_numpy(), predictions["cpu"].to_numpy(), rtol=1e-3, atol=1e-3)


def test_cli_fit_with_the_gpu_overlay_trains_tests_and_logs_a_cpu_model(data_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """`titans-ts fit --config configs/etth1/mac.yaml --config configs/gpu.yaml`: bf16 on the GPU, the run
    in MLflow, and its logged model loads and forecasts on a machine without one."""
    import mlflow
    import mlflow.pytorch

    from forecasters.cli import run_cli
    from test_cli import etth1_args

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli = run_cli(["fit", *etth1_args(data_dir), "--config", str(REPO / "configs" / "gpu.yaml"),
                       "--seed_everything=0"])
    assert cli.trainer.strategy.root_device.type == "cuda" and cli.trainer.precision == "bf16-mixed"
    assert "test_mse" in out.getvalue()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.MlflowClient().get_run(cli.trainer.logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.precision"] == "bf16-mixed" and run.data.params["trainer.accelerator"] == "gpu"
    assert np.isfinite([run.data.metrics["test_mse"], run.data.metrics["test_mae"]]).all()
    model = mlflow.pytorch.load_model(cli.model_uri, map_location="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    x = torch.from_numpy(np.stack([cli.datamodule.test_dataset[i][0].numpy() for i in range(3)]))
    with torch.no_grad():
        forecast = model(x)
    assert forecast.shape == (3, 96, 7) and torch.isfinite(forecast).all()
