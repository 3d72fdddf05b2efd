"""The forecasting network and its LightningModule on small synthetic windows."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from forecasters import RevIN, TitansForecastingModule, TitansForecastModel

SMALL = dict(dim=16, n_layers=1, heads=2, window=4, segment_len=4, chunk_size=4, n_persistent=2)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
@pytest.mark.parametrize(
    "layout",
    [dict(), dict(channel_independent=False), dict(patch_len=1, patch_stride=1), dict(revin=False),
     dict(linear_skip=True)],
    ids=["patches-ci", "channel-mixing", "point-tokens", "no-revin", "linear-skip"],
)
def test_forecast_shapes_and_gradients(variant, layout):
    torch.manual_seed(0)
    settings = {**SMALL, "patch_len": 6, "patch_stride": 3, **layout}
    model = TitansForecastModel(3, lookback=24, horizon=5, variant=variant, **settings)
    x = torch.randn(4, 24, 3)
    out, states = model(x)
    assert out.shape == (4, 5, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_target_subset_and_quantile_outputs():
    model = TitansForecastModel(4, lookback=16, horizon=3, n_targets=1, n_outputs=3, patch_len=4, patch_stride=4, **SMALL)
    out, _ = model(torch.randn(2, 16, 4))
    assert out.shape == (2, 3, 1, 3)


@pytest.mark.parametrize("layout", [dict(), dict(channel_independent=False), dict(n_targets=2, n_outputs=3)],
                         ids=["channel-independent", "channel-mixing", "targets-and-quantiles"])
def test_linear_skip_adds_a_linear_forecast_of_the_normalised_window(layout):
    torch.manual_seed(0)
    n_outputs = layout.get("n_outputs", 1)
    model = TitansForecastModel(3, lookback=24, horizon=5, linear_skip=True, patch_len=6, patch_stride=3,
                                **SMALL, **layout).eval()
    x = torch.randn(4, 24, 3) * 3 + 1
    with torch.no_grad():
        plain_start = model(x)[0]
        model.linear_skip.weight.normal_(0, 0.1)
        model.linear_skip.bias.normal_(0, 0.1)
        with_head = model(x)[0]
        model.head[-1].weight.zero_()
        model.head[-1].bias.zero_()
        skip_only = model(x)[0]
        normalised, mean, std = model.revin.normalize(x)
        linear = model.linear_skip(normalised.transpose(1, 2)).view(4, 3, 5, n_outputs).transpose(1, 2)
        targets = slice(3 - model.n_targets, None)
        expected = model.revin.denormalize(linear[:, :, targets], mean, std, targets)
    expected = expected.squeeze(-1) if n_outputs == 1 else expected
    torch.testing.assert_close(skip_only, expected)
    assert not torch.allclose(with_head, skip_only)  # the backbone's head still adds its part
    torch.manual_seed(0)
    plain = TitansForecastModel(3, lookback=24, horizon=5, patch_len=6, patch_stride=3, **SMALL, **layout).eval()
    assert model.linear_skip.weight.numel() == 24 * 5 * n_outputs and plain.linear_skip is None
    with torch.no_grad():  # the skip starts at zero: the same seed builds the same forecast as without it
        torch.testing.assert_close(plain_start, plain(x)[0])


def test_revin_is_reversible_and_scale_equivariant():
    revin = RevIN(3)
    with torch.no_grad():
        revin.weight.uniform_(0.5, 2.0)
        revin.bias.normal_()
    x = torch.randn(2, 10, 3) * 5 + 3
    z, mean, std = revin.normalize(x)
    back = revin.denormalize(z.unsqueeze(-1), mean, std, slice(None)).squeeze(-1)
    torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-4)
    # the whole model forecasts in the window's own units: scaling the input scales the forecast
    torch.manual_seed(0)
    model = TitansForecastModel(3, lookback=16, horizon=4, patch_len=4, patch_stride=4, **SMALL).eval()
    x = torch.randn(2, 16, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(10 * x + 7)[0], 10 * model(x)[0] + 7, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lookback=0), "lookback must be >= 1"),
        (dict(horizon=0), "horizon must be >= 1"),
        (dict(n_targets=5), "cannot exceed n_channels"),
        (dict(patch_len=32), "must not exceed lookback"),
        (dict(forecast_window=6), "lookback \\(16\\) must be a multiple of forecast_window \\(6\\)"),
        (dict(forecast_window=8, patch_len=12), "must not exceed the window the head sees, forecast_window"),
        (dict(forecast_window=8, variant="transformer"), "needs a memory to carry the past"),
    ],
)
def test_bad_model_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TitansForecastModel(**{"n_channels": 3, "lookback": 16, "horizon": 4, **kwargs})


def test_wrong_window_shape_is_named():
    model = TitansForecastModel(3, lookback=16, horizon=4, patch_len=4, patch_stride=4, **SMALL)
    with pytest.raises(ValueError, match=r"expected a window of shape \[batch, 16, 3\]"):
        model(torch.randn(2, 16, 2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss="huber"), "loss must be"),
        (dict(loss="quantile", quantiles=(0.1, 0.9)), "include 0.5"),
        (dict(lr=-1.0), "lr must be positive"),
        (dict(recompute_chunks=0), "recompute_chunks must be an integer >= 1"),
        (dict(linear_skip="false"), "linear_skip must be True or False"),
        (dict(past_gradient=1), "past_gradient must be True or False"),
        (dict(lookback=96, forecast_window=40), "lookback \\(96\\) must be a multiple of forecast_window"),
        (dict(variant="dlinear", forecast_window=48), "leave forecast_window=None"),
        (dict(variant="patchtst", forecast_window=48), "'patchtst' has no memory"),
        (dict(forecast_window=0), "forecast_window must be an integer >= 1"),
        (dict(forget_bias=float("nan")), "forget_bias must be"),
        (dict(forecast_window=8, patch_len=16), "must not exceed forecast_window"),
        (dict(lr_schedule="step"), "lr_schedule must be 'cosine'"),
        (dict(ema_decay=1.0), r"ema_decay must be a number in \(0, 1\)"),
        (dict(linear_skip_lr=1e-3), "linear skip, which is off; pass linear_skip=True"),
        (dict(linear_skip=True, linear_skip_lr=0.0), "linear_skip_lr must be positive"),
    ],
)
def test_bad_module_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TitansForecastingModule(**kwargs)


def synthetic_loader(n=64, lookback=16, horizon=4, channels=2):
    t = torch.arange(n + lookback + horizon, dtype=torch.float32)
    series = torch.stack([torch.sin(t / 3 + c) for c in range(channels)], dim=-1)
    x = torch.stack([series[i : i + lookback] for i in range(n)])
    y = torch.stack([series[i + lookback : i + lookback + horizon] for i in range(n)])
    return DataLoader(TensorDataset(x, y), batch_size=16)


def make_module(**kwargs):
    settings = dict(n_channels=2, lookback=16, horizon=4, patch_len=4, patch_stride=4, lr=3e-3, **SMALL)
    return TitansForecastingModule(**{**settings, **kwargs})


def fit(module, epochs=3):
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True)
    trainer.fit(module, synthetic_loader(), synthetic_loader())
    return trainer


def test_training_reduces_the_loss_and_logs_metrics():
    pl.seed_everything(0)
    module = make_module()
    loader = synthetic_loader()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    before = trainer.validate(module, loader, verbose=False)[0]["val_mse"]
    trainer = fit(module, epochs=4)
    after = trainer.callback_metrics["val_mse"].item()
    assert after < before
    assert {"train_loss_epoch", "val_mse", "val_mae", "val_loss"} <= set(trainer.callback_metrics)
    result = trainer.test(module, loader, verbose=False)[0]
    assert {"test_mse", "test_mae"} <= set(result)


@pytest.mark.parametrize("schedule, expected_factors", [
    ("cosine", [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
    ("halving", [1.0, 0.5, 0.25, 0.125]),
    ("constant", [1.0, 1.0, 1.0, 1.0]),
])
def test_lr_schedule_sets_the_rate_of_each_epoch(schedule, expected_factors):
    class RecordRate(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    rates = []
    module = make_module(lr_schedule=schedule)
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[RecordRate()])
    trainer.fit(module, synthetic_loader(), synthetic_loader())
    assert rates == pytest.approx([3e-3 * f for f in expected_factors])


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
def test_weight_decay_shrinks_the_matrices_and_leaves_biases_norms_and_gates_alone(variant):
    module = make_module(variant=variant, lr=0.1, weight_decay=0.5, lr_schedule="constant")
    optimizer = module.configure_optimizers()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: AdamW's step is the decay alone
    optimizer.step()
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(before) == len({id(p) for p in grouped})  # every parameter, once
    for name, p in module.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if p.ndim >= 2 else before[name]
        torch.testing.assert_close(p.detach(), expected, msg=name)
    gate_biases = [name for name, p in module.named_parameters() if "to_gates.bias" in name]
    assert gate_biases and all(module.get_parameter(name).ndim == 1 for name in gate_biases)


@pytest.mark.parametrize("variant", ["mac", "lmm"])
def test_linear_skip_lr_moves_the_skip_at_its_own_rate_and_the_rest_at_lr(variant):
    module = make_module(variant=variant, linear_skip=True, lr=1e-4, linear_skip_lr=1e-2, weight_decay=0.0,
                         lr_schedule="constant")
    optimizer = module.configure_optimizers()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.ones_like(p)  # Adam's first step moves every weight by its group's rate
    optimizer.step()
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(before) == len({id(p) for p in grouped})  # every parameter, once
    for name, p in module.named_parameters():
        rate = 1e-2 if name.startswith("model.linear_skip.") else 1e-4
        torch.testing.assert_close(before[name] - p.detach(), torch.full_like(p, rate), msg=name)
    # without it, the skip trains at lr with everything else
    assert {g["lr"] for g in make_module(variant=variant, linear_skip=True).configure_optimizers().param_groups} == {3e-3}


def test_the_old_cosine_schedule_switch_still_loads_as_lr_schedule():
    with pytest.warns(DeprecationWarning, match="lr_schedule"):
        module = make_module(cosine_schedule=False)
    assert module.hparams.lr_schedule == "constant" and "cosine_schedule" not in module.hparams


def test_ema_decay_validates_and_ends_with_the_moving_average_of_the_weights():
    class RecordWeights(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            steps.append({k: v.detach().clone() for k, v in module.named_parameters()})

    steps, decay = [], 0.7
    pl.seed_everything(0)
    module = make_module(ema_decay=decay)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[RecordWeights()])
    trainer.fit(module, synthetic_loader(), synthetic_loader())
    last_val_mse = trainer.callback_metrics["val_mse"].item()
    average = dict(steps[0])  # the first step's weights start the average
    for weights in steps[1:]:
        average = {k: decay * average[k] + (1 - decay) * w for k, w in weights.items()}
    assert len(steps) == 8 and not torch.equal(steps[-1]["model.head.2.weight"], average["model.head.2.weight"])
    for name, param in module.named_parameters():
        torch.testing.assert_close(param.detach(), average[name], msg=name)
    # The last validation judged the same averaged weights; outside fit the module adds no callback.
    checker = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert checker.validate(module, synthetic_loader(), verbose=False)[0]["val_mse"] == pytest.approx(last_val_mse)
    assert module.configure_callbacks() == []


def test_a_fit_with_ema_decay_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path):
    def run(epochs, ckpt_path=None, save=False):
        pl.seed_everything(0)
        module = make_module(ema_decay=0.7, lr_schedule="constant")
        callbacks = [pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)] if save else []
        trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=save, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks)
        trainer.fit(module, synthetic_loader(), synthetic_loader(), ckpt_path=ckpt_path)
        return module.state_dict()

    run(2, save=True)
    resumed, straight = run(3, ckpt_path=tmp_path / "last.ckpt"), run(3)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], msg=name)


def test_quantile_forecasts_never_cross():
    pl.seed_everything(0)
    module = make_module(loss="quantile", quantiles=(0.9, 0.1, 0.5, 0.25))
    fit(module, epochs=1)
    x = next(iter(synthetic_loader()))[0]
    module.eval()
    with torch.no_grad():
        quantiles = module.predict_quantiles(x)
        point = module(x)
    assert quantiles.shape == (16, 4, 2, 4)
    assert (quantiles.diff(dim=-1) >= 0).all()
    torch.testing.assert_close(point, quantiles[..., 2])  # levels sorted: 0.1, 0.25, 0.5, 0.9


def test_nan_loss_stops_training_with_a_named_step():
    module = make_module(lr=1e-3)
    x = torch.randn(8, 16, 2)
    y = torch.full((8, 4, 2), float("nan"))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(FloatingPointError, match="training loss became nan at step 0"):
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))


def test_checkpoint_loads_with_weights_only(tmp_path):
    pl.seed_everything(0)
    module = make_module()
    module.set_scaler([1.0, 2.0], [3.0, 4.0])
    trainer = fit(module, epochs=1)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = TitansForecastingModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    x = next(iter(synthetic_loader()))[0]
    module.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(module(x), loaded(x))
    assert torch.equal(loaded.target_mean, torch.tensor([1.0, 2.0]))
    out = loaded.predict_step((x,), 0)
    torch.testing.assert_close(out["forecast_original_units"], out["forecast"] * torch.tensor([3.0, 4.0]) + torch.tensor([1.0, 2.0]))


def test_recompute_chunks_reaches_every_memory_and_changes_no_gradient():
    x, y = next(iter(synthetic_loader()))
    grads = []
    for recompute in (None, 1):
        torch.manual_seed(0)
        module = make_module(variant="mal", chunk_size=1, dropout=0.0, recompute_chunks=recompute)
        memories = [m for m in module.modules() if type(m).__name__ == "NeuralMemory"]
        assert memories and all(m.recompute_chunks == recompute for m in memories)
        torch.nn.functional.mse_loss(module(x), y).backward()
        grads.append([p.grad for p in module.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
def test_compile_chunks_reaches_every_memory(variant):
    """The flag only (compiling and its results are tested in test_memory.py)."""
    module = make_module(variant=variant, compile_chunks=True)
    memories = [m for m in module.modules() if type(m).__name__ == "NeuralMemory"]
    assert memories and all(m.compile_chunks for m in memories)
    assert not any(m.compile_chunks for m in make_module(variant=variant).modules() if type(m).__name__ == "NeuralMemory")


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
@pytest.mark.parametrize("layout", [dict(), dict(channel_independent=False, linear_skip=True)],
                         ids=["channel-independent", "channel-mixing-skip"])
def test_forecast_window_reads_the_earlier_windows_into_the_memory_first(variant, layout):
    """A long window with forecast_window W equals a W-window model (same weights) streamed over the
    earlier windows, states carried, then forecasting from the last: the reference, window by window."""
    torch.manual_seed(0)
    settings = dict(patch_len=4, patch_stride=4, **SMALL, **layout)
    long = TitansForecastModel(3, lookback=36, horizon=5, variant=variant, forecast_window=12, **settings).eval()
    short = TitansForecastModel(3, lookback=12, horizon=5, variant=variant, **settings).eval()
    short.load_state_dict(long.state_dict())  # the same weights: W fixes every shape
    x = torch.randn(4, 36, 3) * 2 + 1
    with torch.no_grad():
        out, states = long(x)
        reference = None
        for start in (0, 12, 24):
            expected, reference = short(x[:, start : start + 12], reference)
        assert not torch.allclose(out, short(x[:, 24:])[0])  # the earlier windows matter
    torch.testing.assert_close(out, expected)
    for state, ref in zip(states, reference):
        torch.testing.assert_close(state.weights, ref.weights)
    # training: the earlier windows are read without gradient, so only the last window's values get one,
    # and the memory's initial weights (used at the stream's start only) get none; every other weight does
    long.train()
    x.requires_grad_(True)
    long(x)[0].sum().backward()
    assert (x.grad[:, :24] == 0).all() and (x.grad[:, 24:] != 0).any()
    no_grad = {name for name, p in long.named_parameters() if p.grad is None}
    assert no_grad == {name for name, _ in long.named_parameters() if ".memory.initial_weights." in name}
    # past_gradient: the same forecast, and the gradient now reaches the earlier windows and every weight
    long.past_gradient = True
    long.zero_grad()
    x.grad = None
    out_through = long.eval()(x)[0]
    torch.testing.assert_close(out_through, out)
    long.train()(x)[0].sum().backward()
    assert (x.grad[:, :12] != 0).any() and all(p.grad is not None for p in long.parameters())


def test_forecast_window_trains_in_the_module_and_loads_from_its_checkpoint(tmp_path):
    pl.seed_everything(0)
    module = TitansForecastingModule(n_channels=2, lookback=32, horizon=4, patch_len=4, patch_stride=4, lr=3e-3,
                                     forecast_window=16, variant="lmm", **SMALL)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    loader = synthetic_loader(lookback=32)
    trainer.fit(module, loader, loader)
    # the head's tokens are those of a 16-value window in patches of 4 (padded by one stride): 5, not 9 of 32
    assert module.model.n_tokens == 5 and module.model.head[-1].in_features == 5 * SMALL["dim"]
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = TitansForecastingModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    x = next(iter(loader))[0]
    module.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(module(x), loaded(x))
