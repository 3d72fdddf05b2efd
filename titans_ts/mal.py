"""MAL (memory as layer): [persistent | x] through the memory, then sliding-window attention."""

from __future__ import annotations

import torch
from torch import Tensor

from titans_ts.layers import Attention, Block, PersistentMemory, sliding_window_mask
from titans_ts.memory import MemoryState, NeuralMemory


class MALBlock(Block):
    def __init__(
        self, dim: int, memory: dict, heads: int, window: int, n_persistent: int, ff_mult: float = 2.0, dropout: float = 0.0
    ) -> None:
        super().__init__(dim, ff_mult, dropout)
        self.window = window
        self.persistent = PersistentMemory(n_persistent, dim)
        self.memory = NeuralMemory(dim, **memory)
        self.attention = Attention(dim, heads, dropout)

    def mix(self, x: Tensor, state: MemoryState | None) -> tuple[Tensor, MemoryState]:
        n_p = self.persistent.n_tokens
        if state is None and n_p:  # persistent tokens open the stream; a carried state has read them already
            opening, state = self.memory.prime(self.persistent.tokens.to(x.dtype), x.shape[0])
            h, state = self.memory(x, state)
            h = torch.cat([opening, h], dim=1)
        else:
            h, state = self.memory(x, state)
            h = self.persistent(h)
        mask = sliding_window_mask(n_p, x.shape[1], self.window, x.device)
        return self.attention(h, h, mask)[:, n_p:], state
