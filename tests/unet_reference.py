"""The U-Net written out plainly (F.conv2d, explicit softmax): the reference its speed paths must equal."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddpmkit.nn import UNet
from ddpmkit.nn.layers import AttnBlock, ResBlock

ATOL = 1e-4  # the U-Net parity tolerance (tests/nn/test_unet.py, tests/interop/test_diffusers.py)


RTOL = 0.0


def _randomise_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of order 0.1 everywhere: the authors' near-zero init of the output convs would make
    any two paths agree trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(p[0].numel(), 1))) + 0.02)
    return module


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


def _grads(out: torch.Tensor, target: torch.Tensor, params) -> list[torch.Tensor]:
    return list(torch.autograd.grad(F.mse_loss(out, target), params))
