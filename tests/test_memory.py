"""The fast chunked memory against the token-by-token autograd reference, and its contracts."""

import pickle

import pytest
import torch

from titans_ts import MemoryState, NeuralMemory

DIM, HEADS, BATCH, LENGTH = 16, 2, 2, 21  # LENGTH is a multiple of no chunk size below


def make_memory(depth=2, chunk_size=8, dtype=torch.float64, seed=0, max_grad_norm=None, **kwargs):
    torch.manual_seed(seed)
    memory = NeuralMemory(
        DIM, heads=HEADS, depth=depth, chunk_size=chunk_size, max_grad_norm=max_grad_norm, **kwargs
    ).to(dtype)
    # Random gate biases so momentum and forgetting really vary from token to token.
    with torch.no_grad():
        memory.to_gates.bias.normal_(0.0, 1.5)
    return memory


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def state_tensors(state: MemoryState):
    return [*state.weights, *state.momentum, *state.chunk_start, state.conv_cache]


def assert_states_close(fast: MemoryState, ref: MemoryState, tol: float):
    assert fast.position == ref.position
    for a, b in zip(state_tensors(fast), state_tensors(ref), strict=True):
        assert a.shape == b.shape
        assert relative_error(a, b) <= tol


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
@pytest.mark.parametrize("carry_state", [False, True])
def test_fast_matches_reference(dtype, tol, depth, chunk_size, carry_state):
    memory = make_memory(depth, chunk_size, dtype)
    x = torch.randn(BATCH, LENGTH, DIM, dtype=dtype)
    state = None
    with torch.no_grad():
        if carry_state:  # a state that ends mid-chunk, with nonzero momentum
            _, state = memory.reference(torch.randn(BATCH, 5, DIM, dtype=dtype))
        y_fast, s_fast = memory(x, state)
        y_ref, s_ref = memory.reference(x, state)
    assert relative_error(y_fast, y_ref) <= tol
    assert_states_close(s_fast, s_ref, tol)


@pytest.mark.parametrize("depth, chunk_size, max_grad_norm", [(1, 3, None), (2, 8, None), (3, 4, None), (2, 5, 0.05)])
def test_gradients_match_reference(depth, chunk_size, max_grad_norm):
    memory = make_memory(depth, chunk_size, max_grad_norm=max_grad_norm)
    x = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64)
    weights = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64)
    grads = []
    for run in (memory.forward, memory.reference):
        memory.zero_grad()
        y, state = run(x)
        # the loss reaches the final memory weights too, so their gradient paths are checked
        loss = (y * weights).sum() + sum(w.sum() for w in state.weights)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in memory.named_parameters()})
    fast, ref = grads
    assert fast.keys() == {name for name, _ in memory.named_parameters()}
    for name in ref:
        assert relative_error(fast[name], ref[name]) <= 1e-10, name


@pytest.mark.parametrize("loss_on", ["outputs", "final momentum", "outputs and final weights"])
def test_gradients_match_reference_whatever_the_loss_leaves_unused(loss_on):
    """Unused outputs reach the chunk step's backward as None (the state after the last chunk when
    training, the outputs when only the state matters); what they would enter must count as zero."""
    memory = make_memory(2, 4, max_grad_norm=0.5)
    x = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64)
    grads = []
    for run in (memory.forward, memory.reference):
        memory.zero_grad()
        x.grad = None
        y, state = run(x)
        loss = {
            "outputs": lambda: (y * weights).sum(),
            "final momentum": lambda: sum(s.pow(2).sum() for s in state.momentum),
            "outputs and final weights": lambda: (y * weights).sum() + sum(w.sum() for w in state.weights),
        }[loss_on]()
        loss.backward()
        grads.append({"x": x.grad.clone(), **{name: p.grad.clone() for name, p in memory.named_parameters()
                                              if p.grad is not None}})
    fast, ref = grads
    assert fast.keys() == ref.keys()
    for name in ref:
        assert relative_error(fast[name], ref[name]) <= 1e-10, name


@pytest.mark.parametrize("depth, chunk_size, first_piece", [(2, 4, 6), (3, 3, 4), (2, 5, 10)])
def test_gradients_through_a_carried_state_match_reference(depth, chunk_size, first_piece):
    """A stream in two pieces, the loss on both and on the final weights and momentum: gradients flow
    through the carried state, including a chunk opened by the first piece (first_piece not a multiple
    of chunk_size), whose gradients are taken at weights from the earlier call."""
    memory = make_memory(depth, chunk_size, max_grad_norm=0.5)
    x = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64)
    weights = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64)
    grads = []
    for run in (memory.forward, memory.reference):
        memory.zero_grad()
        y_first, state = run(x[:, :first_piece])
        y_rest, state = run(x[:, first_piece:], state)
        y = torch.cat([y_first, y_rest], dim=1)
        loss = (y * weights).sum() + sum(w.pow(2).sum() for w in (*state.weights, *state.momentum))
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in memory.named_parameters()})
    fast, ref = grads
    for name in ref:
        assert relative_error(fast[name], ref[name]) <= 1e-10, name


@pytest.mark.parametrize("recompute_chunks", [1, 2, 5])
@pytest.mark.parametrize("carry_state", [False, True])
def test_recomputing_chunks_changes_nothing_but_memory(recompute_chunks, carry_state):
    memory = make_memory(depth=2, chunk_size=3, max_grad_norm=0.5)
    x = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64)
    weights = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64)
    with torch.no_grad():  # a state that ends mid-chunk, with nonzero momentum
        state = memory(torch.randn(BATCH, 4, DIM, dtype=torch.float64))[1] if carry_state else None
    results = []
    for setting in (None, recompute_chunks):
        memory.recompute_chunks = setting
        memory.zero_grad()
        y, new_state = memory(x, state)
        ((y * weights).sum() + sum(w.sum() for w in new_state.weights)).backward()
        results.append((y.detach(), new_state, {n: p.grad.clone() for n, p in memory.named_parameters() if p.grad is not None}))
    (y_plain, state_plain, grads_plain), (y_recomputed, state_recomputed, grads_recomputed) = results
    assert torch.equal(y_plain, y_recomputed)
    assert_states_close(state_recomputed, state_plain, 0.0)
    assert grads_plain.keys() == grads_recomputed.keys()
    for name, grad in grads_plain.items():
        assert relative_error(grads_recomputed[name], grad) <= 1e-12, name
    with torch.no_grad():  # without gradients there is nothing to recompute: the plain path
        assert torch.equal(memory(x, state)[0], y_plain)


def test_grad_norm_bound_is_active_and_exact():
    memory = make_memory(2, 4, max_grad_norm=1e-3)
    free = make_memory(2, 4)
    x = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64)
    with torch.no_grad():
        y_fast, _ = memory(x)
        y_ref, _ = memory.reference(x)
        y_free, _ = free(x)
    assert relative_error(y_fast, y_ref) <= 1e-10
    assert relative_error(y_fast, y_free) > 1e-3  # the bound changed the writes


def test_chunk_size_one_is_the_papers_per_token_rule():
    """Depth 1 (matrix memory), written out by hand: no autograd, no chunks."""
    memory = make_memory(depth=1, chunk_size=1)
    x = torch.randn(1, LENGTH, DIM, dtype=torch.float64)
    with torch.no_grad():
        y, _ = memory(x)
        qkv = torch.nn.functional.silu(memory.to_qkv(x))
        qkv = torch.nn.functional.pad(qkv.transpose(1, 2), (memory.conv_kernel - 1, 0))
        q, k, v = memory.conv(qkv).transpose(1, 2)[0].view(LENGTH, 3, HEADS, DIM // HEADS).unbind(1)
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
        theta_logit, eta_logit, alpha_logit = memory.to_gates(x)[0].view(LENGTH, 3, HEADS).unbind(1)
        theta = memory.max_lr * torch.sigmoid(theta_logit)
        eta, alpha = torch.sigmoid(eta_logit), torch.sigmoid(alpha_logit)
        expected = torch.empty(LENGTH, HEADS, DIM // HEADS, dtype=torch.float64)
        for h in range(HEADS):
            M = memory.initial_weights[0][h].clone()  # y = x @ M
            S = torch.zeros_like(M)
            for t in range(LENGTH):
                grad = torch.outer(k[t, h], 2 * (k[t, h] @ M - v[t, h]))  # d/dM ||k M - v||^2
                S = eta[t, h] * S - theta[t, h] * grad
                M = (1 - alpha[t, h]) * M + S
                expected[t, h] = q[t, h] @ M
        expected = memory.to_out(expected.reshape(1, LENGTH, DIM))
    assert relative_error(y, expected) <= 1e-10


@pytest.mark.parametrize("chunk_size", [1, 4, 16])
@pytest.mark.parametrize("cuts", [[7], [1, 2, 3], [5, 11, 12, 20]])
def test_stream_in_pieces_equals_whole(chunk_size, cuts):
    memory = make_memory(2, chunk_size)
    x = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64)
    with torch.no_grad():
        y_whole, s_whole = memory(x)
        pieces, state = [], None
        for lo, hi in zip([0, *cuts], [*cuts, LENGTH]):
            y, state = memory(x[:, lo:hi], state)
            pieces.append(y)
    assert relative_error(torch.cat(pieces, dim=1), y_whole) <= 1e-10
    assert_states_close(state, s_whole, 1e-10)


@pytest.mark.parametrize("chunk_size, n_prefix", [(4, 4), (3, 5), (8, 2)])
def test_primed_prefix_equals_the_prefix_read_by_every_stream(chunk_size, n_prefix):
    """prime() reads a shared prefix once and broadcasts it: outputs, state and the gradients of every
    parameter and of the prefix are those of every stream reading [prefix | x] itself."""
    memory = make_memory(2, chunk_size, max_grad_norm=0.5)
    prefix = torch.randn(n_prefix, DIM, dtype=torch.float64, requires_grad=True)
    x = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64)
    weights = torch.randn(BATCH, n_prefix + LENGTH, DIM, dtype=torch.float64)
    results = []
    for primed in (True, False):
        memory.zero_grad()
        prefix.grad = None
        if primed:
            y_prefix, state = memory.prime(prefix, BATCH)
            y_rest, state = memory(x, state)
            y = torch.cat([y_prefix, y_rest], dim=1)
        else:
            y, state = memory(torch.cat([prefix.expand(BATCH, -1, -1), x], dim=1))
        loss = (y * weights).sum() + sum(w.pow(2).sum() for w in (*state.weights, *state.momentum))
        loss.backward()
        grads = {name: p.grad.clone() for name, p in memory.named_parameters()}
        results.append((y.detach(), state, grads, prefix.grad.clone()))
    (y_p, s_p, g_p, gx_p), (y_w, s_w, g_w, gx_w) = results
    assert relative_error(y_p, y_w) <= 1e-10
    assert_states_close(s_p, s_w, 1e-10)
    for name in g_w:
        assert relative_error(g_p[name], g_w[name]) <= 1e-10, name
    assert relative_error(gx_p, gx_w) <= 1e-10


def test_only_a_single_stream_state_expands():
    memory = make_memory(2, 4)
    _, state = memory(torch.randn(BATCH, 5, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="only a state of batch 1"):
        state.expand(4)
    with pytest.raises(ValueError, match=r"prefix tokens of shape \[n, 16\]"):
        memory.prime(torch.randn(1, 3, DIM, dtype=torch.float64), 4)


def test_sequence_shorter_than_a_chunk_updates_the_memory():
    memory = make_memory(2, chunk_size=16)
    x = torch.randn(BATCH, 3, DIM, dtype=torch.float64)
    initial = memory.initial_state(BATCH, dtype=torch.float64)
    with torch.no_grad():
        _, state = memory(x)
        probe = torch.randn(BATCH, 4, DIM, dtype=torch.float64)
        y_after, _ = memory(probe, state)
        y_fresh, _ = memory(probe)
    assert state.position == 3
    for before, after in zip(initial.weights, state.weights):
        assert (after - before).abs().max() > 1e-6
    assert relative_error(y_after, y_fresh) > 1e-6


def test_causal():
    memory = make_memory(3, chunk_size=8)
    x = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64)
    changed = x.clone()
    changed[:, 10] += 5.0
    with torch.no_grad():
        y, _ = memory(x)
        y_changed, _ = memory(changed)
    assert torch.equal(y[:, :10], y_changed[:, :10])
    assert (y[:, 10:] - y_changed[:, 10:]).abs().amax(dim=(0, 2)).min() > 0


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(max_grad_norm=None, max_lr=0.02), dict(depth=3, max_grad_norm=0.5)],
    ids=["defaults", "unbounded-small-lr", "depth3-tight-bound"],
)
def test_stable_over_a_long_random_stream(settings):
    torch.manual_seed(1)
    memory = NeuralMemory(32, **{"heads": 4, "depth": 2, "chunk_size": 32, **settings})
    x = torch.randn(1, 20_000, 32) * 3
    with torch.no_grad():
        y, state = memory(x)
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(w).all() for w in (*state.weights, *state.momentum))


def test_bf16_autocast_runs():
    torch.manual_seed(0)
    memory = NeuralMemory(32, heads=4, depth=2, chunk_size=8)
    x = torch.randn(2, 40, 32)
    y32, _ = memory(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = memory(x)
    y16.float().sum().backward()
    assert torch.isfinite(y16).all()
    assert all(torch.isfinite(p.grad).all() for p in memory.parameters())
    assert relative_error(y16.float(), y32) < 0.1


def test_nothing_assumes_cpu():
    """On the meta device, any tensor made on the CPU by mistake would raise a device mismatch."""
    memory = NeuralMemory(DIM, heads=HEADS, depth=3, chunk_size=4).to("meta")
    y, state = memory(torch.empty(BATCH, LENGTH, DIM, device="meta"))
    assert y.device.type == "meta" and all(w.device.type == "meta" for w in state_tensors(state))


def test_torch_compile_matches_eager():
    memory = make_memory(2, chunk_size=8, dtype=torch.float32)
    x = torch.randn(BATCH, 12, DIM)  # a full chunk and a partial one, to keep compile time short
    compiled = torch.compile(memory)
    with torch.no_grad():
        y_eager, _ = memory(x)
        y_compiled, _ = compiled(x)
    assert relative_error(y_compiled, y_eager) <= 1e-5


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_torch_compile_traces_the_memory_as_one_graph(autocast):
    """No graph break: one per chunk (an autograd.Function given the same tensor twice) or at the
    autocast guard would split a compiled model into pieces that recompile."""
    memory = make_memory(2, chunk_size=4, dtype=torch.float32)

    def run(x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return memory(x)

    explanation = torch._dynamo.explain(run)(torch.randn(BATCH, 12, DIM))  # three chunks
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def eager_and_compiled_chunks(dtype: torch.dtype, device: str | torch.device = "cpu"):
    """(y, state, parameter gradients) of one memory with eager and one with compiled chunk steps, on
    the same input (two full chunks), and the compiled memory."""
    results = []
    for compile_chunks in (False, True):
        memory = make_memory(2, chunk_size=4, dtype=dtype, max_grad_norm=0.5, compile_chunks=compile_chunks).to(device)
        x = torch.randn(BATCH, 8, DIM, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(device)
        y, state = memory(x)
        (y.pow(2).sum() + sum(w.sum() for w in (*state.weights, *state.momentum))).backward()
        results.append((y.detach(), state, {n: p.grad for n, p in memory.named_parameters()}))
    return results[0], results[1], memory


def test_compiled_chunks_match_eager_with_gradients():
    """compile_chunks=True: the same outputs, states and parameter gradients as the eager chunk step.
    Two full chunks, so one shape is compiled (compiling is the slow part of this test)."""
    (y_eager, s_eager, g_eager), (y_compiled, s_compiled, g_compiled), compiled = eager_and_compiled_chunks(torch.float64)
    assert "compile_chunks=True" in repr(compiled)
    assert relative_error(y_compiled, y_eager) <= 1e-10
    assert_states_close(s_compiled, s_eager, 1e-10)
    for name, grad in g_eager.items():
        assert relative_error(g_compiled[name], grad) <= 1e-10, name
    assert pickle.loads(pickle.dumps(compiled)).compile_chunks  # a flag, nothing compiled kept on the module


def test_pickle_round_trip():
    memory = make_memory(2, chunk_size=4)
    x = torch.randn(BATCH, LENGTH, DIM, dtype=torch.float64)
    clone = pickle.loads(pickle.dumps(memory))
    with torch.no_grad():
        y, state = memory(x)
        y_clone, _ = clone(x)
    assert torch.equal(y, y_clone)
    restored = pickle.loads(pickle.dumps(state))
    assert restored.position == state.position


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=10, heads=4), "multiple of heads"),
        (dict(dim=0), "dim must be positive"),
        (dict(dim=8, depth=0), "depth must be >= 1"),
        (dict(dim=8, chunk_size=0), "chunk_size must be >= 1"),
        (dict(dim=8, max_lr=-1.0), "max_lr must be positive"),
        (dict(dim=8, conv_kernel=0), "conv_kernel must be >= 1"),
        (dict(dim=8, max_grad_norm=0.0), "max_grad_norm must be positive"),
        (dict(dim=8, recompute_chunks=0), "recompute_chunks must be a positive number of chunks"),
        (dict(dim=8, forget_bias=float("inf")), "forget_bias must be a finite number"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeuralMemory(**kwargs)


def test_bad_input_shape_is_named():
    memory = NeuralMemory(8, heads=2)
    with pytest.raises(ValueError, match=r"expects x of shape \[batch, T, 8\]"):
        memory(torch.randn(2, 5, 7))


def test_forget_bias_sets_the_initial_forgetting_rate_everywhere_it_is_passed():
    """The module's forget_bias reaches every memory's forgetting gate, and only that gate; -6 is the default."""
    from forecasters.module import TitansForecastingModule

    assert (NeuralMemory(8, heads=2).to_gates.bias.view(3, 2)[2] == -6.0).all()
    for variant in ("mac", "mag", "mal", "lmm"):
        module = TitansForecastingModule(variant=variant, lookback=32, horizon=8, dim=16, n_layers=2, heads=2,
                                         forget_bias=-3.0)
        memories = [m for m in module.modules() if isinstance(m, NeuralMemory)]
        assert len(memories) == 2
        for memory in memories:
            theta, eta, alpha = memory.to_gates.bias.view(3, 2)
            assert (alpha == -3.0).all() and (theta == 0.0).all() and (eta == 2.0).all()
