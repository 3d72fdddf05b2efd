"""The memory update of Titans, as two functions with one contract.

Per head, the memory M is an MLP with weights W = (W_1, ..., W_L), W_l of shape [in, out],
computing z_l = h_{l-1} @ W_l, h_l = silu(z_l) (no activation after the last layer), h_0 = input.
Reading a stream of keys k_t, values v_t and queries q_t, with per-token gates
theta_t (inner learning rate), eta_t (momentum) and alpha_t (forgetting):

    G_t = grad_W || M_{W'}(k_t) - v_t ||^2      W' = the weights at the start of t's chunk
    S_t = eta_t * S_{t-1} - theta_t * G_t        (surprise, with momentum)
    W_t = (1 - alpha_t) * W_{t-1} + S_t          (forgetting)
    y_t = M_{W_t}(q_t)                           (token t reads the weights after its own write)

With chunk size 1, W' = W_{t-1}: the paper's per-token rule. With chunk size b, the gradients
of a chunk's tokens are all taken at the chunk-start weights (as in the paper's parallel
training), but every token still reads its own W_t, never the stale chunk-start weights.

- `naive_memory_update`: a token-by-token loop straight from the equations, gradients by
  torch.autograd. Obviously correct, slow: the reference.
- `chunked_memory_update`: the fast form. Per chunk, the per-token gradients come in closed form
  as outer products u_i (x) e_i (layer input times back-propagated error), momentum and forgetting
  are unrolled into a lower-triangular coefficient matrix C (from cumulative log-gates, so no
  ratio of tiny products is ever formed), and each token's read of W_t uses the dual form

    h @ W_{l,t} = a_t (h @ W_l) + c_t (h @ S_l) - sum_{i<=t} C[t, i] (h . u_i) e_i

  i.e. batched matrix products only.

Both take q, k, v of shape [N, T, d] (N = batch * heads), gates of shape [N, T], and a
`MemoryCarry`; both return (y [N, T, d], MemoryCarry). Tests hold them together.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


class MemoryCarry(NamedTuple):
    """The recurrent state of the memory over N = batch * heads independent memories.

    weights:     W_t, the memory MLP after the last token read; per layer [N, in, out].
    momentum:    S_t, the surprise momentum; per layer [N, in, out].
    chunk_start: the weights at the start of the open chunk, where its gradients are taken.
    position:    tokens already read into the open chunk (0: the next token starts a chunk).
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    chunk_start: tuple[Tensor, ...]
    position: int


def _silu_derivative(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def mlp_forward(weights: Sequence[Tensor], h: Tensor) -> Tensor:
    """Apply the memory MLP: batched weights [N, in, out] to inputs [N, T, in]."""
    last = len(weights) - 1
    for layer, w in enumerate(weights):
        h = h @ w
        if layer < last:
            h = F.silu(h)
    return h


def grad_norm_scale(sq_norm: Tensor, max_norm: float) -> Tensor:
    """Factor that bounds a gradient of squared norm `sq_norm` to `max_norm` (<= 1)."""
    # clamp_min keeps sqrt differentiable at a zero gradient
    return (max_norm / sq_norm.clamp_min(1e-24).sqrt()).clamp(max=1.0)


def naive_memory_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor,
    log_keep: Tensor,
    carry: MemoryCarry,
    chunk_size: int,
    max_grad_norm: float | None = None,
) -> tuple[Tensor, MemoryCarry]:
    """Reference: one token at a time, inner gradients by autograd.

    `log_eta` = log(eta_t) and `log_keep` = log(1 - alpha_t), both [N, T].
    """
    create_graph = torch.is_grad_enabled()  # keep outer-parameter gradients when training
    weights, momentum, chunk_start = list(carry.weights), list(carry.momentum), list(carry.chunk_start)
    position = carry.position
    outputs = []
    with torch.enable_grad():
        for t in range(q.shape[1]):
            if position == 0:
                chunk_start = weights
            # differentiate at the chunk-start weights; a fresh leaf where no outer graph is kept
            at = [w if create_graph and w.requires_grad else w.detach().requires_grad_() for w in chunk_start]
            k_t, v_t, q_t = k[:, t : t + 1], v[:, t : t + 1], q[:, t : t + 1]
            loss = (mlp_forward(at, k_t) - v_t).pow(2).sum()
            grads = torch.autograd.grad(loss, at, create_graph=create_graph)
            lr = theta[:, t]
            if max_grad_norm is not None:
                sq_norm = sum(g.pow(2).sum(dim=(-2, -1)) for g in grads)
                lr = lr * grad_norm_scale(sq_norm, max_norm=max_grad_norm)
            eta, keep = log_eta[:, t].exp(), log_keep[:, t].exp()
            momentum = [eta[:, None, None] * s - lr[:, None, None] * g for s, g in zip(momentum, grads)]
            weights = [keep[:, None, None] * w + s for w, s in zip(weights, momentum)]
            outputs.append(mlp_forward(weights, q_t))
            position = (position + 1) % chunk_size
    if position == 0:
        chunk_start = weights
    y = torch.cat(outputs, dim=1) if outputs else q.new_zeros(q.shape)
    return y, MemoryCarry(tuple(weights), tuple(momentum), tuple(chunk_start), position)


class ChunkGates(NamedTuple):
    """Momentum and forgetting of chunks unrolled, from cumulative log-gates. Shapes [..., c(, c)].

    Inside a chunk, W_t = keep_w[t] W + keep_s[t] S - sum_i (mix[t, i] theta_i) G_i and the chunk
    ends with S' = eta_total S - sum_i (carry_last[i] theta_i) G_i. theta enters per chunk, as the
    gradient bound that may scale it depends on the chunk-start weights.
    """

    mix: Tensor  # [..., c, c]: sum_{i<=s<=t} prod_{s<j<=t} (1 - alpha_j) prod_{i<j<=s} eta_j
    keep_w: Tensor  # [..., c]: prod_{j<=t} (1 - alpha_j), the weight of W in W_t
    keep_s: Tensor  # [..., c]: the weight of S in W_t
    carry_last: Tensor  # [..., c]: prod_{i<j<=c} eta_j
    eta_total: Tensor  # [...]: prod_j eta_j


def chunk_gates(log_eta: Tensor, log_keep: Tensor) -> ChunkGates:
    """Unroll chunks of gates [..., c]; differences of cumulative sums never form a ratio of tiny products."""
    c = log_eta.shape[-1]
    causal = torch.ones(c, c, dtype=torch.bool, device=log_eta.device).tril()
    cum_keep, cum_eta = log_keep.cumsum(-1), log_eta.cumsum(-1)
    # decay[t, s] = prod_{s<j<=t} (1 - alpha_j); carry[s, i] = prod_{i<j<=s} eta_j; both 0 above the diagonal.
    decay = (cum_keep[..., :, None] - cum_keep[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    carry = (cum_eta[..., :, None] - cum_eta[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    keep_s = (decay @ cum_eta.exp().unsqueeze(-1)).squeeze(-1)
    return ChunkGates(decay @ carry, cum_keep.exp(), keep_s, carry[..., -1, :], cum_eta[..., -1].exp())


def _batched_dot(a: Tensor, b: Tensor) -> Tensor:
    """<a_n, b_n> for every n of [N, ...] tensors."""
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1))


class _AdvanceState(torch.autograd.Function):
    """The state after a chunk, one layer: weight-sized work fused, with a hand-written backward.

        W' = keep_w W + keep_s S - U^T diag(w_coef) E,      S' = eta_total S - U^T diag(s_coef) E

    W, S [N, in, out]; U [N, c, in] (layer inputs); E [N, c, out] (errors); keep_w, keep_s,
    eta_total [N]; w_coef, s_coef [N, c]. Autograd through the plain expression allocates and
    saves several weight-sized tensors per chunk (products, negations, broadcasts); here the
    forward writes each result in place into one buffer and the backward forms only gW and gS.
    """

    @staticmethod
    def forward(ctx, W, S, U, E, keep_w, keep_s, eta_total, w_coef, s_coef):  # type: ignore[override]
        E_w, E_s = E * w_coef[..., None], E * s_coef[..., None]
        new_w = (W * keep_w[:, None, None]).addcmul_(S, keep_s[:, None, None]).baddbmm_(U.mT, E_w, alpha=-1)
        new_s = (S * eta_total[:, None, None]).baddbmm_(U.mT, E_s, alpha=-1)
        ctx.save_for_backward(W, S, U, E, keep_w, keep_s, eta_total, w_coef, s_coef)
        return new_w, new_s

    @staticmethod
    def backward(ctx, g_w, g_s):  # type: ignore[override]
        W, S, U, E, keep_w, keep_s, eta_total, w_coef, s_coef = ctx.saved_tensors
        grad_w = g_w * keep_w[:, None, None]
        grad_s = (g_s * eta_total[:, None, None]).addcmul_(g_w, keep_s[:, None, None])
        back_w, back_s = torch.bmm(U, g_w), torch.bmm(U, g_s)  # [N, c, out]: U @ dL/dW', U @ dL/dS'
        grad_E = -(back_w * w_coef[..., None] + back_s * s_coef[..., None])
        grad_U = -torch.baddbmm(torch.bmm(E * w_coef[..., None], g_w.mT), E * s_coef[..., None], g_s.mT)
        grad_w_coef, grad_s_coef = -(back_w * E).sum(-1), -(back_s * E).sum(-1)
        return (grad_w, grad_s, grad_U, grad_E, _batched_dot(g_w, W), _batched_dot(g_w, S),
                _batched_dot(g_s, S), grad_w_coef, grad_s_coef)


def _chunk_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    gates: ChunkGates,
    weights: Sequence[Tensor],
    momentum: Sequence[Tensor],
    grad_weights: Sequence[Tensor],
    max_grad_norm: float | None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Read and write one chunk of c tokens. Shapes: q, k, v [N, c, d]; theta [N, c].

    `weights`/`momentum` are W, S just before the chunk; `grad_weights` are where the chunk's
    gradients are taken (the same as `weights` unless the chunk was opened by an earlier call).
    """
    depth = len(weights)
    # Keys through the memory at the gradient point: layer inputs u_l and pre-activations z_l.
    inputs, pre = [], []
    h = k
    for layer, w in enumerate(grad_weights):
        inputs.append(h)
        z = torch.bmm(h, w)
        pre.append(z)
        h = F.silu(z) if layer < depth - 1 else z
    # Closed-form backward of ||M(k) - v||^2: errors e_l = dLoss/dz_l, per token.
    err = 2 * (h - v)
    errors = [err] * depth
    for layer in range(depth - 1, 0, -1):
        err = torch.bmm(err, grad_weights[layer].mT) * _silu_derivative(pre[layer - 1])
        errors[layer - 1] = err
    if max_grad_norm is not None:
        # ||u (x) e||_F = ||u|| ||e||: the per-token gradient norm without forming it
        sq_norm = sum(u.pow(2).sum(-1) * e.pow(2).sum(-1) for u, e in zip(inputs, errors))
        theta = theta * grad_norm_scale(sq_norm, max_norm=max_grad_norm)
    neg_coef = gates.mix * -theta[:, None, :]  # -C[t, i]: G_i enters W_t with weight -C[t, i]
    keep_w, keep_s = gates.keep_w[:, :, None], gates.keep_s[:, :, None]

    # Queries through each token's own weights W_t (dual form).
    h = q
    for layer in range(depth):
        u, e = inputs[layer], errors[layer]
        read = (torch.bmm(h, weights[layer]) * keep_w).addcmul_(torch.bmm(h, momentum[layer]), keep_s)
        z = torch.baddbmm(read, neg_coef * torch.bmm(h, u.mT), e)
        h = F.silu(z) if layer < depth - 1 else z

    # State after the chunk's last token.
    w_coef = -neg_coef[:, -1]
    s_coef = gates.carry_last * theta
    last_keep_w, last_keep_s = gates.keep_w[:, -1], gates.keep_s[:, -1]
    new_weights, new_momentum = [], []
    for layer in range(depth):
        new_w, new_s = _AdvanceState.apply(weights[layer], momentum[layer], inputs[layer], errors[layer],
                                           last_keep_w, last_keep_s, gates.eta_total, w_coef, s_coef)
        new_weights.append(new_w)
        new_momentum.append(new_s)
    return h, new_weights, new_momentum


def _chunk_steps(
    pieces: Sequence[tuple[Tensor, ...]],
    weights: Sequence[Tensor],
    momentum: Sequence[Tensor],
    opening: Sequence[Tensor],
    max_grad_norm: float | None,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Read and write consecutive chunks, each given as (q, k, v, theta, log_eta, log_keep).

    `opening` is the first chunk's gradient point (its start weights, unless an earlier call opened
    it); every later chunk starts on a chunk border. Returns (y of all the chunks, W, S after the
    last, the last chunk's gradient point).
    """
    outputs, grad_weights = [], list(opening)
    for index, (q_c, k_c, v_c, theta_c, eta_c, keep_c) in enumerate(pieces):
        if index:
            grad_weights = weights
        y, weights, momentum = _chunk_step(q_c, k_c, v_c, theta_c, chunk_gates(eta_c, keep_c), weights, momentum,
                                           grad_weights, max_grad_norm)
        outputs.append(y)
    return torch.cat(outputs, dim=1), list(weights), list(momentum), list(grad_weights)


def chunked_memory_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor,
    log_keep: Tensor,
    carry: MemoryCarry,
    chunk_size: int,
    max_grad_norm: float | None = None,
    recompute_chunks: int | None = None,
) -> tuple[Tensor, MemoryCarry]:
    """Fast form of `naive_memory_update`: same arguments, same results.

    `recompute_chunks=g`: when gradients are recorded, keep what backward needs only at every g-th
    chunk border (the state there) and recompute the g chunks in between during backward
    (`torch.utils.checkpoint`): training memory falls from a weight-sized state per chunk to one
    per g chunks, plus one group's internals, for a second forward pass.
    """
    length = q.shape[1]
    # Chunk borders: first close the chunk an earlier call left open, then full chunks, then a tail.
    head = min((chunk_size - carry.position) % chunk_size, length)
    n_full = (length - head) // chunk_size

    def chunks(t: Tensor) -> list[Tensor]:
        """[N, T, ...] -> its chunks, the full ones made contiguous by one copy.

        One split and one copy: slicing per chunk would make autograd zero-fill a full-length
        gradient for every slice, quadratic in T.
        """
        first, body, tail = t.split([head, n_full * chunk_size, length - head - n_full * chunk_size], dim=1)
        body = body.unflatten(1, (n_full, chunk_size)).transpose(0, 1).contiguous()
        return [first] * bool(head) + list(body.unbind(0)) + [tail] * bool(tail.shape[1])

    # Gates chunk by chunk (inside `_chunk_steps`): batched over all chunks their [c, c] matrices
    # would be large tensors, slow to allocate and to stream through memory; one chunk's stay in cache.
    pieces = list(zip(*map(chunks, (q, k, v, theta, log_eta, log_keep))))
    if not pieces:
        return q.new_zeros(q.shape), carry
    weights, momentum = list(carry.weights), list(carry.momentum)
    opening = list(carry.chunk_start) if carry.position else weights
    recompute = bool(recompute_chunks) and torch.is_grad_enabled()
    group = recompute_chunks if recompute else len(pieces)
    outputs = []
    for start in range(0, len(pieces), group):
        part = pieces[start : start + group]
        if recompute:
            y, weights, momentum, last_start = checkpoint(_chunk_steps, part, weights, momentum, opening, max_grad_norm,
                                                          use_reentrant=False)
        else:
            y, weights, momentum, last_start = _chunk_steps(part, weights, momentum, opening, max_grad_norm)
        outputs.append(y)
        opening = weights
    position = (carry.position + length) % chunk_size
    chunk_start = weights if position == 0 else last_start
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return y, MemoryCarry(tuple(weights), tuple(momentum), tuple(chunk_start), position)
