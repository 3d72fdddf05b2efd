"""MAG (memory as gate): sliding-window attention over [persistent | x] beside the memory, gated."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from titans_ts.layers import Attention, Block, PersistentMemory, sliding_window_mask
from titans_ts.memory import MemoryState, NeuralMemory


class MAGBlock(Block):
    def __init__(
        self, dim: int, memory: dict, heads: int, window: int, n_persistent: int, ff_mult: float = 2.0, dropout: float = 0.0
    ) -> None:
        super().__init__(dim, ff_mult, dropout)
        self.window = window
        self.persistent = PersistentMemory(n_persistent, dim)
        self.memory = NeuralMemory(dim, **memory)
        self.attention = Attention(dim, heads, dropout)
        self.attention_norm, self.memory_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.gate = nn.Linear(2 * dim, dim)

    def mix(self, x: Tensor, state: MemoryState | None) -> tuple[Tensor, MemoryState]:
        n_p = self.persistent.n_tokens
        with_persistent = self.persistent(x)
        mask = sliding_window_mask(n_p, x.shape[1], self.window, x.device)
        short = self.attention_norm(self.attention(with_persistent, with_persistent, mask)[:, n_p:])
        if state is None and n_p:  # the memory reads the persistent tokens once, at the start of a stream
            _, state = self.memory.prime(self.persistent.tokens.to(x.dtype), x.shape[0])
        long, state = self.memory(x, state)
        long = self.memory_norm(long)
        # a learned, per-channel convex gate between short-term attention and long-term memory
        g = torch.sigmoid(self.gate(torch.cat([short, long], dim=-1)))
        return g * short + (1 - g) * long, state
