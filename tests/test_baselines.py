"""Baselines of the accuracy benchmark (forecasters/baselines.py): DLinear-style and PatchTST-style.

They must be what their names promise (a moving-average decomposition with two linear maps; a
patch transformer without memory that attends both ways), train through the same module, and be
selectable from the shipped configs like any Titans variant.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from forecasters import TitansForecastingModule
from forecasters.baselines import MODEL_NAMES, DLinear, build_forecast_model
from forecasters.cli import run_cli
from forecasters.model import TitansForecastModel
from forecasters.validation import validate_hparams
from titans_ts.memory import NeuralMemory
from titans_ts.transformer import TransformerBlock

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_model_names_cover_the_variants_and_both_baselines() -> None:
    assert MODEL_NAMES == ("mac", "mag", "mal", "lmm", "patchtst", "dlinear")
    validate_hparams({"variant": "dlinear"})
    with pytest.raises(ValueError, match="patchtst"):
        build_forecast_model("informer", n_channels=3, lookback=32, horizon=8)


def test_dlinear_trend_is_a_centred_moving_average() -> None:
    model = DLinear(n_channels=1, lookback=32, horizon=8, moving_avg=5)
    ramp = torch.arange(32.0).view(1, 1, 32)
    trend = model.trend_of(ramp)
    assert trend.shape == ramp.shape
    torch.testing.assert_close(trend[..., 2:-2], ramp[..., 2:-2])  # a centred mean keeps a line
    assert trend[0, 0, 0] == pytest.approx((0 + 0 + 0 + 1 + 2) / 5)  # the edge value repeated
    with pytest.raises(ValueError, match="odd"):
        DLinear(n_channels=1, lookback=32, horizon=8, moving_avg=4)


def test_dlinear_is_the_sum_of_two_linear_maps_shared_by_channels() -> None:
    torch.manual_seed(0)
    model = DLinear(n_channels=3, lookback=24, horizon=6, moving_avg=5, revin=False)
    x = torch.randn(2, 24, 3)
    series = x.transpose(1, 2)
    trend = model.trend_of(series)
    expected = (model.seasonal(series - trend) + model.trend(trend)).transpose(1, 2)
    out, states = model(x)
    torch.testing.assert_close(out, expected)
    assert states == []


@pytest.mark.parametrize("variant", ["dlinear", "patchtst"])
def test_baselines_shapes_targets_and_quantiles(variant: str) -> None:
    model = build_forecast_model(variant, n_channels=4, lookback=32, horizon=8, n_targets=2, n_outputs=3,
                                 dim=16, n_layers=1, heads=2, patch_len=8, patch_stride=4)
    out, _ = model(torch.randn(5, 32, 4))
    assert out.shape == (5, 8, 2, 3)


def test_patchtst_is_the_patch_model_on_a_transformer_without_memory() -> None:
    model = build_forecast_model("patchtst", n_channels=2, lookback=64, horizon=8, dim=16, n_layers=2, heads=2,
                                 dropout=0.0)
    assert isinstance(model, TitansForecastModel)
    assert all(isinstance(block, TransformerBlock) for block in model.backbone.blocks)
    assert not any(isinstance(m, NeuralMemory) for m in model.modules())
    # Non-causal over the lookback's patches: the first token's output depends on the last token.
    tokens = torch.randn(1, model.n_tokens, 16, requires_grad=True)
    h, _ = model.backbone(tokens)
    h[0, 0].sum().backward()
    assert tokens.grad[0, -1].abs().sum() > 0


def test_patchtst_config_is_of_similar_size_to_the_titans_variants() -> None:
    def n_params(variant: str) -> int:
        config = yaml.safe_load((CONFIGS / "model" / f"{variant}.yaml").read_text())
        module = TitansForecastingModule(n_channels=7, lookback=96, horizon=96, **config)
        return sum(p.numel() for p in module.parameters())

    titans = [n_params(v) for v in ("mac", "mag", "mal", "lmm")]
    assert min(titans) <= n_params("patchtst") <= max(titans)
    assert n_params("dlinear") < min(titans) / 5  # the linear baseline is small, as it should be


@pytest.mark.parametrize("variant", ["dlinear", "patchtst"])
def test_baselines_train_through_the_module(variant: str) -> None:
    torch.manual_seed(0)
    t = torch.arange(400.0)
    series = torch.stack([torch.sin(2 * np.pi * t / 24 + phase) for phase in (0.0, 1.0)], dim=-1)
    windows = series.unfold(0, 48, 4).permute(0, 2, 1)  # [n, 48, 2]
    x, y = windows[:, :32], windows[:, 32:]
    module = TitansForecastingModule(n_channels=2, lookback=32, horizon=16, variant=variant, dim=16, n_layers=1,
                                     heads=2, patch_len=8, patch_stride=4, moving_avg=5, lr=1e-2, dropout=0.0)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    first = module._loss(module(x), y).item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = module._loss(module(x), y)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic file with ETTh1's schema and length (never the network)."""
    folder = tmp_path_factory.mktemp("data")
    t = np.arange(14400)
    values = np.sin(2 * np.pi * t[:, None] / 24 + np.arange(7)) + 0.1 * np.random.default_rng(0).standard_normal((14400, 7))
    frame = pd.DataFrame(values, columns=["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"])
    frame.insert(0, "date", pd.date_range("2016-07-01", periods=14400, freq="h").strftime("%Y-%m-%d %H:%M:%S"))
    frame.to_csv(folder / "ETTh1.csv", index=False)
    return folder


@pytest.mark.parametrize("variant", ["dlinear", "patchtst"])
def test_shipped_config_fits_tests_and_reloads(variant: str, data_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "etth1" / f"{variant}.yaml"), f"--data.init_args.data_dir={data_dir}",
            "--data.init_args.horizon=24", "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    with contextlib.redirect_stdout(io.StringIO()):
        cli = run_cli(args)
    assert cli.model.hparams.variant == variant and cli.model.model.horizon == 24
    assert np.isfinite(cli.test_metrics["test_mse"])
    reloaded = TitansForecastingModule.load_from_checkpoint(cli.best_model_path, map_location="cpu", weights_only=True)
    x = torch.randn(3, 96, 7)
    torch.testing.assert_close(reloaded.eval()(x), cli.model.cpu().eval()(x))
