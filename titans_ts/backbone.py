"""TitansBackbone: a stack of MAC, MAG, MAL or LMM blocks over [batch, T, dim]."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from titans_ts.lmm import LMMBlock
from titans_ts.mac import MACBlock
from titans_ts.mag import MAGBlock
from titans_ts.mal import MALBlock
from titans_ts.memory import MemoryState
from titans_ts.transformer import TransformerBlock

Variant = Literal["mac", "mag", "mal", "lmm", "transformer"]
VARIANTS: tuple[str, ...] = ("mac", "mag", "mal", "lmm")
#: The Titans variants and a plain transformer (no memory), the attention baseline.
BACKBONES: tuple[str, ...] = (*VARIANTS, "transformer")


class TitansBackbone(nn.Module):
    """`n_layers` residual blocks of one Titans variant, then a final norm.

    - mac: memory as context (segments attend over [persistent | memory history | segment]);
    - mag: memory as gate (sliding-window attention beside the memory, gated);
    - mal: memory as layer (memory, then sliding-window attention);
    - lmm: the memory alone;
    - transformer: full self-attention, no memory (a baseline; states pass through as None).

    `forward(x, states=None)` returns `(y, states)`, one `MemoryState` per layer, so a stream can
    be continued: the memories carry over; attention sees only the current call's tokens.
    """

    def __init__(
        self,
        variant: Variant = "mac",
        dim: int = 64,
        n_layers: int = 2,
        heads: int = 4,
        memory_depth: int = 2,
        memory_hidden_mult: float = 2.0,
        chunk_size: int = 16,
        max_lr: float = 0.1,
        max_grad_norm: float | None = 1.0,
        conv_kernel: int = 4,
        window: int = 32,
        segment_len: int = 32,
        n_persistent: int = 4,
        ff_mult: float = 2.0,
        dropout: float = 0.0,
        recompute_chunks: int | None = None,
        compile_chunks: bool = False,
        forget_bias: float = -6.0,
    ) -> None:
        super().__init__()
        if variant not in BACKBONES:
            raise ValueError(f"variant must be one of {BACKBONES}, got {variant!r}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.variant = variant
        memory = dict(
            heads=heads, depth=memory_depth, hidden_mult=memory_hidden_mult, chunk_size=chunk_size,
            max_lr=max_lr, conv_kernel=conv_kernel, max_grad_norm=max_grad_norm, recompute_chunks=recompute_chunks,
            compile_chunks=compile_chunks, forget_bias=forget_bias,
        )
        common = dict(dim=dim, memory=memory, ff_mult=ff_mult, dropout=dropout)
        block, extra = {
            "mac": (MACBlock, dict(heads=heads, segment_len=segment_len, n_persistent=n_persistent)),
            "mag": (MAGBlock, dict(heads=heads, window=window, n_persistent=n_persistent)),
            "mal": (MALBlock, dict(heads=heads, window=window, n_persistent=n_persistent)),
            "lmm": (LMMBlock, {}),
            "transformer": (TransformerBlock, dict(heads=heads)),
        }[variant]
        if variant == "transformer":
            common.pop("memory")
        self.blocks = nn.ModuleList(block(**common, **extra) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim)

    def forward(self, x: Tensor, states: list[MemoryState] | None = None) -> tuple[Tensor, list[MemoryState]]:
        states = states if states is not None else [None] * len(self.blocks)
        if len(states) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} layer states, got {len(states)}")
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block(x, state)
            new_states.append(state)
        return self.norm(x), new_states
