"""The layers of the paper's U-Net (App. B; the authors' ``diffusion_tf/models/unet.py``).

Module and parameter names follow the diffusers ``UNet2DModel`` layout that the released weights
use (``norm1``, ``conv1``, ``time_emb_proj``, ``to_q``, ...), so that weights move between the two
with a three-line key map (``ddpmkit.interop.diffusers``). Images are (B, C, H, W); every layer
works on channels_last tensors without copies.

Initialisation is the authors': variance scaling, fan_avg, uniform (= Xavier-uniform, gain 1) for
every conv and dense layer, zero biases, and scale 1e-10 (gain 1e-5) for the last conv of each
residual block, the attention output projection and the output conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GROUPNORM_EPS",
    "GROUPNORM_GROUPS",
    "NEAR_ZERO_INIT_SCALE",
    "AttnBlock",
    "Downsample",
    "Dropout",
    "ResBlock",
    "TimeEmbedding",
    "Upsample",
    "group_norm",
    "timestep_embedding",
    "variance_scaling_init_",
]

GROUPNORM_GROUPS = 32
GROUPNORM_EPS = 1e-6
# The authors' ``init_scale=0.`` becomes variance scaling with scale 1e-10 (nn.default_init).
NEAR_ZERO_INIT_SCALE = 1e-10


def variance_scaling_init_(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> None:
    """TF ``variance_scaling(scale, mode="fan_avg", distribution="uniform")`` on the weight,
    zeros on the bias: U(-a, a) with a = sqrt(3 * scale / ((fan_in + fan_out) / 2))."""
    nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps 1e-6), the normalisation of every block (App. B)."""
    return nn.GroupNorm(GROUPNORM_GROUPS, channels, eps=GROUPNORM_EPS)


def conv3x3(in_ch: int, out_ch: int, *, stride: int = 1, padding: int = 1, scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=padding)
    variance_scaling_init_(conv, scale)
    return conv


def linear(in_features: int, out_features: int, *, scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    variance_scaling_init_(layer, scale)
    return layer


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The Transformer sinusoidal embedding of the timestep (App. B; ``get_timestep_embedding``).

    Frequencies exp(-log(10000) * k / (half - 1)), k = 0..half-1; output [sin, cos].
    t: (B,) int64 (or float) timesteps -> (B, dim) float32.
    """
    if dim % 2 != 0 or dim < 4:
        raise ValueError(f"timestep embedding width must be even and >= 4, got {dim}")
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - 1))  # (half,)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, dim)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of width ``ch`` -> Dense(4ch) -> swish -> Dense(4ch).

    t: (B,) int64 -> temb: (B, 4ch).
    """

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.ch = ch
        self.linear_1 = linear(ch, 4 * ch)
        self.linear_2 = linear(4 * ch, 4 * ch)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.ch).to(self.linear_1.weight.dtype)  # (B, ch)
        return self.linear_2(F.silu(self.linear_1(emb)))  # (B, 4ch)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose keep mask on the CPU in float32 is drawn as U(0, 1) >= p, the same
    Bernoulli(1 - p) mask in about half the CPU time of ``bernoulli_`` (benchmarks/NOTES.md).

    x: any shape -> the same shape; the identity in eval mode.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.inplace:
            return super().forward(x)  # CUDA's fused dropout kernel is the faster one there
        keep = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # 0 or 1/(1-p)
        return x * keep


class ResBlock(nn.Module):
    """The residual block (App. B; ``resnet_block``):

    h = conv1(swish(norm1(x))) + Dense(swish(temb));  h = conv2(dropout(swish(norm2(h))))
    out = shortcut(x) + h, with a 1x1 ("nin") shortcut when the channel count changes.

    x: (B, in_ch, H, W), temb: (B, temb_ch) -> (B, out_ch, H, W).
    """

    def __init__(self, *, in_ch: int, out_ch: int, temb_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.time_emb_proj = linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = Dropout(dropout)
        self.conv2 = conv3x3(out_ch, out_ch, scale=NEAR_ZERO_INIT_SCALE)
        self.conv_shortcut: nn.Conv2d | None = None
        if in_ch != out_ch:
            self.conv_shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1)
            variance_scaling_init_(self.conv_shortcut)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # Speed (benchmarks/NOTES.md): the adds go in place into the conv outputs, which no backward
        # needs; without autograd the swish also overwrites the GroupNorm output in place.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))  # (B, out_ch, H, W)
        h += self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, out_ch, 1, 1) broadcast
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h.add_(x)  # x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (App. B; ``attn_block``):

    h = norm(x); q, k, v = 1x1 projections of h; w = softmax(q k^T * C^-1/2); out = x + proj_out(w v).

    The 1x1 projections are ``nn.Linear`` over the channel axis (the same weights as 1x1 convs,
    shape (C, C)); the attention itself is ``scaled_dot_product_attention``, whose default scale
    1/sqrt(head_dim) is C^-1/2 for one head.

    Computed with two projections instead of four (speed, benchmarks/NOTES.md), the same function
    up to float rounding:
    - logits: q_i . k_j = h_i^T (W_q^T W_k) h_j + (W_k^T b_q) . h_j + (terms constant in j, which
      the softmax cancels), so the queries become h (W_k^T W_q)^T + W_k^T b_q and the keys h itself;
    - values: proj_out(w v) = w h (W_o W_v)^T + (W_o b_v + b_o), since each row of w sums to one.
    The folded (C, C) products cost C^3 each, less than one projection of B*H*W >= C positions.

    x: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.group_norm = group_norm(channels)
        self.to_q = linear(channels, channels)
        self.to_k = linear(channels, channels)
        self.to_v = linear(channels, channels)
        self.to_out = linear(channels, channels, scale=NEAR_ZERO_INIT_SCALE)

    def folded_projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query weight W_k^T W_q, query bias W_k^T b_q, value weight W_o W_v, output bias
        W_o b_v + b_o): (C, C), (C,), (C, C), (C,), in the weights' dtype even under autocast.

        b_k drops out (the softmax cancels it; its gradient is zero in the unfolded form too). It
        stays in the graph with a zero gradient so that DDP and the optimisers see every parameter."""
        wq, wk, wv, wo = self.to_q.weight, self.to_k.weight, self.to_v.weight, self.to_out.weight
        with torch.autocast(wq.device.type, enabled=False):
            return (
                wk.t() @ wq,
                torch.addmv(self.to_k.bias * 0.0, wk.t(), self.to_q.bias),
                wo @ wv,
                torch.addmv(self.to_out.bias, wo, self.to_v.bias),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C); a view for channels_last
        w_query, b_query, w_value, b_out = self.folded_projections()
        q = F.linear(h, w_query, b_query)  # (B, HW, C); the keys are h
        v = F.linear(h, w_value)  # (B, HW, C), already through proj_out's weight
        h = F.scaled_dot_product_attention(q[:, None], h[:, None], v[:, None])[:, 0]  # (B, HW, C)
        # x + h + b_out into a fresh tensor: the attention's backward keeps its output, and an
        # in-place add on the reshaped view would hand x an NCHW gradient (slow convs after it).
        out = x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return out.add_(b_out.to(out.dtype)[:, None, None])


class Downsample(nn.Module):
    """Stride-2 3x3 conv with TF "SAME" padding: pad one zero row/column at the bottom/right.

    x: (B, C, H, W) -> (B, C, H/2, W/2).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad (left, right, top, bottom)


def _fold_nearest_2x(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The 3 taps (w0, w1, w2) of a 3x3 kernel along ``dim``, seen from the half-resolution grid
    after a nearest 2x upsampling, as the 4 taps of a stride-2 transposed conv (padding 1):
    (w2, w1 + w2, w0 + w1, w0). Even outputs 2i read inputs i-1 and i with (w0, w1 + w2); odd
    outputs 2i+1 read inputs i and i+1 with (w0 + w1, w2)."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv.

    Computed without materialising the upsampled image (speed, benchmarks/NOTES.md): a nearest 2x
    upsampling repeats each pixel, so each output pixel sees only 2x2 low-resolution pixels, with
    the 3x3 kernel's taps summed where they land on the same pixel (``_fold_nearest_2x``). That is a
    stride-2 transposed conv with a 4x4 kernel: 16 instead of 36 multiply-adds per output pixel and
    channel pair, the same function up to float rounding.

    x: (B, C, H, W) -> (B, C, 2H, 2W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def transposed_kernel(self) -> torch.Tensor:
        """The 3x3 conv folded into the transposed conv's kernel: (C_in, C_out, 4, 4), channels_last."""
        folded = _fold_nearest_2x(_fold_nearest_2x(self.conv.weight, 2), 3)  # (C_out, C_in, 4, 4)
        return folded.transpose(0, 1).contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.transposed_kernel(), self.conv.bias, stride=2, padding=1)
