"""The U-Net's speed paths change no numbers (benchmarks/NOTES.md lists them).

The fast paths: activations in channels_last end to end, the residual and time-embedding adds done
in place, the swish done in place when autograd is off, SDPA attention with the four projections
folded into two, dropout's mask drawn as uniform >= p, and the upsampling conv run as a stride-2
transposed conv on the low-resolution input.
Every check compares the module against an independent, plain composition of the paper's layers
(App. B), written here with out-of-place functional ops on contiguous NCHW tensors and attention as
an explicit softmax with four projections, within the U-Net parity tolerance: 1e-4 max abs
difference in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ddpmkit.nn import UNet
from ddpmkit.nn.layers import AttnBlock, Dropout, ResBlock, Upsample

ATOL = 1e-4  # the U-Net parity tolerance (tests/test_nn.py, tests/test_interop_diffusers.py)
RTOL = 0.0


def _randomise_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of order 0.1 everywhere: the authors' near-zero init of the output convs would make
    any two paths agree trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(p[0].numel(), 1))) + 0.02)
    return module


@pytest.fixture(scope="module")
def small_unet() -> UNet:
    # two levels (16 and 8 px), attention at 8 px, a channel change (1x1 shortcuts), no dropout
    torch.manual_seed(0)
    net = UNet.from_preset(
        "cifar10", resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0
    )
    return _randomise_(net).eval()


def _inputs(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 1000, (batch,), generator=g)


# ----------------------------------------------------------------------------- the reference composition
def ref_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / (half - 1))
    args = t.double()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1).float()  # (B, dim)


def ref_gn_swish(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.silu(F.group_norm(x.contiguous(), norm.num_groups, norm.weight, norm.bias, norm.eps))


def ref_conv(conv: torch.nn.Conv2d, x: torch.Tensor, padding: int | None = None) -> torch.Tensor:
    pad = conv.padding if padding is None else padding
    return F.conv2d(x.contiguous(), conv.weight.contiguous(), conv.bias, stride=conv.stride, padding=pad)


def ref_resblock(blk: ResBlock, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    h = ref_conv(blk.conv1, ref_gn_swish(blk.norm1, x))
    h = h + F.linear(F.silu(temb), blk.time_emb_proj.weight, blk.time_emb_proj.bias)[:, :, None, None]
    h = ref_conv(blk.conv2, ref_gn_swish(blk.norm2, h))  # dropout 0 / eval
    skip = x if blk.conv_shortcut is None else ref_conv(blk.conv_shortcut, x)
    return skip + h


def ref_attn(blk: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    n = blk.group_norm
    h = F.group_norm(x.contiguous(), n.num_groups, n.weight, n.bias, n.eps).reshape(B, C, H * W)  # (B, C, HW)
    q, k, v = (
        torch.einsum("oc,bcn->bno", lin.weight, h) + lin.bias for lin in (blk.to_q, blk.to_k, blk.to_v)
    )
    w = torch.softmax(torch.einsum("bic,bjc->bij", q, k) / math.sqrt(C), dim=-1)  # (B, HW, HW)
    a = torch.einsum("bij,bjc->bic", w, v)  # (B, HW, C)
    out = torch.einsum("oc,bnc->bon", blk.to_out.weight, a) + blk.to_out.bias[:, None]  # (B, C, HW)
    return x + out.reshape(B, C, H, W)


def ref_unet(net: UNet, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    te = net.time_embedding
    emb = ref_timestep_embedding(t, net.config.ch)
    temb = F.linear(
        F.silu(F.linear(emb, te.linear_1.weight, te.linear_1.bias)), te.linear_2.weight, te.linear_2.bias
    )
    h = ref_conv(net.conv_in, x)
    hs = [h]
    for level in net.down_blocks:
        for j, blk in enumerate(level.resnets):
            h = ref_resblock(blk, h, temb)
            if len(level.attentions):
                h = ref_attn(level.attentions[j], h)
            hs.append(h)
        if level.downsample is not None:
            h = ref_conv(level.downsample.conv, F.pad(h, (0, 1, 0, 1)), padding=0)
            hs.append(h)
    mid = net.mid_block
    h = ref_resblock(mid.resnets[1], ref_attn(mid.attentions[0], ref_resblock(mid.resnets[0], h, temb)), temb)
    for level in net.up_blocks:
        for j, blk in enumerate(level.resnets):
            h = ref_resblock(blk, torch.cat([h, hs.pop()], dim=1), temb)
            if len(level.attentions):
                h = ref_attn(level.attentions[j], h)
        if level.upsample is not None:
            h = ref_conv(level.upsample.conv, h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert not hs
    return ref_conv(net.conv_out, ref_gn_swish(net.conv_norm_out, h))


# ----------------------------------------------------------------------------- the checks
def test_reference_output_is_not_trivial(small_unet):
    x, t = _inputs(3)
    with torch.no_grad():
        ref = ref_unet(small_unet, x, t)
    assert ref.abs().max() > 0.05  # the comparisons below are not between two near-zero tensors


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_unet_matches_reference_in_every_mode_and_layout(small_unet, mode, layout):
    x, t = _inputs(3)
    with torch.no_grad():
        ref = ref_unet(small_unet, x, t)
    xin = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.clone()
    before = xin.clone()
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with ctx():
        out = small_unet(xin, t)
    torch.testing.assert_close(out.detach(), ref, atol=ATOL, rtol=RTOL)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)  # the output comes back in the input's layout
    torch.testing.assert_close(xin, before, atol=0, rtol=0)  # the in-place ops never touch the input


def test_channels_last_model_weights_give_the_same_numbers(small_unet):
    x, t = _inputs(2)
    cl = UNet(config=small_unet.config)
    cl.load_state_dict(small_unet.state_dict())
    cl = cl.to(memory_format=torch.channels_last).eval()
    with torch.inference_mode():
        torch.testing.assert_close(cl(x, t), small_unet(x, t), atol=ATOL, rtol=RTOL)


def test_batch_of_one_equals_its_row_in_a_batch_of_three(small_unet):
    x, t = _inputs(3)
    with torch.inference_mode():
        full = small_unet(x, t)
        rows = torch.cat([small_unet(x[i : i + 1], t[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(rows, full, atol=ATOL, rtol=RTOL)


def test_gradients_through_the_in_place_adds_equal_the_reference(small_unet):
    """The in-place adds keep autograd exact: every parameter's gradient of a loss matches the
    gradient through the out-of-place reference composition."""
    x, t = _inputs(2)
    target = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    net = small_unet.train()
    try:
        net.zero_grad(set_to_none=True)
        F.mse_loss(net(x, t), target).backward()
        fast = {n: p.grad.clone() for n, p in net.named_parameters()}
        net.zero_grad(set_to_none=True)
        F.mse_loss(ref_unet(net, x, t), target).backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(fast[name], p.grad, atol=ATOL, rtol=1e-4, msg=name)
    finally:
        net.zero_grad(set_to_none=True)
        net.eval()


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


def _grads(out: torch.Tensor, target: torch.Tensor, params) -> list[torch.Tensor]:
    return list(torch.autograd.grad(F.mse_loss(out, target), params))


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
