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

import contextlib
import functools
from typing import Any, Callable, NamedTuple, Sequence

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


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled on `device_type` (a no-op where autocast does not exist, e.g. meta)."""
    # Under torch.compile the device is a real one, where autocast exists; and torch 2.11's dynamo
    # cannot trace the availability check itself (a graph break, so a model compiled in pieces).
    if torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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
    # the factors, kept for the backward
    decay: Tensor  # [..., c, c]: decay[t, s] = prod_{s<j<=t} (1 - alpha_j), 0 above the diagonal
    carry: Tensor  # [..., c, c]: carry[s, i] = prod_{i<j<=s} eta_j, 0 above the diagonal
    eta_prefix: Tensor  # [..., c]: prod_{j<=t} eta_j


def _causal_exp_difference(cum: Tensor) -> Tensor:
    """exp(cum[t] - cum[s]) for s <= t, else 0; shape [..., c, c], for a non-increasing cum.

    Clamped at 0 (where s > t), exponentiated, then zeroed by tril: 2.5x faster on CPU than
    exponentiating a tensor masked with -inf, and no inf ever appears.
    """
    return (cum[..., :, None] - cum[..., None, :]).clamp_max_(0.0).exp_().tril_()


def chunk_gates(log_eta: Tensor, log_keep: Tensor) -> ChunkGates:
    """Unroll chunks of gates [..., c]; differences of cumulative sums never form a ratio of tiny products."""
    cum_keep, cum_eta = log_keep.cumsum(-1), log_eta.cumsum(-1)
    decay, carry = _causal_exp_difference(cum_keep), _causal_exp_difference(cum_eta)
    eta_prefix = cum_eta.exp()
    keep_s = torch.linalg.vecdot(decay, eta_prefix[..., None, :])
    return ChunkGates(decay @ carry, cum_keep.exp(), keep_s, carry[..., -1, :], eta_prefix[..., -1], decay, carry, eta_prefix)


def chunk_gates_backward(
    gates: ChunkGates, grad_mix: Tensor, grad_keep_w: Tensor, grad_keep_s: Tensor, grad_carry_last: Tensor,
    grad_eta_total: Tensor,
) -> tuple[Tensor, Tensor]:
    """Gradients of (log_eta, log_keep) from those of `chunk_gates`' outputs (for hand-written backwards)."""
    # mix = decay @ carry and keep_s = decay @ eta_prefix: the gradients of the two factors
    grad_decay = torch.matmul(grad_mix, gates.carry.mT).addcmul_(grad_keep_s[..., :, None], gates.eta_prefix[..., None, :])
    grad_carry = torch.matmul(gates.decay.mT, grad_mix)
    grad_carry[..., -1, :] += grad_carry_last
    # decay = exp(cum_keep[t] - cum_keep[s]) (0 where masked, so its gradient is too); likewise carry
    grad_diff_keep, grad_diff_eta = grad_decay.mul_(gates.decay), grad_carry.mul_(gates.carry)
    grad_cum_keep = grad_diff_keep.sum(-1) - grad_diff_keep.sum(-2) + grad_keep_w * gates.keep_w
    grad_cum_eta = grad_diff_eta.sum(-1) - grad_diff_eta.sum(-2)
    grad_cum_eta += torch.linalg.vecdot(gates.decay.mT, grad_keep_s[..., None, :]) * gates.eta_prefix
    grad_cum_eta[..., -1] += grad_eta_total * gates.eta_total
    # through the cumulative sums: reversed cumulative sums
    return grad_cum_eta.flip(-1).cumsum(-1).flip(-1), grad_cum_keep.flip(-1).cumsum(-1).flip(-1)


def _batched_dot(a: Tensor, b: Tensor) -> Tensor:
    """<a_n, b_n> for every n of [N, ...] tensors.

    vecdot, not bmm of [N, 1, m] by [N, m, 1]: such matrix-vector bmm runs ~6x slower on CPU.
    """
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1))


def _add_product(total: Tensor | None, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """total + alpha * a @ b (batched), in place; alpha * a @ b where there is no total yet."""
    if total is None:
        return torch.bmm(a, b) if alpha == 1.0 else torch.bmm(a, b).mul_(alpha)
    return total.baddbmm_(a, b, alpha=alpha)


def _silu_second_derivative(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


def _norm_scale_derivative(sq_norm: Tensor, scale: Tensor) -> Tensor:
    """d grad_norm_scale / d sq_norm: -scale / (2 sq_norm) where the bound is active, else 0."""
    return torch.where(scale < 1, -0.5 * scale / sq_norm.clamp_min(1e-24), torch.zeros_like(scale))


class _ChunkStep(torch.autograd.Function):
    """Read and write one chunk of c tokens, with a hand-written backward.

    Inputs: q, k, v [N, c, d]; theta, log_eta, log_keep [N, c]; the gradient-norm bound; whether
    to run the torch.compile'd forward and backward (`_compiled_kernels`); whether the gradient
    point W' is W itself (a chunk on a border); then per layer the weights W and momentum S before
    the chunk, then, unless shared, per layer W'. (Passing W twice would stop torch.compile, which
    cannot trace an autograd.Function given the same tensor twice: a graph break per chunk.)
    Outputs: y [N, c, d], then per layer the weights and momentum after the chunk.

    Forward, with the gates unrolled by `chunk_gates`, U_l / Z_l / E_l the layer inputs,
    pre-activations and errors of the keys at W', theta' = theta times the gradient-norm bound and
    A = mix * theta' (A[t, i]: the weight of G_i = U_i^T E_i in W_t):

        read   R_l = keep_w (H_l W_l) + keep_s (H_l S_l) - (A * H_l U_l^T) E_l,  H_{l+1} = silu(R_l)
        write  W_l' = keep_w[-1] W_l + keep_s[-1] S_l - U_l^T diag(A[-1]) E_l
               S_l' = eta_total S_l - U_l^T diag(carry_last * theta') E_l

    Autograd through these records some 60 operations per chunk, and saves and re-reads their
    [N, c, c] and weight-sized temporaries (the gate matrices, masked coefficients, broadcasts and
    negations); the backward below forms each gradient once, as batched products, and goes through
    the gates and the closed-form key gradients (second derivatives of the MLP) by hand. Tests hold
    it to the token-by-token autograd reference.
    """

    @staticmethod
    def forward(ctx, q, k, v, theta, log_eta, log_keep, max_grad_norm, compiled, shared, *layers):  # type: ignore[override]
        depth = len(layers) // (2 if shared else 3)
        layers = layers + layers[:depth] if shared else layers
        forward = _compiled_kernels()[0] if compiled else _chunk_forward
        outputs, saved = forward(q, k, v, theta, log_eta, log_keep, max_grad_norm, *layers)
        ctx.max_grad_norm, ctx.depth, ctx.compiled, ctx.device_type = max_grad_norm, depth, compiled, q.device.type
        # an output nobody uses (the state after a training call's last chunk) gets None, not a zero
        # tensor, so that backward skips what would only multiply zeros
        ctx.set_materialize_grads(False)
        # the gradient point is the weights themselves except in a chunk an earlier call opened
        ctx.shared = tuple(at is w for at, w in zip(layers[2 * depth :], layers[:depth]))
        # everything through save_for_backward, so that checkpointing's saved-tensor hooks see it all
        ctx.save_for_backward(*saved)
        return outputs

    @staticmethod
    def backward(ctx, grad_y, *grad_state):  # type: ignore[override]
        backward = _compiled_kernels()[1] if ctx.compiled else _chunk_backward
        # float32 like the forward: torch.compile traces this backward under the caller's autocast
        # (bf16-mixed), which would turn some of its products to bf16 and fail on mixed dtypes
        with autocast_off(ctx.device_type):
            grads = backward(ctx.depth, ctx.max_grad_norm, ctx.needs_input_grad[0], ctx.shared, ctx.saved_tensors,
                             grad_y, *grad_state)
        n_layer_inputs = 2 * ctx.depth if all(ctx.shared) else 3 * ctx.depth
        return (*grads[:6], None, None, None, *grads[6 : 6 + n_layer_inputs])


def _chunk_forward(
    q: Tensor, k: Tensor, v: Tensor, theta: Tensor, log_eta: Tensor, log_keep: Tensor, max_grad_norm: float | None,
    *layers: Tensor,
) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
    """`_ChunkStep`'s forward: (outputs, tensors saved for `_chunk_backward`)."""
    depth = len(layers) // 3
    weights, momentum, at = layers[:depth], layers[depth : 2 * depth], layers[2 * depth :]
    gates = chunk_gates(log_eta, log_keep)
    mix, keep_w, keep_s, carry_last, eta_total = gates[:5]
    # Keys through the memory at the gradient point, then the closed-form errors dLoss/dZ_l.
    inputs, pre, h = [], [], k
    for layer, w in enumerate(at):
        inputs.append(h)
        pre.append(torch.bmm(h, w))
        h = F.silu(pre[-1]) if layer < depth - 1 else pre[-1]
    errors, backs = [2 * (h - v)], []  # backs[l]: E_{l+1} W'_{l+1}^T, before the silu derivative
    for layer in range(depth - 1, 0, -1):
        backs.insert(0, torch.bmm(errors[0], at[layer].mT))
        errors.insert(0, backs[0] * _silu_derivative(pre[layer - 1]))
    sq_inputs = sq_errors = sq_norm = scale = None
    theta_eff = theta
    if max_grad_norm is not None:
        # ||U_i (x) E_i||_F = ||U_i|| ||E_i||: the per-token gradient norm without forming it
        sq_inputs = [u.pow(2).sum(-1) for u in inputs]
        sq_errors = [e.pow(2).sum(-1) for e in errors]
        sq_norm = sum(a * b for a, b in zip(sq_inputs, sq_errors))
        scale = grad_norm_scale(sq_norm, max_norm=max_grad_norm)
        theta_eff = theta * scale
    coef = mix * theta_eff[:, None, :]  # A

    # Queries through each token's own weights W_t (dual form).
    reads, h = [], q
    for layer in range(depth):
        u, e = inputs[layer], errors[layer]
        hw, hs, hu = torch.bmm(h, weights[layer]), torch.bmm(h, momentum[layer]), torch.bmm(h, u.mT)
        r = (hw * keep_w[..., None]).addcmul_(hs, keep_s[..., None]).baddbmm_(coef * hu, e, alpha=-1)
        last = layer == depth - 1
        reads.append((h, hw, hs, hu, None if last else r))  # the last R is the output y, whose gradient is given
        h = r if last else F.silu(r)

    # State after the chunk's last token.
    w_coef, s_coef = coef[:, -1], carry_last * theta_eff
    new_weights, new_momentum = [], []
    for layer in range(depth):
        u, e = inputs[layer], errors[layer]
        new_weights.append((weights[layer] * keep_w[:, -1, None, None]).addcmul_(momentum[layer], keep_s[:, -1, None, None])
                           .baddbmm_(u.mT, e * w_coef[..., None], alpha=-1))
        new_momentum.append((momentum[layer] * eta_total[:, None, None]).baddbmm_(u.mT, e * s_coef[..., None], alpha=-1))

    clip = [*sq_inputs, *sq_errors, sq_norm, scale] if max_grad_norm is not None else []
    saved = (theta, *gates, theta_eff, coef, *layers, *inputs, *pre, *errors, *backs,
             *(t for read in reads for t in read), *clip)
    return (h, *new_weights, *new_momentum), saved


def _chunk_backward(
    depth: int, max_grad_norm: float | None, needs_grad_q: bool, shared: Sequence[bool], saved: Sequence[Tensor],
    grad_y: Tensor, *grad_state: Tensor,
) -> tuple[Tensor | None, ...]:
    """`_ChunkStep`'s backward: gradients of (q, k, v, theta, log_eta, log_keep, *layers).

    Where the gradient point of a layer is its weights (`shared`), its gradient goes into theirs
    (and None is returned for it), so that no weight-sized sum is left to autograd. A gradient given
    as None (an unused output) counts as zero, and the work it would enter is skipped.
    """
    if grad_y is None and all(g is None for g in grad_state):
        return (None,) * (6 + 3 * depth)
    saved = iter(saved)
    theta = next(saved)
    gates = ChunkGates(*(next(saved) for _ in ChunkGates._fields))
    mix, keep_w, keep_s, carry_last, eta_total = gates[:5]
    theta_eff, coef = next(saved), next(saved)
    weights, momentum, at, inputs, pre, errors = ([next(saved) for _ in range(depth)] for _ in range(6))
    backs = [next(saved) for _ in range(depth - 1)]
    reads = [tuple(next(saved) for _ in range(5)) for _ in range(depth)]
    grad_new_w, grad_new_s = grad_state[:depth], grad_state[depth:]
    w_coef, s_coef = coef[:, -1], carry_last * theta_eff

    # Through the end-of-chunk state.
    grad_w, grad_s, grad_u, grad_e = [], [], [], []
    grad_w_coef = grad_s_coef = grad_keep_w_last = grad_keep_s_last = grad_eta_total = 0
    for layer in range(depth):
        g_w, g_s, u, e = grad_new_w[layer], grad_new_s[layer], inputs[layer], errors[layer]
        if g_w is None and g_s is None:  # the state after the chunk is unused
            for grads in (grad_w, grad_s, grad_e, grad_u):
                grads.append(None)
            continue
        g_w = torch.zeros_like(weights[layer]) if g_w is None else g_w
        g_s = torch.zeros_like(momentum[layer]) if g_s is None else g_s
        grad_w.append(g_w * keep_w[:, -1, None, None])
        grad_s.append((g_s * eta_total[:, None, None]).addcmul_(g_w, keep_s[:, -1, None, None]))
        back_w, back_s = torch.bmm(u, g_w), torch.bmm(u, g_s)  # [N, c, out]
        grad_e.append(-(back_w * w_coef[..., None]).addcmul_(back_s, s_coef[..., None]))
        grad_u.append(-torch.bmm(e * w_coef[..., None], g_w.mT).baddbmm_(e * s_coef[..., None], g_s.mT))
        grad_w_coef = grad_w_coef - (back_w * e).sum(-1)
        grad_s_coef = grad_s_coef - (back_s * e).sum(-1)
        grad_keep_w_last = grad_keep_w_last + _batched_dot(g_w, weights[layer])
        grad_keep_s_last = grad_keep_s_last + _batched_dot(g_w, momentum[layer])
        grad_eta_total = grad_eta_total + _batched_dot(g_s, momentum[layer])

    # Through the reads, last layer first (none of it when the outputs are unused).
    grad_coef = torch.zeros_like(coef)
    grad_keep_w, grad_keep_s = torch.zeros_like(keep_w), torch.zeros_like(keep_s)
    grad_h = grad_y
    for layer in range(depth - 1, -1, -1) if grad_y is not None else ():
        h, hw, hs, hu, r = reads[layer]
        grad_r = grad_h if layer == depth - 1 else grad_h * _silu_derivative(r)
        u, e = inputs[layer], errors[layer]
        grad_r_w, grad_r_s = grad_r * keep_w[..., None], grad_r * keep_s[..., None]
        grad_w[layer] = _add_product(grad_w[layer], h.mT, grad_r_w)
        grad_s[layer] = _add_product(grad_s[layer], h.mT, grad_r_s)
        grad_keep_w += (grad_r * hw).sum(-1)
        grad_keep_s += (grad_r * hs).sum(-1)
        grad_mixed = torch.bmm(grad_r, e.mT).neg_()  # dLoss / d(A * H U^T)
        grad_e[layer] = _add_product(grad_e[layer], (coef * hu).mT, grad_r, alpha=-1.0)
        grad_coef.addcmul_(grad_mixed, hu)
        grad_hu = grad_mixed.mul_(coef)
        grad_u[layer] = _add_product(grad_u[layer], grad_hu.mT, h)
        if layer or needs_grad_q:
            grad_h = torch.bmm(grad_r_w, weights[layer].mT).baddbmm_(grad_r_s, momentum[layer].mT).baddbmm_(grad_hu, u)
    grad_q = grad_h if needs_grad_q else None  # None too when the outputs are unused (grad_y None)
    # what neither the state nor the reads reached is zero
    grad_e = [torch.zeros_like(e) if g is None else g for g, e in zip(grad_e, errors)]
    grad_u = [torch.zeros_like(u) if g is None else g for g, u in zip(grad_u, inputs)]

    # A = mix * theta', w_coef = A[:, -1], s_coef = carry_last * theta'.
    grad_coef[:, -1] += grad_w_coef
    grad_keep_w[:, -1] += grad_keep_w_last
    grad_keep_s[:, -1] += grad_keep_s_last
    grad_mix = grad_coef * theta_eff[:, None, :]
    grad_theta_eff = (grad_coef * mix).sum(1) + grad_s_coef * carry_last
    grad_carry_last = grad_s_coef * theta_eff
    grad_theta = grad_theta_eff
    if max_grad_norm is not None:
        sq_inputs, sq_errors = [next(saved) for _ in range(depth)], [next(saved) for _ in range(depth)]
        sq_norm, scale = next(saved), next(saved)
        grad_theta = grad_theta_eff * scale
        grad_sq_norm = grad_theta_eff * theta * _norm_scale_derivative(sq_norm, scale)
        for layer in range(depth):
            grad_u[layer].addcmul_(inputs[layer], (2 * grad_sq_norm * sq_errors[layer])[..., None])
            grad_e[layer].addcmul_(errors[layer], (2 * grad_sq_norm * sq_inputs[layer])[..., None])

    # Through the errors E_l = (E_{l+1} W'_{l+1}^T) * silu'(Z_l), first layer first.
    grad_at = [grad_w[layer] if shared[layer] else None for layer in range(depth)]
    grad_pre = [None] * depth
    for layer in range(depth - 1):
        grad_back = grad_e[layer] * _silu_derivative(pre[layer])
        grad_pre[layer] = grad_e[layer] * backs[layer] * _silu_second_derivative(pre[layer])
        grad_e[layer + 1].baddbmm_(grad_back, at[layer + 1])
        grad_at[layer + 1] = _add_product(grad_at[layer + 1], grad_back.mT, errors[layer + 1])
    grad_pre[-1] = 2 * grad_e[-1]
    grad_v = -2 * grad_e[-1]
    # Through the keys' forward pass at W', last layer first.
    grad_k = None
    for layer in range(depth - 1, -1, -1):
        grad_at[layer] = _add_product(grad_at[layer], inputs[layer].mT, grad_pre[layer])
        grad_in = grad_u[layer].baddbmm_(grad_pre[layer], at[layer].mT)
        if layer:
            grad_pre[layer - 1] += grad_in * _silu_derivative(pre[layer - 1])
        else:
            grad_k = grad_in
    grad_log_eta, grad_log_keep = chunk_gates_backward(gates, grad_mix, grad_keep_w, grad_keep_s, grad_carry_last,
                                                       grad_eta_total)
    grad_at = [None if shared[layer] else grad for layer, grad in enumerate(grad_at)]
    return (grad_q, grad_k, grad_v, grad_theta, grad_log_eta, grad_log_keep, *grad_w, *grad_s, *grad_at)


@functools.cache
def _compiled_kernels() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """`_chunk_forward` and `_chunk_backward` through torch.compile, made once per process.

    Inductor fuses their chains of elementwise ops on [N, c, ...] tensors into a few kernels (C++
    with vector instructions on CPU, Triton on CUDA); each new set of shapes costs a compile of
    some seconds, then the kernels are reused. Same results to rounding.
    """
    return torch.compile(_chunk_forward, fullgraph=True), torch.compile(_chunk_backward, fullgraph=True)


def _chunk_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor,
    log_keep: Tensor,
    weights: Sequence[Tensor],
    momentum: Sequence[Tensor],
    grad_weights: Sequence[Tensor],
    max_grad_norm: float | None,
    compiled: bool,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Read and write one chunk of c tokens. Shapes: q, k, v [N, c, d]; theta and the log-gates [N, c].

    `weights`/`momentum` are W, S just before the chunk; `grad_weights` are where the chunk's
    gradients are taken (the same as `weights` unless the chunk was opened by an earlier call).
    """
    depth = len(weights)
    shared = all(at is w for at, w in zip(grad_weights, weights))
    y, *state = _ChunkStep.apply(q, k, v, theta, log_eta, log_keep, max_grad_norm, compiled, shared, *weights,
                                 *momentum, *(() if shared else grad_weights))
    return y, state[:depth], state[depth:]


def _chunk_steps(
    pieces: Sequence[tuple[Tensor, ...]],
    weights: Sequence[Tensor],
    momentum: Sequence[Tensor],
    opening: Sequence[Tensor],
    max_grad_norm: float | None,
    compiled: bool,
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
        y, weights, momentum = _chunk_step(q_c, k_c, v_c, theta_c, eta_c, keep_c, weights, momentum,
                                           grad_weights, max_grad_norm, compiled)
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
    compile_chunks: bool = False,
) -> tuple[Tensor, MemoryCarry]:
    """Fast form of `naive_memory_update`: same arguments, same results.

    `compile_chunks=True` runs each chunk's forward and backward through torch.compile
    (`_compiled_kernels`): fused kernels, faster after a compile of some seconds per new shape.

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
        # `if`, not `[first] * bool(head)`: under torch.compile's dynamic shapes bool() of a size is
        # symbolic, which a list cannot be multiplied by
        return ([first] if head else []) + list(body.unbind(0)) + ([tail] if tail.shape[1] else [])

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
                                                          compile_chunks, use_reentrant=False)
        else:
            y, weights, momentum, last_start = _chunk_steps(part, weights, momentum, opening, max_grad_norm, compile_chunks)
        outputs.append(y)
        opening = weights
    position = (carry.position + length) % chunk_size
    chunk_start = weights if position == 0 else last_start
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return y, MemoryCarry(tuple(weights), tuple(momentum), tuple(chunk_start), position)
