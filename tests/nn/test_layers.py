"""The U-Net's layers (nn.layers): their speed paths equal the plain composition, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch
from unet_reference import ATOL, RTOL, _grads, _randomise_, ref_attn, ref_conv, ref_resblock

from ddpmkit.nn.layers import AttnBlock, Dropout, ResBlock, Upsample


@pytest.mark.parametrize("in_ch,out_ch", [(32, 32), (64, 32)])
def test_resblock_fast_path_equals_reference(in_ch, out_ch):
    torch.manual_seed(0)
    blk = _randomise_(ResBlock(in_ch=in_ch, out_ch=out_ch, temb_ch=64, dropout=0.0)).eval()
    g = torch.Generator().manual_seed(3)
    x, temb = torch.randn(2, in_ch, 8, 8, generator=g), torch.randn(2, 64, generator=g)
    ref = ref_resblock(blk, x, temb).detach()
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        with torch.inference_mode():
            torch.testing.assert_close(blk(xin, temb), ref, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(blk(xin, temb).detach(), ref, atol=ATOL, rtol=RTOL)


def test_attention_through_sdpa_equals_explicit_softmax():
    torch.manual_seed(0)
    blk = _randomise_(AttnBlock(64)).eval()
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = ref_attn(blk, x).detach()
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        before = xin.clone()
        with torch.inference_mode():
            torch.testing.assert_close(blk(xin), ref, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(blk(xin).detach(), ref, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(xin, before, atol=0, rtol=0)


def test_folded_attention_gradients_equal_the_four_projection_reference():
    """Gradients of every weight and of the input through the folded projections match the plain
    q/k/v/out composition; the key bias's reference gradient is zero up to rounding, as folding
    claims (the softmax cancels b_k), and the folded one is exactly zero."""
    torch.manual_seed(0)
    blk = _randomise_(AttnBlock(64))
    g = torch.Generator().manual_seed(6)
    x, target = torch.randn(2, 64, 8, 8, generator=g), torch.randn(2, 64, 8, 8, generator=g)
    params = [x.requires_grad_(), *blk.parameters()]
    names = ["x", *(n for n, _ in blk.named_parameters())]
    for xin_layout in (torch.contiguous_format, torch.channels_last):
        fast = _grads(blk(x.contiguous(memory_format=xin_layout)), target, params)
        ref = _grads(ref_attn(blk, x), target, params)
        for name, a, b in zip(names, fast, ref, strict=True):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4, msg=name)
        k_bias = names.index("to_k.bias")
        assert float(fast[k_bias].abs().max()) == 0.0
        assert float(ref[k_bias].abs().max()) < 1e-6 * float(ref[names.index("to_q.bias")].abs().max())


@pytest.mark.parametrize("shape", [(2, 8, 4, 4), (1, 8, 3, 5), (3, 8, 1, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_transposed_conv_upsample_equals_nearest_then_3x3_conv(shape, layout):
    """Forward in every autograd mode and gradients of x, weight and bias match upsampling the image
    by pixel repetition and running the 3x3 conv on it."""
    torch.manual_seed(0)
    up = _randomise_(Upsample(shape[1]))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randn(shape[0], shape[1], 2 * shape[2], 2 * shape[3], generator=g)

    def ref(x: torch.Tensor) -> torch.Tensor:
        return ref_conv(up.conv, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))

    with torch.no_grad():
        expected = ref(x)
    with torch.inference_mode():
        torch.testing.assert_close(up(x), expected, atol=ATOL, rtol=RTOL)
    out = up(x)
    torch.testing.assert_close(out.detach(), expected, atol=ATOL, rtol=RTOL)
    params = [x.requires_grad_(), up.conv.weight, up.conv.bias]
    fast, slow = _grads(up(x), target, params), _grads(ref(x), target, params)
    for a, b, name in zip(fast, slow, ("x", "weight", "bias"), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_is_bernoulli_and_scaled_like_torch_dropout(p):
    """The uniform >= p mask: the drop fraction is p within 5 standard errors (2^20 draws), kept
    values are x / (1 - p), the gradient is the same mask, layouts are kept, eval is the identity,
    and a seed fixes the mask."""
    drop = Dropout(p).train()
    x = (torch.rand(16, 64, 32, 32) + 0.5).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(0)
    y = drop(x)
    n = x.numel()
    dropped = float((y == 0).float().mean())
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), atol=0, rtol=1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(grad, kept.float() / (1 - p), atol=0, rtol=1e-6)
    torch.manual_seed(0)
    torch.testing.assert_close(drop(x), y, atol=0, rtol=0)
    assert drop.eval()(x) is x
