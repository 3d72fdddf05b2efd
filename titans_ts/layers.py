"""Building blocks shared by the Titans backbones: attention with masks, persistent memory, FFN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PersistentMemory(nn.Module):
    """A few learned, input-independent tokens (task knowledge) that a backbone prepends."""

    def __init__(self, n_tokens: int, dim: int) -> None:
        super().__init__()
        if n_tokens < 0:
            raise ValueError(f"n_persistent must be >= 0, got {n_tokens}")
        self.n_tokens = n_tokens
        self.tokens = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        """[batch, T, dim] -> [batch, n_tokens + T, dim]."""
        return torch.cat([self.tokens.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention` with a boolean mask."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, queries: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """queries [batch, Tq, dim] attend to context [batch, Tk, dim] where mask [Tq, Tk] is True.

        Without a mask, attention is causal (Tq == Tk), which lets torch pick its flash kernels.
        """
        q = self._heads(self.to_q(queries))
        k, v = (self._heads(t) for t in self.to_kv(context).chunk(2, dim=-1))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


def sliding_window_mask(n_persistent: int, length: int, window: int, device: torch.device) -> Tensor:
    """Mask over [persistent | x] (both axes): x_i sees the persistent tokens and x_j for i - window < j <= i.

    Persistent rows see the persistent tokens only, so every row attends to something.
    """
    total = n_persistent + length
    pos = torch.arange(total, device=device)
    row, col = pos[:, None], pos[None, :]
    in_window = (col <= row) & (col > row - window)
    return (col < n_persistent) | ((row >= n_persistent) & in_window)


def memory_context_mask(n_persistent: int, length: int, device: torch.device) -> Tensor:
    """Mask for segment tokens [length] over [persistent | h | segment]: h_j and s_j only for j <= i."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    persistent = torch.ones(length, n_persistent, dtype=torch.bool, device=device)
    return torch.cat([persistent, causal, causal], dim=1)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: float = 2.0, dropout: float = 0.0) -> None:
        hidden = max(1, round(mult * dim))
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm residual block: x + mix(norm(x)), then x + ffn(norm(x)). Variants define `mix`."""

    def __init__(self, dim: int, ff_mult: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_mix, self.norm_ff = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.ff = FeedForward(dim, ff_mult, dropout)
        self.drop = nn.Dropout(dropout)

    def mix(self, x: Tensor, state: object) -> tuple[Tensor, object]:
        raise NotImplementedError

    def forward(self, x: Tensor, state: object = None) -> tuple[Tensor, object]:
        h, state = self.mix(self.norm_mix(x), state)
        x = x + self.drop(h)
        return x + self.drop(self.ff(self.norm_ff(x))), state
