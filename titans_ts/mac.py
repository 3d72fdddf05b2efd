"""MAC (memory as context): each segment attends over [persistent | history from memory | segment]."""

from __future__ import annotations

import torch
from torch import Tensor

from titans_ts.layers import Attention, Block, PersistentMemory, memory_context_mask
from titans_ts.memory import MemoryState, NeuralMemory


class MACBlock(Block):
    """Per segment S (of `segment_len` tokens), in order:

    1. h = M_{prev}(S): retrieve history with the segment's queries (read only);
    2. y = attention of S over [persistent | h | S] (h_j and S_j visible to token i for j <= i);
    3. write y into the memory and read it back, M(y) (each token reads its own weights);
    4. output y * sigmoid(M(y)): the memory gates what attention found.
    """

    def __init__(
        self, dim: int, memory: dict, heads: int, segment_len: int, n_persistent: int, ff_mult: float = 2.0, dropout: float = 0.0
    ) -> None:
        super().__init__(dim, ff_mult, dropout)
        if segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {segment_len}")
        self.segment_len = segment_len
        self.persistent = PersistentMemory(n_persistent, dim)
        self.memory = NeuralMemory(dim, **memory)
        self.attention = Attention(dim, heads, dropout)

    def mix(self, x: Tensor, state: MemoryState | None) -> tuple[Tensor, MemoryState]:
        outputs = []
        for segment in x.split(self.segment_len, dim=1):
            history = self.memory.read(segment, state)
            context = self.persistent(torch.cat([history, segment], dim=1))
            mask = memory_context_mask(self.persistent.n_tokens, segment.shape[1], x.device)
            y = self.attention(segment, context, mask)
            recalled, state = self.memory(y, state)
            outputs.append(y * torch.sigmoid(recalled))
        return torch.cat(outputs, dim=1), state
