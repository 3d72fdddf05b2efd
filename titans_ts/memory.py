"""NeuralMemory: the Titans long-term memory, a deep MLP that learns while it reads."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_ts.causal_conv import causal_depthwise_conv
from titans_ts.memory_ops import MemoryCarry, autocast_off, chunked_memory_update, mlp_forward, naive_memory_update


class MemoryState(NamedTuple):
    """What a stream leaves behind, so that the next piece continues it exactly.

    weights:     the memory MLP's weights after the last token, per layer [batch, heads, in, out].
    momentum:    the surprise momentum S, same shapes.
    chunk_start: the weights at the start of the open chunk (its gradients are taken there).
    position:    tokens read into the open chunk; 0 when the stream ended on a chunk border.
    conv_cache:  the last `conv_kernel - 1` projected inputs [batch, conv_kernel - 1, 3 * dim],
                 the left context of the causal convolutions.
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    chunk_start: tuple[Tensor, ...]
    position: int
    conv_cache: Tensor

    def detach(self) -> MemoryState:
        """Cut the graph (e.g. between training windows) and keep the values."""
        return MemoryState(
            tuple(w.detach() for w in self.weights),
            tuple(s.detach() for s in self.momentum),
            tuple(w.detach() for w in self.chunk_start),
            self.position,
            self.conv_cache.detach(),
        )

    def expand(self, batch: int) -> MemoryState:
        """A state of batch 1 as the same state for `batch` streams (views, no copy)."""
        _require(self.conv_cache.shape[0] == 1, f"only a state of batch 1 can be expanded, got batch {self.conv_cache.shape[0]}")

        def grow(t: Tensor) -> Tensor:
            return t.expand(batch, *t.shape[1:])

        return MemoryState(*(tuple(map(grow, ws)) for ws in self[:3]), self.position, grow(self.conv_cache))


Recurrence = Callable[..., tuple[Tensor, MemoryCarry]]


class NeuralMemory(nn.Module):
    """Neural long-term memory (Titans, Behrouz et al. 2025): maps [batch, T, dim] to [batch, T, dim].

    Keys, values and queries are linear projections of x, each followed by SiLU and a short causal
    depthwise convolution; q and k are L2-normalised per head. Each head owns a memory MLP of
    `depth` layers (1 = a matrix memory) and hidden width `hidden_mult * head_dim`, starting from
    learned initial weights; every sequence in the batch updates its own copy while it reads:

        S_t = eta_t S_{t-1} - theta_t grad ||M(k_t) - v_t||^2,   M_t = (1 - alpha_t) M_{t-1} + S_t,

    with theta_t = max_lr * sigmoid(.), eta_t = sigmoid(.), alpha_t = sigmoid(.) linear in x_t.
    Gradients are taken at the weights at the start of each chunk of `chunk_size` tokens (chunk
    size 1: the exact per-token rule). Token t reads y_t = M_t(q_t): the weights right after its
    own write, never a later token's and never the stale chunk-start weights.

    `forward` is the fast chunk-parallel form; `reference` is a token-by-token autograd loop with
    the same parameters and results, for testing. Both take and return a `MemoryState`, so a
    stream fed in pieces gives the same outputs as fed whole. `prime(prefix, batch)` opens a batch
    of streams that all begin with the same tokens (MAL's and MAG's persistent memory) at the cost
    of one: the prefix is written once and its state broadcast.

    `max_grad_norm` bounds each token's inner gradient (Frobenius norm over all layers) before it
    enters the momentum; the plain rule can diverge when the learning rate times the chunk
    length is large, so the bound is on by default. `None` removes it.

    `recompute_chunks=g` trades compute for training memory on long sequences: backward keeps the
    memory's state only every g chunks and recomputes the chunks in between (gradient
    checkpointing; same results). Without it, training keeps a weight-sized state per chunk.

    `forget_bias` is the forgetting gate's initial logit: alpha_t starts near sigmoid(forget_bias),
    by default sigmoid(-6) = 0.0025 per token, so a window of 12 tokens keeps 97% of the weights. The
    gate is learned, but trained on one to four windows it stays near this value (0.0012-0.0026 in
    the shipped MAL models; `benchmarks/windows_read.py`), and a stream that carries the memory over
    many windows then drifts for tens of windows. A larger value (e.g. -3: 4.7% per token, 56% kept
    over 12 tokens) lets a carried state settle within a few windows: trained with
    `forecast_window`, MAL's ETTh1 test MSE after reading 31 windows is 0.388 against 0.386 at the
    3 it was trained with (0.419 at -6), but no better than a fresh memory (see the README).

    `compile_chunks=True` runs each chunk's forward and backward through `torch.compile`, which
    fuses their many small elementwise ops: forward+backward 0.84-1.61x the speed of the eager form
    on this project's CPU benchmark (median 1.22x, most at head dim 16; see the README), after a
    compile of 5-17 s per new input shape. It needs what torch.compile needs
    (a C++ compiler on CPU, Triton on CUDA). `reference` never compiles.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        depth: int = 2,
        hidden_mult: float = 2.0,
        chunk_size: int = 16,
        max_lr: float = 0.1,
        conv_kernel: int = 4,
        max_grad_norm: float | None = 1.0,
        recompute_chunks: int | None = None,
        compile_chunks: bool = False,
        forget_bias: float = -6.0,
    ) -> None:
        super().__init__()
        _require(dim > 0, f"dim must be positive, got {dim}")
        _require(heads > 0 and dim % heads == 0, f"dim ({dim}) must be a multiple of heads ({heads})")
        _require(depth >= 1, f"depth must be >= 1 (1 = a matrix memory), got {depth}")
        _require(hidden_mult > 0, f"hidden_mult must be positive, got {hidden_mult}")
        _require(chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}")
        _require(max_lr > 0, f"max_lr must be positive, got {max_lr}")
        _require(conv_kernel >= 1, f"conv_kernel must be >= 1 (1 = no temporal mixing), got {conv_kernel}")
        _require(max_grad_norm is None or max_grad_norm > 0, f"max_grad_norm must be positive or None, got {max_grad_norm}")
        _require(isinstance(forget_bias, numbers.Real) and not isinstance(forget_bias, bool) and math.isfinite(forget_bias),
                 f"forget_bias must be a finite number (the forgetting gate's initial logit, e.g. -6.0), got {forget_bias!r}")
        _require(recompute_chunks is None or (isinstance(recompute_chunks, int) and recompute_chunks >= 1),
                 f"recompute_chunks must be a positive number of chunks or None (keep every state), got {recompute_chunks!r}")
        self.dim, self.heads, self.depth = dim, heads, depth
        self.head_dim = dim // heads
        self.chunk_size, self.max_lr, self.max_grad_norm = chunk_size, max_lr, max_grad_norm
        self.conv_kernel = conv_kernel
        self.recompute_chunks = recompute_chunks
        self.compile_chunks = bool(compile_chunks)
        self.forget_bias = float(forget_bias)

        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.conv = nn.Conv1d(3 * dim, 3 * dim, conv_kernel, groups=3 * dim)
        self.to_gates = nn.Linear(dim, 3 * heads)  # per head: theta, eta, alpha logits
        self.to_out = nn.Linear(dim, dim, bias=False)

        hidden = max(1, round(hidden_mult * self.head_dim))
        widths = [self.head_dim] + [hidden] * (depth - 1) + [self.head_dim]
        self.initial_weights = nn.ParameterList(
            nn.Parameter(torch.randn(heads, fan_in, fan_out) / math.sqrt(fan_in))
            for fan_in, fan_out in zip(widths[:-1], widths[1:])
        )
        with torch.no_grad():
            # start with a moderate learning rate, strong momentum and slow forgetting (~400 tokens at -6)
            self.to_gates.bias.view(3, heads).copy_(torch.tensor([0.0, 2.0, self.forget_bias])[:, None])

    def initial_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> MemoryState:
        """The state before any token: learned initial weights, zero momentum, empty context."""
        weights = tuple(w.to(device=device, dtype=dtype).expand(batch, -1, -1, -1) for w in self.initial_weights)
        momentum = tuple(torch.zeros_like(w) for w in weights)
        dtype = dtype or self.to_qkv.weight.dtype
        conv_cache = torch.zeros(batch, self.conv_kernel - 1, 3 * self.dim, device=device, dtype=dtype)
        return MemoryState(weights, momentum, weights, 0, conv_cache)

    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        """Read x [batch, T, dim], writing to the memory; returns (y [batch, T, dim], new state)."""
        return self._run(x, state, functools.partial(chunked_memory_update, recompute_chunks=self.recompute_chunks,
                                                     compile_chunks=self.compile_chunks))

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The gates of x [batch, T, dim] per head and token, [batch, heads, T], at least float32 and in log
        space where they multiply up: theta_t, log eta_t and log(1 - alpha_t) (what forgetting keeps)."""
        gates = _at_least_float32(self.to_gates(x))
        gates = gates.view(x.shape[0], x.shape[1], 3, self.heads).permute(2, 0, 3, 1)
        return self.max_lr * torch.sigmoid(gates[0]), F.logsigmoid(gates[1]), F.logsigmoid(-gates[2])

    def prime(self, prefix: Tensor, batch: int) -> tuple[Tensor, MemoryState]:
        """Open `batch` streams that all begin with the same tokens `prefix` [n, dim] (e.g. persistent memory).

        Returns (y [batch, n, dim], state): what `forward(prefix.expand(batch, -1, -1))` returns, but
        the prefix is read and written once and then broadcast (views), so it costs one stream, not
        `batch`. Continue the streams with `forward(x, state)`.
        """
        _require(prefix.dim() == 2 and prefix.shape[-1] == self.dim,
                 f"prime expects prefix tokens of shape [n, {self.dim}], got {tuple(prefix.shape)}")
        y, state = self(prefix[None])
        return y.expand(batch, -1, -1), state.expand(batch)

    def reference(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        """Same as `forward`, computed token by token with autograd (slow; for tests)."""
        return self._run(x, state, naive_memory_update)

    def read(self, x: Tensor, state: MemoryState | None = None) -> Tensor:
        """Retrieve without writing: every token of x [batch, T, dim] queries the weights of `state`.

        The queries come from the same projection as in `forward`, without the convolution (a read
        is not part of the written stream). Used by MAC to fetch history before attention.
        """
        batch, length, _ = x.shape
        if state is None:
            state = self.initial_state(batch, x.device, x.dtype)
        w_q = self.to_qkv.weight[: self.dim]
        q = F.normalize(self._split_heads(F.silu(x @ w_q.T)), dim=-1)
        y = mlp_forward([w.flatten(0, 1) for w in state.weights], q)
        return self.to_out(self._merge_heads(y, batch))

    def _run(self, x: Tensor, state: MemoryState | None, recurrence: Recurrence) -> tuple[Tensor, MemoryState]:
        _require(
            x.dim() == 3 and x.shape[-1] == self.dim,
            f"NeuralMemory expects x of shape [batch, T, {self.dim}], got {tuple(x.shape)}",
        )
        batch = x.shape[0]
        if state is None:
            state = self.initial_state(batch, x.device, x.dtype)
        _require(
            state.conv_cache.shape[0] == batch,
            f"state is for batch {state.conv_cache.shape[0]}, x has batch {batch}",
        )

        # Projections, SiLU, then a causal depthwise conv whose left context is the cache.
        qkv = F.silu(self.to_qkv(x))
        context = torch.cat([state.conv_cache.to(qkv.dtype), qkv], dim=1)
        conv_cache = context[:, context.shape[1] - (self.conv_kernel - 1) :]
        qkv = causal_depthwise_conv(context, self.conv.weight, self.conv.bias)
        q, k, v = (self._split_heads(t) for t in qkv.chunk(3, dim=-1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)

        theta, log_eta, log_keep = (g.flatten(0, 1) for g in self.gates(x))

        # The memory's weights are a running sum over the whole stream: under autocast (bf16-mixed) the
        # recurrence still runs in float32, since bf16's 8-bit mantissa would round small updates away.
        weights, momentum = (tuple(_at_least_float32(w.flatten(0, 1)) for w in ws) for ws in state[:2])
        # on a chunk border the chunk start is the weights: no second copy of an expanded (primed) state
        chunk_start = tuple(_at_least_float32(w.flatten(0, 1)) for w in state.chunk_start) if state.position else weights
        flat = MemoryCarry(weights, momentum, chunk_start, position=state.position)
        with autocast_off(x.device.type):
            y, carry = recurrence(*map(_at_least_float32, (q, k, v)), theta, log_eta, log_keep, flat,
                                  chunk_size=self.chunk_size, max_grad_norm=self.max_grad_norm)
        unflat = (tuple(w.unflatten(0, (batch, self.heads)) for w in ws) for ws in carry[:3])
        return self.to_out(self._merge_heads(y, batch)), MemoryState(*unflat, position=carry.position, conv_cache=conv_cache)

    def _split_heads(self, t: Tensor) -> Tensor:
        """[batch, T, dim] -> [batch * heads, T, head_dim]."""
        batch, length, _ = t.shape
        return t.view(batch, length, self.heads, self.head_dim).transpose(1, 2).reshape(-1, length, self.head_dim)

    def _merge_heads(self, t: Tensor, batch: int) -> Tensor:
        """[batch * heads, T, head_dim] -> [batch, T, dim]."""
        return t.unflatten(0, (batch, self.heads)).transpose(1, 2).flatten(2)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, depth={self.depth}, chunk_size={self.chunk_size}, "
            f"max_lr={self.max_lr}, conv_kernel={self.conv_kernel}, max_grad_norm={self.max_grad_norm}"
            + (f", recompute_chunks={self.recompute_chunks}" if self.recompute_chunks else "")
            + (", compile_chunks=True" if self.compile_chunks else "")
            + (f", forget_bias={self.forget_bias}" if self.forget_bias != -6.0 else "")
        )


def _at_least_float32(t: Tensor) -> Tensor:
    return t.float() if t.element_size() < 4 else t


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
