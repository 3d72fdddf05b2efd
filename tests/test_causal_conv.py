"""The causal depthwise convolution with its hand-written backward, against torch's conv1d."""

import pytest
import torch

from titans_ts.causal_conv import causal_depthwise_conv, conv1d_reference


@pytest.mark.parametrize("kernel", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_conv1d_in_values_and_gradients(kernel, with_bias):
    torch.manual_seed(kernel)
    context = torch.randn(3, 9 + kernel - 1, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 1, kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = [t for t in (context, weight, bias) if t is not None]
    grad_out = torch.randn(3, 9, 5, dtype=torch.float64)

    ours = causal_depthwise_conv(context, weight, bias)
    grads = torch.autograd.grad(ours, inputs, grad_out)
    ref = conv1d_reference(context, weight, bias)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)

    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(causal_depthwise_conv, (context, weight, bias))


def test_each_output_sees_only_its_own_and_earlier_steps():
    context = torch.zeros(1, 3 + 6, 2)
    context[0, 3 + 4] = 1.0  # an impulse at window step 4
    out = causal_depthwise_conv(context, torch.ones(2, 4))
    assert out[0, :4].abs().sum() == 0 and (out[0, 4:] == 1).all()


def test_bf16_activations_with_float32_weights_as_under_autocast():
    context = torch.randn(2, 11, 4).bfloat16().requires_grad_()
    weight = torch.randn(4, 1, 4, requires_grad=True)
    out = causal_depthwise_conv(context, weight, torch.zeros(4, requires_grad=True))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and context.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), conv1d_reference(context.float(), weight, None), rtol=0.05, atol=0.05)


def test_wrong_shapes_name_the_expected_layout():
    with pytest.raises(ValueError, match=r"context must be \[batch, T \+ 3, 4\]"):
        causal_depthwise_conv(torch.randn(2, 10, 5), torch.randn(4, 4))
