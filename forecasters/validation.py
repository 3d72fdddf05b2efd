"""Checks of hyperparameters and checkpoints, with errors that name the problem and the fix.

One place for each rule: :func:`validate_hparams` checks the arguments of
:class:`~forecasters.module.TitansForecastingModule` (and the ones ``TitansForecaster`` passes on to
it) before any layer is built; :func:`check_checkpoint_fits` tells why a checkpoint cannot be
loaded into a module. The building blocks (``NeuralMemory``, ``TitansBackbone``, ...) keep their
own guards, since they are used on their own too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

import numpy as np

from datamodules.base import check_int
from forecasters.baselines import MODEL_NAMES
from titans_ts.backbone import VARIANTS

__all__ = ["check_checkpoint_fits", "check_float", "check_int", "validate_hparams", "ARCHITECTURE_HPARAMS"]

#: Integer hyperparameters: (smallest allowed value, what it is and a sensible value).
_INTS: dict[str, tuple[int, str]] = {
    "n_channels": (1, "the number of input channels (the data module sets it in the CLI)"),
    "lookback": (1, "the input window length; e.g. 96"),
    "horizon": (1, "the number of steps to forecast; e.g. 96"),
    "dim": (1, "the token width; e.g. 64 (a multiple of heads)"),
    "n_layers": (1, "the number of Titans blocks; e.g. 2"),
    "heads": (1, "attention and memory heads; e.g. 4 (dim must be a multiple)"),
    "memory_depth": (1, "layers of each memory MLP; e.g. 2 (1 = a matrix memory)"),
    "chunk_size": (1, "tokens per parallel memory update; e.g. 16 (1 = the exact per-token rule)"),
    "window": (1, "the sliding attention window of MAG/MAL in tokens; e.g. 32"),
    "segment_len": (1, "the MAC segment length in tokens; e.g. 32"),
    "n_persistent": (0, "learned persistent tokens; e.g. 4"),
    "patch_len": (1, "values per token; e.g. 16 (1 = one token per time point)"),
    "patch_stride": (1, "the step between patches; e.g. 8"),
    "recompute_chunks": (1, "memory chunks per gradient-checkpointing group; e.g. 8 (None = keep every state)"),
    "forecast_window": (1, "the values the head sees, a divisor of lookback; e.g. 96 (None = all of lookback)"),
}

#: Integer hyperparameters for which None means "off" or "the default".
_OPTIONAL_INTS = ("recompute_chunks", "forecast_window")

#: Float hyperparameters: (lowest, highest, whether the bounds are allowed, what it is and a sensible value).
_FLOATS: dict[str, tuple[float, float, tuple[bool, bool], str]] = {
    "lr": (0.0, math.inf, (False, False), "the AdamW learning rate; e.g. 1e-3"),
    "weight_decay": (0.0, math.inf, (True, False), "the AdamW weight decay; e.g. 1e-4 (0 = none)"),
    "linear_skip_lr": (0.0, math.inf, (False, False), "the linear skip's own AdamW rate; e.g. 1e-3 (None = lr)"),
    "max_lr": (0.0, math.inf, (False, False), "the memory's largest inner learning rate; e.g. 0.1"),
    "forget_bias": (-math.inf, math.inf, (False, False),
                    "the memory's initial forgetting-gate logit; e.g. -6.0 (0.25% per token), -3.0 to forget faster"),
    "max_grad_norm": (0.0, math.inf, (False, False), "the bound on the memory's inner gradient; e.g. 1.0 (None = off)"),
    "ff_mult": (0.0, math.inf, (False, False), "the feed-forward width multiplier; e.g. 2.0"),
    "dropout": (0.0, 1.0, (True, False), "the dropout probability; e.g. 0.1"),
    "ema_decay": (0.0, 1.0, (False, False),
                  "the decay of the weights' moving average; e.g. 0.998 (None = train without averaging)"),
}

#: Float hyperparameters for which None means "off".
_OPTIONAL_FLOATS = ("max_grad_norm", "ema_decay", "linear_skip_lr")

#: Switches: (what True does). YAML's `yes`/`true` arrive as bools; a string such as "false" would be truthy.
_BOOLS: dict[str, str] = {
    "channel_independent": "each channel its own token sequence",
    "revin": "reversible instance normalisation of each window",
    "linear_skip": "add a linear forecast of the normalised window to the head's",
    "compile": "run the network through torch.compile",
    "compile_chunks": "compile the memory's chunk step",
    "past_gradient": "back-propagate through the windows read before the forecast window",
}

#: How the AdamW rate moves from epoch to epoch (checked here, annotated on the module).
LRSchedule = Literal["cosine", "halving", "constant"]

#: Hyperparameters that fix the weights' shapes: a checkpoint only loads into a module with the same values.
ARCHITECTURE_HPARAMS: tuple[str, ...] = (
    "n_channels", "lookback", "horizon", "n_targets", "variant", "dim", "n_layers", "heads", "memory_depth",
    "n_persistent", "ff_mult", "patch_len", "patch_stride", "channel_independent", "revin", "linear_skip", "loss", "quantiles",
    "forecast_window",
)


def check_float(name: str, value: Any, low: float, high: float, closed: tuple[bool, bool] = (True, True),
                hint: str = "") -> float:
    """``value`` as a finite float in the range from ``low`` to ``high`` (``closed``: which bounds are allowed)."""
    valid = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
             and math.isfinite(value)
             and (value >= low if closed[0] else value > low) and (value <= high if closed[1] else value < high))
    if not valid:
        raise ValueError(f"{name} must be {_describe_range(low, high, closed)}, got {value!r}"
                         + (f": {hint}" if hint else ""))
    return float(value)


def _describe_range(low: float, high: float, closed: tuple[bool, bool]) -> str:
    if math.isinf(high):
        return "positive and finite" if low == 0 and not closed[0] else f"finite and >= {low:g}"
    left, right = ("[" if closed[0] else "("), ("]" if closed[1] else ")")
    return f"a number in {left}{low:g}, {high:g}{right}"


def validate_hparams(hparams: Mapping[str, Any]) -> None:
    """Check the module hyperparameters present in ``hparams`` (absent ones are not checked).

    Raises ValueError naming the argument, the bad value and what to use instead.
    """
    for name, (minimum, hint) in _INTS.items():
        if name in hparams and not (name in _OPTIONAL_INTS and hparams[name] is None):
            check_int(name, hparams[name], minimum, hint)
    for name, (low, high, closed, hint) in _FLOATS.items():
        if name in hparams and not (name in _OPTIONAL_FLOATS and hparams[name] is None):
            check_float(name, hparams[name], low, high, closed, hint)
    for name, meaning in _BOOLS.items():
        if name in hparams and not isinstance(hparams[name], (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False ({meaning}), got {hparams[name]!r}")
    _check_choices(hparams)
    _check_relations(hparams)


def _check_choices(hparams: Mapping[str, Any]) -> None:
    if "variant" in hparams and hparams["variant"] not in MODEL_NAMES:
        raise ValueError(f"variant must be one of {MODEL_NAMES}, got {hparams['variant']!r}: "
                         "mac (memory as context), mag (as gate), mal (as layer), lmm (the memory alone), "
                         "or the baselines patchtst (patch transformer) and dlinear (linear)")
    loss = hparams.get("loss", "mse")
    if loss not in ("mse", "mae", "quantile"):
        raise ValueError(f"loss must be 'mse', 'mae' or 'quantile', got {loss!r}")
    if hparams.get("lr_schedule", "cosine") not in get_args(LRSchedule):
        raise ValueError(f"lr_schedule must be 'cosine' (annealed over max_epochs), 'halving' (halved after every "
                         f"epoch) or 'constant', got {hparams['lr_schedule']!r}")
    quantiles = hparams.get("quantiles")
    if loss == "quantile" and quantiles is not None:
        if not quantiles or any(not 0.0 < q < 1.0 for q in quantiles) or 0.5 not in quantiles:
            raise ValueError(f"quantiles must lie in (0, 1) and include 0.5 (the point forecast), got {quantiles}; "
                             "e.g. (0.1, 0.5, 0.9)")


def _check_relations(hparams: Mapping[str, Any]) -> None:
    dim, heads = hparams.get("dim"), hparams.get("heads")
    if dim is not None and heads is not None and dim % heads:
        raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads}); e.g. dim={heads * max(1, dim // heads)} "
                         f"or heads={math.gcd(dim, heads)}")
    patch_len, lookback, window = hparams.get("patch_len"), hparams.get("lookback"), hparams.get("forecast_window")
    if window is not None:
        variant = hparams.get("variant", "mac")
        if variant not in VARIANTS:
            raise ValueError(f"forecast_window is for the Titans variants {VARIANTS}, whose memory reads the "
                             f"earlier windows; {variant!r} has no memory: leave forecast_window=None")
        if lookback is not None and lookback % window:
            raise ValueError(f"lookback ({lookback}) must be a multiple of forecast_window ({window}): the memory "
                             f"reads the past in windows of forecast_window values; e.g. lookback="
                             f"{window * max(1, lookback // window)}")
    seen = window if window is not None else lookback
    if patch_len is not None and seen is not None and patch_len > seen:
        what = "forecast_window" if window is not None else "lookback"
        raise ValueError(f"patch_len ({patch_len}) must not exceed {what} ({seen}); use a shorter patch "
                         f"or a longer {what}")
    if hparams.get("linear_skip_lr") is not None and not hparams.get("linear_skip", False):
        raise ValueError(f"linear_skip_lr ({hparams['linear_skip_lr']}) is the rate of the linear skip, which is off; "
                         "pass linear_skip=True as well, or leave linear_skip_lr=None")
    n_targets, n_channels = hparams.get("n_targets"), hparams.get("n_channels")
    if n_targets is not None:
        check_int("n_targets", n_targets, 1, "the number of forecast channels (the last ones of the input)")
        if n_channels is not None and n_targets > n_channels:
            raise ValueError(f"n_targets ({n_targets}) cannot exceed n_channels ({n_channels}): the targets are "
                             "the last input channels; use n_targets <= n_channels")


def check_checkpoint_fits(checkpoint: Mapping[str, Any], hparams: Mapping[str, Any], state_keys: set[str],
                          source: str = "the checkpoint") -> None:
    """Raise ValueError when ``checkpoint`` cannot load into a module with ``hparams`` and ``state_keys``.

    Names what differs: a checkpoint of another kind of model (other weight names), or one of this
    model trained on other shapes (different channel count, lookback, horizon, width, ...).
    """
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(f"{source} is not a Lightning checkpoint (no state_dict); pass a .ckpt file written "
                         "by `titans-ts fit` or Trainer.save_checkpoint")
    saved = checkpoint.get("hyper_parameters") or {}
    differs = {k: (saved[k], hparams[k]) for k in ARCHITECTURE_HPARAMS
               if k in saved and k in hparams and _normalise(saved[k]) != _normalise(hparams[k])}
    if differs:
        shown = ", ".join(f"{k}={old!r} in the checkpoint but {new!r} here" for k, (old, new) in differs.items())
        raise ValueError(f"{source} was trained with other shapes: {shown}; use the data and model settings it "
                         "was trained with (e.g. the same features, lookback and horizon) or retrain")
    weights = set(checkpoint["state_dict"])
    missing, unexpected = sorted(state_keys - weights), sorted(weights - state_keys)
    if missing or unexpected:
        raise ValueError(f"{source} holds a different model: {len(missing)} of this model's weights are missing "
                         f"(e.g. {missing[:3]}) and {len(unexpected)} are unknown (e.g. {unexpected[:3]}); pass a "
                         "checkpoint written by TitansForecastingModule (`titans-ts fit`)")


def _normalise(value: Any) -> Any:
    # YAML and checkpoints turn tuples into lists
    return list(value) if isinstance(value, (list, tuple)) else value
