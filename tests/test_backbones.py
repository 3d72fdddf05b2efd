"""The MAC / MAG / MAL / LMM backbones: shapes, causality, gradients, masks, streaming."""

import pickle

import pytest
import torch

from titans_ts import VARIANTS, PersistentMemory, TitansBackbone
from titans_ts.layers import memory_context_mask, sliding_window_mask


def make_backbone(variant, **kwargs):
    torch.manual_seed(0)
    settings = dict(dim=32, n_layers=2, heads=4, window=6, segment_len=8, chunk_size=4, n_persistent=3)
    return TitansBackbone(variant, **{**settings, **kwargs}).double()


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_gradients_and_states(variant):
    backbone = make_backbone(variant)
    x = torch.randn(3, 21, 32, dtype=torch.float64)
    y, states = backbone(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert len(states) == 2
    y.square().mean().backward()
    for name, p in backbone.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
    backbone = make_backbone(variant)
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    changed = x.clone()
    changed[:, 13] += 3.0
    with torch.no_grad():
        y, _ = backbone(x)
        y_changed, _ = backbone(changed)
    assert torch.equal(y[:, :13], y_changed[:, :13])
    assert not torch.allclose(y[:, 13], y_changed[:, 13])


@pytest.mark.parametrize("variant, piece", [("lmm", 5), ("mac", 8)])
def test_stream_in_pieces_equals_whole(variant, piece):
    """LMM carries everything in its memory; MAC too, when pieces end on segment borders."""
    backbone = make_backbone(variant).eval()
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = backbone(x)
        states, pieces = None, []
        for part in x.split(piece, dim=1):
            y, states = backbone(part, states)
            pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pickle_round_trip(variant):
    backbone = make_backbone(variant)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    clone = pickle.loads(pickle.dumps(backbone))
    with torch.no_grad():
        assert torch.equal(backbone(x)[0], clone(x)[0])


def test_sliding_window_mask():
    mask = sliding_window_mask(n_persistent=2, length=5, window=3, device=torch.device("cpu"))
    assert mask.shape == (7, 7)
    assert mask[:, :2].all()  # persistent tokens are seen by every row
    assert not mask[:2, 2:].any()  # and see no input token
    body = mask[2:, 2:].int()
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(body, expected)


def test_memory_context_mask():
    mask = memory_context_mask(n_persistent=2, length=3, device=torch.device("cpu"))
    assert mask.shape == (3, 2 + 3 + 3)
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    assert mask[:, :2].all() and torch.equal(mask[:, 2:5], causal) and torch.equal(mask[:, 5:], causal)


def test_persistent_memory_prepends_learned_tokens():
    persistent = PersistentMemory(4, 8)
    x = torch.randn(2, 5, 8)
    out = persistent(x)
    assert out.shape == (2, 9, 8)
    assert torch.equal(out[0, :4], persistent.tokens.detach()) and torch.equal(out[:, 4:], x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="rnn"), "variant must be one of"),
        (dict(n_layers=0), "n_layers must be >= 1"),
        (dict(window=0), "window must be >= 1"),
        (dict(variant="mac", segment_len=0), "segment_len must be >= 1"),
        (dict(dim=30, heads=4), "multiple of heads"),
        (dict(n_persistent=-1), "n_persistent must be >= 0"),
        (dict(dropout=1.0), "dropout must be in"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TitansBackbone(**kwargs)
