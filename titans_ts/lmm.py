"""LMM: the neural memory alone, as a sequence layer."""

from __future__ import annotations

from torch import Tensor

from titans_ts.layers import Block
from titans_ts.memory import MemoryState, NeuralMemory


class LMMBlock(Block):
    def __init__(self, dim: int, memory: dict, ff_mult: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__(dim, ff_mult, dropout)
        self.memory = NeuralMemory(dim, **memory)

    def mix(self, x: Tensor, state: MemoryState | None) -> tuple[Tensor, MemoryState]:
        return self.memory(x, state)
