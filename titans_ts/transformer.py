"""A plain pre-norm transformer block (no neural memory): the attention baseline's layer."""

from __future__ import annotations

import torch
from torch import Tensor

from titans_ts.layers import Attention, Block


class TransformerBlock(Block):
    """Full (bidirectional) self-attention over all tokens, then the shared feed-forward.

    Meant for the PatchTST-style baseline: every token of a lookback window is in the past, so
    letting each patch see every other one (as PatchTST's encoder does) leaks nothing. There is
    no state to carry; `state` passes through unchanged.
    """

    def __init__(self, dim: int, heads: int, ff_mult: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__(dim, ff_mult, dropout)
        self.attention = Attention(dim, heads, dropout)

    def mix(self, x: Tensor, state: object) -> tuple[Tensor, object]:
        everything = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device)
        return self.attention(x, x, everything), state
