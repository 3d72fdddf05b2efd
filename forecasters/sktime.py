"""TitansForecaster: the Titans forecaster as an sktime estimator (fit/predict/update in pipelines).

A thin shell over :class:`forecasters.module.TitansForecastingModule`: ``_fit`` scales y, cuts it
into windows, trains the Lightning module with a local ``Trainer`` (dropped afterwards) and then
*streams* the whole series through the trained network, window after window, carrying the neural
long-term memory's state from one window to the next. ``predict`` forecasts from the last
``lookback`` values **and** that carried memory; ``update(y_new, update_params=False)`` feeds the
new observations through the memory (test-time memorisation, no gradient step on the trained
weights) and moves the cutoff.

Written to sktime's forecaster extension template (sktime >= 1.1 tag names).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from scipy.special import ndtri
from sklearn.utils import check_random_state
from sktime.forecasting.base import BaseForecaster, ForecastingHorizon
from torch.utils.data import ConcatDataset, DataLoader

from datamodules.base import WindowDataset
from forecasters.module import TitansForecastingModule
from forecasters.validation import check_int, validate_hparams
from titans_ts.memory import MemoryState

__all__ = ["TitansForecaster"]

_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
# keys of `model_kwargs` that TitansForecaster sets itself
_OWN_MODEL_ARGS = frozenset({
    "n_channels", "lookback", "horizon", "n_targets", "variant", "dim", "n_layers", "heads", "memory_depth",
    "chunk_size", "dropout", "patch_len", "patch_stride", "channel_independent", "loss", "quantiles", "lr",
    "weight_decay",
})


class TitansForecaster(BaseForecaster):
    """Titans neural long-term memory forecaster (global deep model with test-time memorisation).

    A window of the last ``lookback`` values of every column of y is patched into tokens, read by a
    stack of Titans blocks (``variant``: memory as context, gate, layer, or the memory alone) and
    mapped by a linear head to the next ``H`` steps, where ``H`` is the largest step of the
    forecasting horizon passed to ``fit`` (so ``fh`` is required in ``fit``; predicting further
    ahead needs a refit). Columns are modelled channel-independently by default (one token
    sequence per column, shared weights), after scaling each column by its mean and standard
    deviation over the training data and reversible instance normalisation per window.

    Panel and hierarchical y are modelled by one global network trained on the windows of all
    instances; each instance is forecast from its own last values and its own memory state.

    **Memory that learns at test time.** After training, every series is streamed through the
    network in consecutive windows of ``lookback`` values, carrying the memory state of each
    layer from window to window (the grid of windows starts at the series' first value). The
    state after the last window that ends at or before the prediction window is kept (as arrays)
    with the recent tail of the series. ``predict`` runs the network on the last ``lookback``
    values starting from that state. ``update(y_new, update_params=False)`` appends the new
    values and advances the states over every newly completed window: the memory memorises the
    new data, the trained weights are not touched. ``update_params=True`` additionally fine-tunes
    the weights for ``finetune_epochs`` epochs on the windows whose targets contain new values
    (the memory states are then carried on with the fine-tuned weights). Values in ``update``
    at or before an instance's last seen time point are ignored, so re-sending an expanding
    window works.

    Parameters
    ----------
    variant : {"mac", "mag", "mal", "lmm"}, default="mac"
        Titans block: memory as context, as gate, as layer, or the long-term memory alone.
    lookback : int, default=96
        Input window length L. Every series (instance) needs at least
        ``lookback + H`` values (plus the validation tail, see ``validation_size``).
    dim : int, default=64
        Token width of the backbone.
    n_layers : int, default=2
        Number of Titans blocks.
    heads : int, default=4
        Attention and memory heads (``dim`` must be a multiple).
    memory_depth : int, default=2
        Layers of each memory MLP (1 = a matrix memory).
    chunk_size : int, default=16
        Tokens per chunk of the memory's parallel update.
    patch_len : int, default=16
        Values per token (1 = one token per time point); at most ``lookback``.
    patch_stride : int, default=8
        Step between patches.
    dropout : float, default=0.1
        Dropout in the backbone and head (training only).
    channel_independent : bool, default=True
        True: each column its own token sequence, weights shared. False: tokens mix all columns.
    loss : {"mse", "mae", "quantile"}, default="mse"
        Training loss. ``"quantile"`` trains one head per level of ``quantiles`` (pinball loss)
        and enables ``predict_quantiles``, ``predict_interval``; the point forecast is the median.
    quantiles : tuple of float, default=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
        Quantile levels learned with ``loss="quantile"``; must contain 0.5. Other levels are
        interpolated linearly on the normal-score scale between the learned ones (linearly
        extrapolated beyond them); quantiles are sorted, so they never cross.
    model_kwargs : dict or None, default=None
        Further arguments of ``TitansForecastingModule`` (e.g. ``window``, ``segment_len``,
        ``n_persistent``, ``max_lr``, ``revin``, ``linear_skip`` and its own rate ``linear_skip_lr``,
        ``lr_schedule``; ``forecast_window`` to let the memory read all ``lookback`` values while
        the head sees the last ones; ``forget_bias``
        for a memory that forgets faster, so a state carried over many windows settles; ``ema_decay``,
        e.g. 0.998, to train, validate and keep a moving average of the weights).
    max_epochs : int, default=20
        Maximum training epochs.
    batch_size : int, default=32
        Windows per training batch.
    lr : float, default=1e-3
        AdamW learning rate (cosine-annealed over ``max_epochs`` by default; ``model_kwargs``
        ``lr_schedule="halving"`` halves it after every epoch, ``"constant"`` keeps it).
    weight_decay : float, default=1e-4
        AdamW weight decay, on the weight matrices only (not on biases, norm gains, RevIN's affine
        parameters or the memory's gate biases).
    validation_size : float or int, default=0.2
        Tail of each instance held out for early stopping: a fraction of its length (float in
        [0, 1); at least H values) or a number of values (int, 0 or >= H). 0 disables validation
        and early stopping. The weights of the best validation epoch are kept. The held-out tail
        is still streamed into the memory after training.
    early_stopping_patience : int or None, default=3
        Epochs without improvement of the validation loss before training stops; None: never.
    carry_memory : bool, default=True
        Use the carried memory states in ``predict`` (the default). False: every forecast starts
        from a fresh memory, as in training, and ``update`` only moves the window.
    finetune_epochs : int, default=3
        Epochs of fine-tuning in ``update(..., update_params=True)`` (0: memory update only).
    random_state : int, np.random.RandomState or None, default=None
        Seed of the weight initialisation, batch order and dropout. Set it for reproducible fits;
        the global torch random state is left unchanged either way.
    accelerator : str, default="auto"
        Lightning accelerator for training ("auto", "cpu", "gpu", ...). The fitted network is kept
        on the CPU, where the memory streams and forecasts are computed.
    verbose : bool, default=False
        Show Lightning's progress bar, model summary, info messages and warnings.

    Attributes
    ----------
    network_ : TitansForecastingModule
        The trained network (on the CPU, eval mode). Its weights change only in ``fit`` and in
        ``update(..., update_params=True)``.
    horizon_ : int
        H, the number of steps the network forecasts.
    n_epochs_ : int
        Epochs trained.
    best_val_loss_ : float or None
        Best validation loss (scaled units), None without validation.

    Examples
    --------
    >>> from sktime.datasets import load_airline
    >>> from titans_ts import TitansForecaster
    >>> y = load_airline()
    >>> forecaster = TitansForecaster(
    ...     variant="lmm", lookback=24, dim=8, n_layers=1, heads=2, patch_len=4, patch_stride=4,
    ...     max_epochs=2, validation_size=0, random_state=0,
    ... )
    >>> y_pred = forecaster.fit(y, fh=[1, 2, 3]).predict()
    >>> y_pred.shape
    (3,)
    >>> forecaster = forecaster.update(y_pred + 50.0, update_params=False)  # memorise new data
    """

    _tags = {
        "authors": ["titans-ts developers"],
        "maintainers": ["titans-ts developers"],
        "python_dependencies": ["torch", "lightning"],
        "y_inner_mtype": ["pd.DataFrame", "pd-multiindex", "pd_multiindex_hier"],
        "X_inner_mtype": "pd.DataFrame",
        "capability:multivariate": True,
        "capability:exogenous": False,
        "requires-fh-in-fit": True,
        "capability:insample": False,
        "capability:pred_int": True,  # with loss="quantile"; set per instance in __dynamic_tags__
        "capability:pred_int:insample": False,
        "capability:missing_values": False,
        "capability:unequal_length": True,
        "capability:update": True,
        "capability:random_state": True,
        "property:randomness": "derandomized",
        "fit_is_empty": False,
    }

    # The base class's pool of all data seen (_y, _X) is not needed: update keeps its own tail.
    # This is sktime 1.3's default, adopted early (no FutureWarning at construction). The class
    # defaults below only make `_y`/`_X` read as None, as the base class expects, when a user
    # switches the pool back on with set_config(remember_data=True) after construction.
    _config = {"remember_data": False}
    _y = None
    _X = None

    def __init__(
        self,
        variant: str = "mac",
        lookback: int = 96,
        dim: int = 64,
        n_layers: int = 2,
        heads: int = 4,
        memory_depth: int = 2,
        chunk_size: int = 16,
        patch_len: int = 16,
        patch_stride: int = 8,
        dropout: float = 0.1,
        channel_independent: bool = True,
        loss: str = "mse",
        quantiles: Sequence[float] = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95),
        model_kwargs: dict | None = None,
        max_epochs: int = 20,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        validation_size: float | int = 0.2,
        early_stopping_patience: int | None = 3,
        carry_memory: bool = True,
        finetune_epochs: int = 3,
        random_state: int | np.random.RandomState | None = None,
        accelerator: str = "auto",
        verbose: bool = False,
    ) -> None:
        self.variant = variant
        self.lookback = lookback
        self.dim = dim
        self.n_layers = n_layers
        self.heads = heads
        self.memory_depth = memory_depth
        self.chunk_size = chunk_size
        self.patch_len = patch_len
        self.patch_stride = patch_stride
        self.dropout = dropout
        self.channel_independent = channel_independent
        self.loss = loss
        self.quantiles = quantiles
        self.model_kwargs = model_kwargs
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.validation_size = validation_size
        self.early_stopping_patience = early_stopping_patience
        self.carry_memory = carry_memory
        self.finetune_epochs = finetune_epochs
        self.random_state = random_state
        self.accelerator = accelerator
        self.verbose = verbose
        super().__init__()

    def __dynamic_tags__(self) -> None:
        # quantile heads exist only with the pinball loss
        self.set_tags(**{"capability:pred_int": self.loss == "quantile"})

    # ------------------------------------------------------------------------------------------
    # sktime interface
    # ------------------------------------------------------------------------------------------
    def fit(self, y: Any, X: Any = None, fh: Any = None) -> TitansForecaster:
        """sktime's ``fit``, after :func:`_check_time_series` (clearer errors than the generic conversion ones)."""
        _check_time_series(y, type(self).__name__)
        return super().fit(y, X=X, fh=fh)

    def update(self, y: Any, X: Any = None, update_params: bool = True) -> TitansForecaster:
        """sktime's ``update``, after the same checks as ``fit``."""
        _check_time_series(y, type(self).__name__)
        return super().update(y, X=X, update_params=update_params)

    def _fit(self, y: pd.DataFrame, X: pd.DataFrame | None = None, fh: ForecastingHorizon | None = None):
        """Train the network on windows of y (all instances), then stream y into the memory."""
        self._check_params()
        self._check_values(y, "y")
        self.columns_ = y.columns
        self._index_names = list(y.index.names)
        self._is_multiindex = isinstance(y.index, pd.MultiIndex)
        frames = self._split_instances(y)
        lookback = int(self.lookback)

        horizon = max(int(self._steps(fh, last).max()) for _, last, _ in frames)
        if horizon < 1:
            raise ValueError(f"fh must reach at least one step past the cutoff, got {fh}")
        self.horizon_ = horizon

        values = [df.to_numpy(dtype=np.float64) for _, _, df in frames]
        n_val = [self._n_validation(len(v), horizon) for v in values]
        for (key, _, _), v, nv in zip(frames, values, n_val):
            need = lookback + horizon + nv
            if len(v) < need:
                where = "y" if not self._is_multiindex else f"instance {key!r} of y"
                val = f" + validation tail {nv}" if nv else ""
                raise ValueError(
                    f"{where} has {len(v)} time points, too short for lookback {lookback} + horizon {horizon}{val} "
                    f"(= {need}); pass a smaller lookback{', validation_size=0' if nv else ''} or a longer series"
                )

        stacked = np.concatenate(values, axis=0)
        mean = stacked.mean(axis=0)
        std = stacked.std(axis=0)
        std = np.where(np.isfinite(std) & (std > 1e-8 * np.maximum(1.0, np.abs(mean))), std, 1.0)
        self.scaler_mean_, self.scaler_std_ = mean, std
        scaled = [((v - mean) / std).astype(np.float32) for v in values]

        train_sets, val_sets = [], []
        for s, nv in zip(scaled, n_val):
            train_sets.append(WindowDataset(np.ascontiguousarray(s[: len(s) - nv]), lookback, horizon))
            if nv:
                val_sets.append(WindowDataset(np.ascontiguousarray(s[len(s) - nv - lookback :]), lookback, horizon))
        train = ConcatDataset(train_sets)
        val = ConcatDataset(val_sets) if val_sets else None

        self._seed = self._draw_seed()
        self._n_finetunes = 0
        with self._torch_rng(self._seed) as generator:
            network = self._build_network(n_channels=len(self.columns_), horizon=horizon)
            network.set_scaler(mean, std)
            self.n_epochs_, self.best_val_loss_ = self._train(network, train, val, int(self.max_epochs), generator)
        self.network_ = network

        self._streams = []
        for (key, last, _), s in zip(frames, scaled):
            self._streams.append({"key": key, "last": last, "tail": s, "consumed": 0, "state": None})
        self._advance_streams()
        return self

    def _predict(self, fh: ForecastingHorizon, X: pd.DataFrame | None = None) -> pd.DataFrame:
        """Point forecasts (the median with loss="quantile") at fh, per instance."""
        out = self._forecast(quantiles=False)  # [n_instances, H, C]
        return self._to_frame(fh, lambda i, steps: out[i, steps - 1], self.columns_)

    def _predict_quantiles(self, fh: ForecastingHorizon, X: pd.DataFrame | None, alpha: list[float]) -> pd.DataFrame:
        """Quantile forecasts at levels alpha, interpolated between the learned quantile heads."""
        learned = self._forecast(quantiles=True)  # [n_instances, H, C, Q], sorted along Q
        levels = self.network_.quantile_levels.numpy().astype(np.float64)
        values = _interpolate_quantiles(learned, levels, np.asarray(alpha, dtype=np.float64))  # [..., A]
        columns = pd.MultiIndex.from_product([self.columns_, list(alpha)])

        def rows(i: int, steps: np.ndarray) -> np.ndarray:
            block = values[i, steps - 1]  # [n_steps, C, A]
            return block.reshape(len(steps), -1)  # variable-major, as the columns

        return self._to_frame(fh, rows, columns)

    def _update(self, y: pd.DataFrame, X: pd.DataFrame | None = None, update_params: bool = True):
        """Feed new observations through the memory (and fine-tune if update_params)."""
        self._check_values(y, "y")
        if list(y.columns) != list(self.columns_):
            raise ValueError(
                f"update got y with columns {list(y.columns)}, but {type(self).__name__} was fitted on columns "
                f"{list(self.columns_)}; pass the same columns in the same order (or refit)"
            )
        if isinstance(y.index, pd.MultiIndex) != self._is_multiindex or (
            self._is_multiindex and y.index.nlevels != len(self._index_names)
        ):
            raise ValueError(
                "update got y with a different index structure (levels "
                f"{list(y.index.names)}) than in fit ({self._index_names}); pass data of the same kind"
            )
        by_key = {stream["key"]: i for i, stream in enumerate(self._streams)}
        parts = self._split_instances(y)
        unseen = [key for key, _, _ in parts if key not in by_key]
        if unseen:  # checked before anything changes
            raise ValueError(
                f"update got instances {unseen[:5]} that were not seen in fit; this {type(self).__name__} forecasts "
                f"the instances {[s['key'] for s in self._streams][:10]}; refit to add instances"
            )
        appended: dict[int, int] = {}
        for key, last, df in parts:
            stream = self._streams[by_key[key]]
            new = df[df.index.get_level_values(-1) > stream["last"]] if stream["last"] is not None else df
            if len(new) == 0:
                continue
            scaled = ((new.to_numpy(dtype=np.float64) - self.scaler_mean_) / self.scaler_std_).astype(np.float32)
            stream["tail"] = np.concatenate([stream["tail"], scaled], axis=0)
            stream["last"] = last
            appended[by_key[key]] = len(scaled)

        if update_params and appended and int(self.finetune_epochs) > 0:
            self._finetune(appended)
        self._advance_streams()
        return self

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
    def _build_network(self, n_channels: int, horizon: int):
        extra = dict(self.model_kwargs or {})
        clash = sorted(set(extra) & _OWN_MODEL_ARGS)
        if clash:
            raise ValueError(f"model_kwargs must not set {clash}: they are parameters of {type(self).__name__}")
        return TitansForecastingModule(
            n_channels=n_channels, lookback=int(self.lookback), horizon=horizon, variant=self.variant, dim=self.dim,
            n_layers=self.n_layers, heads=self.heads, memory_depth=self.memory_depth, chunk_size=self.chunk_size,
            dropout=self.dropout, patch_len=self.patch_len, patch_stride=self.patch_stride,
            channel_independent=self.channel_independent, loss=self.loss, quantiles=tuple(self.quantiles),
            lr=self.lr, weight_decay=self.weight_decay, **extra,
        )

    def _train(self, network, train, val, max_epochs: int, generator) -> tuple[int, float | None]:
        """Fit `network` with a local Lightning Trainer; returns (epochs run, best validation loss)."""
        batch_size = max(1, min(int(self.batch_size), len(train)))
        train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator)
        callbacks: list[Any] = []
        val_loader = None
        keep_best = None
        if val is not None and len(val) > 0:
            val_loader = DataLoader(val, batch_size=max(1, min(int(self.batch_size), len(val))))
            keep_best = _KeepBestWeights()
            callbacks.append(keep_best)
            if self.early_stopping_patience is not None:
                callbacks.append(EarlyStopping(monitor="val_loss", mode="min", patience=int(self.early_stopping_patience)))
        with tempfile.TemporaryDirectory() as root, _quiet(self.verbose), _deterministic_algorithms():
            trainer = pl.Trainer(
                accelerator=self.accelerator, devices=1, max_epochs=max_epochs, logger=False,
                enable_checkpointing=False, enable_progress_bar=bool(self.verbose),
                enable_model_summary=bool(self.verbose), num_sanity_val_steps=0, callbacks=callbacks,
                default_root_dir=root, log_every_n_steps=1,
            )
            trainer.fit(network, train_dataloaders=train_loader, val_dataloaders=val_loader)
            epochs = int(trainer.current_epoch)
            del trainer
        network.trainer = None  # never keep a Trainer (or its logger) on self
        network.cpu().eval()
        best = None
        if keep_best is not None and keep_best.state is not None:
            network.load_state_dict(keep_best.state)
            best = keep_best.best
        return epochs, best

    def _finetune(self, appended: dict[int, int]) -> None:
        """A few epochs on the windows whose targets contain newly appended values."""
        lookback, horizon = int(self.lookback), self.horizon_
        sets = []
        for i, n_new in appended.items():
            tail = self._streams[i]["tail"]
            first_target = len(tail) - n_new  # index of the first new value
            start = max(0, first_target - lookback - horizon + 1)
            part = tail[start:]
            if len(part) >= lookback + horizon:
                sets.append(WindowDataset(np.ascontiguousarray(part), lookback, horizon))
        if not sets:
            return
        self._n_finetunes += 1
        seed = (self._seed + 1_000_003 * self._n_finetunes) % (2**63 - 1)
        with self._torch_rng(seed) as generator:
            network = self.network_
            network.train()
            self._train(network, ConcatDataset(sets), None, int(self.finetune_epochs), generator)

    # ------------------------------------------------------------------------------------------
    # memory streams and forecasts
    # ------------------------------------------------------------------------------------------
    def _advance_streams(self) -> None:
        """Feed every complete window that ends before each instance's prediction window."""
        lookback = int(self.lookback)
        keep = lookback + self.horizon_ - 1  # enough for the fine-tuning windows of update
        with torch.no_grad():
            while self.carry_memory:
                pending = [i for i, s in enumerate(self._streams) if len(s["tail"]) - s["consumed"] >= 2 * lookback]
                if not pending:
                    break
                for idx in self._group_by_position(pending):
                    windows = np.stack([
                        self._streams[i]["tail"][self._streams[i]["consumed"] : self._streams[i]["consumed"] + lookback]
                        for i in idx
                    ])
                    _, states = self._run([self._streams[i]["state"] for i in idx], windows)
                    for i, state in zip(idx, states):
                        self._streams[i]["state"] = state
                        self._streams[i]["consumed"] += lookback
        for s in self._streams:
            if not self.carry_memory:
                s["consumed"] = max(s["consumed"], len(s["tail"]) - lookback)
            cut = max(0, min(s["consumed"], len(s["tail"]) - keep))
            s["tail"] = np.ascontiguousarray(s["tail"][cut:])
            s["consumed"] -= cut

    def _forecast(self, quantiles: bool) -> np.ndarray:
        """Network output for every instance in original units: [n, H, C] or [n, H, C, Q] (sorted)."""
        if quantiles and self.loss != "quantile":
            raise NotImplementedError(f"{type(self).__name__} has quantile forecasts only with loss='quantile'")
        lookback = int(self.lookback)
        n = len(self._streams)
        result: np.ndarray | None = None
        network = self.network_
        with torch.no_grad():
            states = [s["state"] if self.carry_memory else None for s in self._streams]
            for idx in self._group_by_position(range(n), states):
                windows = np.stack([self._streams[i]["tail"][-lookback:] for i in idx])
                out, _ = self._run([states[i] for i in idx], windows, keep_states=False)
                out = out.sort(dim=-1).values if quantiles else network._point(out)
                out = network.to_original_units(out).numpy().astype(np.float64)
                if result is None:
                    result = np.empty((n, *out.shape[1:]))
                result[idx] = out
        assert result is not None
        return result

    def _run(self, states: list[list[dict] | None], windows: np.ndarray, keep_states: bool = True):
        """One forward pass of windows [n, L, C] from per-instance states; returns (out, new states)."""
        x = torch.as_tensor(np.ascontiguousarray(windows, dtype=np.float32))
        batch_states = None if states[0] is None else _stack_states(states)
        out, new_states = self.network_.model(x, batch_states)
        if not keep_states:
            return out, None
        rows = len(self.columns_) if self.channel_independent else 1
        return out, _split_states(new_states, len(windows), rows)

    def _group_by_position(self, indices: Sequence[int] | range, states: list | None = None) -> Iterator[list[int]]:
        """Instances whose memories sit at the same chunk position (or are all fresh) run as one batch."""
        groups: dict[Any, list[int]] = defaultdict(list)
        for i in indices:
            state = self._streams[i]["state"] if states is None else states[i]
            groups[None if state is None else tuple(layer["position"] for layer in state)].append(i)
        return iter(groups.values())

    def _to_frame(self, fh: ForecastingHorizon, rows, columns) -> pd.DataFrame:
        """Assemble per-instance rows into sktime's output frame, indexed by each instance's fh."""
        blocks, indexes, keys = [], [], []
        for i, stream in enumerate(self._streams):
            cutoff = self._instance_cutoff(stream["last"])
            steps = fh.to_relative(cutoff).to_numpy().astype(np.int64)
            if steps.min() < 1 or steps.max() > self.horizon_:
                where = "" if not self._is_multiindex else f" for instance {stream['key']!r}"
                raise ValueError(
                    f"fh reaches steps {steps.min()}..{steps.max()} past the cutoff{where}, but this "
                    f"{type(self).__name__} was fitted to forecast steps 1..{self.horizon_}; refit with this fh"
                )
            blocks.append(rows(i, steps))
            indexes.append(fh.to_absolute_index(cutoff))
            keys.append(stream["key"])
        values = np.concatenate(blocks, axis=0)
        if not self._is_multiindex:
            index = indexes[0]
            index.name = self._index_names[0]
        else:
            time = indexes[0].append(indexes[1:]) if len(indexes) > 1 else indexes[0]
            lengths = [len(ix) for ix in indexes]
            levels = [pd.Index([key[j] for key in keys]).repeat(lengths) for j in range(len(keys[0]))]
            index = pd.MultiIndex.from_arrays([*levels, time], names=self._index_names)
        return pd.DataFrame(values, index=index, columns=columns)

    def _instance_cutoff(self, last: Any) -> pd.Index:
        cutoff = self.cutoff
        if len(cutoff) == 1 and cutoff[0] == last:
            return cutoff
        if isinstance(cutoff, pd.PeriodIndex):
            return pd.PeriodIndex([last], freq=cutoff.freq)
        if isinstance(cutoff, pd.DatetimeIndex):
            try:
                return pd.DatetimeIndex([last], freq=cutoff.freq)
            except ValueError:
                return pd.DatetimeIndex([last])
        return pd.Index([last], dtype=cutoff.dtype)

    def _steps(self, fh: ForecastingHorizon, last: Any) -> np.ndarray:
        return fh.to_relative(self._instance_cutoff(last)).to_numpy()

    # ------------------------------------------------------------------------------------------
    # input checks and helpers
    # ------------------------------------------------------------------------------------------
    def _split_instances(self, y: pd.DataFrame) -> list[tuple[tuple, Any, pd.DataFrame]]:
        """(instance key, last time point, frame) per instance, in order of appearance."""
        if not isinstance(y.index, pd.MultiIndex):
            return [((), y.index[-1] if len(y) else None, y)]
        levels = list(range(y.index.nlevels - 1))
        out = []
        for key, frame in y.groupby(level=levels, sort=False):
            key = key if isinstance(key, tuple) else (key,)
            out.append((key, frame.index.get_level_values(-1)[-1], frame))
        return out

    def _check_values(self, y: pd.DataFrame, name: str) -> None:
        _check_values(y, name, type(self).__name__)

    def _check_params(self) -> None:
        # The network's arguments are checked by the module's own validator, before any data is touched.
        network_args = {name: getattr(self, name) for name in _OWN_MODEL_ARGS if hasattr(self, name)}
        validate_hparams({**(self.model_kwargs or {}), **network_args})
        check_int("max_epochs", self.max_epochs, 1, "training epochs; e.g. 20")
        check_int("batch_size", self.batch_size, 1, "windows per training batch; e.g. 32")
        check_int("finetune_epochs", self.finetune_epochs, 0, "epochs of fine-tuning in update; 0 = memory update only")
        if self.loss == "quantile":
            q = list(self.quantiles)
            if len(q) < 2 or 0.5 not in q or any(not 0.0 < v < 1.0 for v in q) or len(set(q)) != len(q):
                raise ValueError(f"quantiles must be >= 2 distinct levels in (0, 1) including 0.5, got {self.quantiles}")
        v = self.validation_size
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or v < 0 or (
            isinstance(v, (float, np.floating)) and v >= 1.0
        ):
            raise ValueError(f"validation_size must be a float in [0, 1) or an int >= 0, got {v!r}")
        p = self.early_stopping_patience
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 0):
            raise ValueError(f"early_stopping_patience must be an integer >= 0 or None, got {p!r}")

    def _n_validation(self, length: int, horizon: int) -> int:
        v = self.validation_size
        if isinstance(v, (float, np.floating)):
            return 0 if v == 0 else max(horizon, math.ceil(v * length))
        if 0 < v < horizon:
            raise ValueError(
                f"validation_size={v} values is shorter than the horizon {horizon}: no validation window fits; "
                f"use validation_size >= {horizon}, a fraction, or 0"
            )
        return int(v)

    def _draw_seed(self) -> int:
        return int(check_random_state(self.random_state).randint(0, 2**31 - 1))

    @contextlib.contextmanager
    def _torch_rng(self, seed: int) -> Iterator[Any]:
        """Seeded torch RNGs inside, the caller's global RNG states restored afterwards."""
        devices: list[int] = []
        if self.accelerator != "cpu" and torch.cuda.is_available():
            devices = list(range(torch.cuda.device_count()))
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield torch.Generator().manual_seed(seed)

    @classmethod
    def get_test_params(cls, parameter_set: str = "default") -> list[dict[str, Any]]:
        """Tiny, fast parameter sets for sktime's estimator checks (series of ~10 points)."""
        tiny = dict(dim=8, n_layers=1, heads=2, memory_depth=1, chunk_size=4, batch_size=64, finetune_epochs=1)
        return [
            dict(variant="lmm", lookback=6, patch_len=2, patch_stride=2, max_epochs=1, validation_size=0, **tiny),
            dict(
                variant="mac", lookback=4, patch_len=1, patch_stride=1, max_epochs=2, loss="quantile",
                quantiles=(0.1, 0.5, 0.9), validation_size=0.2, early_stopping_patience=1,
                channel_independent=False, model_kwargs={"segment_len": 2, "n_persistent": 1}, **tiny,
            ),
        ]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _check_values(y: pd.DataFrame, name: str, owner: str) -> None:
    """Numeric columns only, and no NaN or inf values."""
    bad = [c for c in y.columns if not (pd.api.types.is_numeric_dtype(y[c]) or pd.api.types.is_bool_dtype(y[c]))]
    if bad:
        raise TypeError(
            f"{owner} forecasts numeric series only, but {name} has non-numeric (categorical or text) columns "
            f"{bad[:5]} (dtypes {[str(y[c].dtype) for c in bad[:5]]}); drop or encode them"
        )
    values = y.to_numpy(dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        first = y.index[np.flatnonzero(~finite.all(axis=1))[0]]
        raise ValueError(
            f"{owner} cannot handle missing data or infinite values, but {name} contains {int((~finite).sum())} "
            f"(first at {first}); impute first, e.g. TransformedTargetForecaster([('impute', Imputer(method='ffill')), "
            f"('forecast', {owner}(...))])"
        )


def _check_time_series(y: Any, owner: str) -> None:
    """Refuse empty, gappy (NaN) or unordered pandas input with a message naming the fix.

    sktime finds these too, but reports them as "missing data" or "not in an sktime compatible
    format" (or fails on an empty frame). Other input types are left to sktime's checks.
    """
    if not isinstance(y, (pd.Series, pd.DataFrame)):
        return
    if len(y) == 0:
        raise ValueError(f"{owner} got an empty y; pass a series of at least lookback + max(fh) values")
    frame = y.to_frame() if isinstance(y, pd.Series) else y
    # Object columns may be sktime's nested panel format (a series per cell): only text is refused here.
    text = [c for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype)
            or pd.api.types.is_string_dtype(frame[c]) and frame[c].map(lambda v: isinstance(v, str)).any()]
    if text:
        raise TypeError(f"{owner} forecasts numeric series only, but y has non-numeric (categorical or text) columns "
                        f"{text[:5]}; drop or encode them")
    numeric = frame.select_dtypes("number")
    if not numeric.empty:
        _check_values(numeric, "y", owner)
    instances = [y] if not isinstance(y.index, pd.MultiIndex) else [g for _, g in y.groupby(
        level=list(range(y.index.nlevels - 1)), sort=False)]
    for part in instances:
        time = part.index.get_level_values(-1)
        if not time.is_monotonic_increasing:
            raise ValueError(f"{owner} needs y sorted by time, but its time index is not; sort it first "
                             "(y.sort_index())")
        if not time.is_unique:
            raise ValueError(f"{owner} got duplicated time points in y (e.g. {time[time.duplicated()][0]}); drop or "
                             "aggregate them first (e.g. y.groupby(level=-1).mean())")


class _KeepBestWeights(Callback):
    """Keeps the weights of the best validation epoch in memory (no checkpoint files)."""

    def __init__(self) -> None:
        self.best = math.inf
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val_loss")
        if loss is not None and float(loss) < self.best:
            self.best = float(loss)
            self.state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence Lightning's info logs and warnings unless verbose."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"(lightning|pytorch_lightning|lightning_fabric|torch)(\.|$)")
            warnings.filterwarnings("ignore", message=r".*(does not have many workers|smaller than the logging interval)")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _deterministic_algorithms() -> Iterator[None]:
    """Deterministic kernels where torch has them (warn-only), restoring the caller's setting."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _state_to_numpy(state) -> dict[str, Any]:
    return {
        "weights": [w.detach().cpu().numpy().copy() for w in state.weights],
        "momentum": [w.detach().cpu().numpy().copy() for w in state.momentum],
        "chunk_start": [w.detach().cpu().numpy().copy() for w in state.chunk_start],
        "position": int(state.position),
        "conv_cache": state.conv_cache.detach().cpu().numpy().copy(),
    }


def _stack_states(states: list[list[dict]]):
    """Per-instance, per-layer numpy states -> per-layer MemoryState with the instances stacked."""
    layers = []
    for layer in range(len(states[0])):
        parts = [s[layer] for s in states]

        def cat(field: str, j: int | None = None) -> torch.Tensor:
            arrays = [p[field] if j is None else p[field][j] for p in parts]
            return torch.as_tensor(np.concatenate(arrays, axis=0))

        n_w = len(parts[0]["weights"])
        layers.append(MemoryState(
            tuple(cat("weights", j) for j in range(n_w)),
            tuple(cat("momentum", j) for j in range(n_w)),
            tuple(cat("chunk_start", j) for j in range(n_w)),
            parts[0]["position"],
            cat("conv_cache"),
        ))
    return layers


def _split_states(states, n: int, rows: int) -> list[list[dict]]:
    """Per-layer batched MemoryState -> per-instance lists of per-layer numpy states."""
    layers = [_state_to_numpy(s) for s in states]
    out = []
    for i in range(n):
        sl = slice(i * rows, (i + 1) * rows)
        out.append([
            {
                "weights": [w[sl].copy() for w in layer["weights"]],
                "momentum": [w[sl].copy() for w in layer["momentum"]],
                "chunk_start": [w[sl].copy() for w in layer["chunk_start"]],
                "position": layer["position"],
                "conv_cache": layer["conv_cache"][sl].copy(),
            }
            for layer in layers
        ])
    return out


def _interpolate_quantiles(values: np.ndarray, levels: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Quantiles at `alpha` from sorted learned quantiles `values[..., Q]` at `levels` [Q].

    Piecewise linear in the normal score z = Phi^-1(level), linearly extrapolated beyond the outer
    levels: nondecreasing in alpha because the learned quantiles are sorted.
    """
    z = ndtri(levels)
    za = ndtri(np.clip(alpha, 1e-6, 1 - 1e-6))
    hi = np.clip(np.searchsorted(z, za), 1, len(z) - 1)
    lo = hi - 1
    weight = (za - z[lo]) / (z[hi] - z[lo])
    low, high = values[..., lo], values[..., hi]
    return low + weight * (high - low)
