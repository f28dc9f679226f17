"""The paper's U-Net (ddpmkit.nn): sizes, layers against explicit formulas, init, config checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from stand_ins import randomize_
from unet_reference import ATOL, RTOL, _randomise_, ref_unet

from ddpmkit.nn import UNET_PRESETS, UNet, UNetConfig
from ddpmkit.nn.layers import AttnBlock, Downsample, ResBlock, Upsample, timestep_embedding

TINY = UNetConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "expected"),
    [("cifar10", 35_746_307), ("celebahq256", 113_673_219), ("lsun256", 113_673_219)],
)
def test_preset_parameter_counts_equal_the_papers(name, expected):
    with torch.device("meta"):  # sizes only, no memory
        unet = UNet.from_preset(name)
    assert n_params(unet) == expected


def test_digits_preset_is_small_and_fits_8x8_grayscale():
    unet = UNet.from_preset("digits")
    assert 1_000_000 <= n_params(unet) <= 3_000_000
    cfg = UNET_PRESETS["digits"]
    assert (cfg.resolution, cfg.in_channels, cfg.out_channels) == (8, 1, 1)
    y = unet(torch.randn(5, 1, 8, 8), torch.randint(0, 1000, (5,)))
    assert y.shape == (5, 1, 8, 8)


def test_presets_follow_the_authors_runs():
    c = UNET_PRESETS["cifar10"]
    assert (c.ch, c.ch_mult, c.num_res_blocks, c.attn_resolutions, c.dropout) == (
        128,
        (1, 2, 2, 2),
        2,
        (16,),
        0.1,
    )
    for name in ("celebahq256", "lsun256"):
        c = UNET_PRESETS[name]
        assert (c.resolution, c.ch_mult, c.attn_resolutions, c.dropout) == (
            256,
            (1, 1, 2, 2, 4, 4),
            (16,),
            0.0,
        )


def test_learned_variance_doubles_the_output_channels():
    unet = UNet(config=TINY.replace(learned_variance=True))
    assert unet(torch.randn(2, 3, 16, 16), torch.tensor([3, 7])).shape == (2, 6, 16, 16)
    assert unet.conv_out.out_channels == 6


def test_timestep_embedding_is_the_papers_sinusoid():
    t = torch.tensor([0, 1, 17, 999])
    dim = 128
    emb = timestep_embedding(t, dim)
    half = dim // 2
    expected = torch.tensor(
        [
            [math.sin(s * math.exp(-math.log(10000) * k / (half - 1))) for k in range(half)]
            + [math.cos(s * math.exp(-math.log(10000) * k / (half - 1))) for k in range(half)]
            for s in t.tolist()
        ]
    )
    torch.testing.assert_close(emb, expected.float(), rtol=0, atol=2e-4)  # float32 args up to 999 rad
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=1)
    torch.testing.assert_close(emb, ref, rtol=0, atol=1e-6)


def test_downsample_is_tf_same_padding():
    torch.manual_seed(0)
    down = Downsample(4)
    randomize_(down)
    x = torch.randn(2, 4, 8, 8)
    y = down(x)
    assert y.shape == (2, 4, 4, 4)
    w, b = down.conv.weight, down.conv.bias
    # TF "SAME", stride 2, kernel 3, even size: no padding top/left, one zero row/column bottom/right.
    for i in range(4):
        for j in range(4):
            window = torch.zeros(2, 4, 3, 3)
            patch = x[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
            window[:, :, : patch.shape[2], : patch.shape[3]] = patch
            expected = torch.einsum("bchw,ochw->bo", window, w) + b
            torch.testing.assert_close(y[:, :, i, j], expected, rtol=1e-5, atol=1e-5)


def test_upsample_is_nearest_then_conv():
    up = Upsample(4)
    randomize_(up)
    x = torch.randn(2, 4, 3, 5)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (2, 4, 6, 10)
    expected = F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1)
    torch.testing.assert_close(up(x), expected, rtol=1e-5, atol=1e-6)


def _group_norm_ref(x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    B, C = x.shape[:2]
    g = x.reshape(B, 32, -1)  # (B, G, C/G * H * W)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)
    return g.reshape_as(x) * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]


def test_attention_block_is_single_head_softmax_attention_with_scale_c_minus_half():
    attn = AttnBlock(64)
    randomize_(attn)
    x = torch.randn(2, 64, 4, 6)
    h = _group_norm_ref(x, attn.group_norm).flatten(2)  # (B, C, HW)

    def proj(layer, v):  # a 1x1 "nin" layer on (B, C, HW)
        return torch.einsum("oc,bcn->bon", layer.weight, v) + layer.bias[None, :, None]

    q, k, v = proj(attn.to_q, h), proj(attn.to_k, h), proj(attn.to_v, h)
    w = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) * 64**-0.5, dim=-1)  # (B, HW, HW)
    out = proj(attn.to_out, torch.einsum("bnm,bcm->bcn", w, v))
    torch.testing.assert_close(attn(x), x + out.reshape_as(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("in_ch", "out_ch"), [(32, 32), (32, 64)])
def test_resblock_matches_the_papers_equations(in_ch, out_ch):
    block = ResBlock(in_ch=in_ch, out_ch=out_ch, temb_ch=16, dropout=0.0)
    randomize_(block)
    x, temb = torch.randn(2, in_ch, 5, 5), torch.randn(2, 16)
    h = F.conv2d(F.silu(_group_norm_ref(x, block.norm1)), block.conv1.weight, block.conv1.bias, padding=1)
    h = h + (F.silu(temb) @ block.time_emb_proj.weight.T + block.time_emb_proj.bias)[:, :, None, None]
    h = F.conv2d(F.silu(_group_norm_ref(h, block.norm2)), block.conv2.weight, block.conv2.bias, padding=1)
    skip = x if in_ch == out_ch else F.conv2d(x, block.conv_shortcut.weight, block.conv_shortcut.bias)
    assert (block.conv_shortcut is None) == (in_ch == out_ch)
    torch.testing.assert_close(block(x, temb), skip + h, rtol=1e-4, atol=1e-5)


def _fan_avg_limit(weight: torch.Tensor) -> float:
    receptive = weight[0, 0].numel() if weight.ndim == 4 else 1
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    return math.sqrt(3.0 / ((fan_in + fan_out) / 2))  # TF variance_scaling(1, fan_avg, uniform)


def test_init_is_variance_scaling_fan_avg_uniform_with_near_zero_last_layers():
    torch.manual_seed(0)
    unet = UNet(
        config=UNetConfig(resolution=16, ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
    )
    near_zero = {"conv2", "to_out", "conv_out"}
    checked = {"near_zero": 0, "normal": 0}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        w = module.weight.detach()
        scale = 1e-10 if name.rsplit(".", 1)[-1] in near_zero else 1.0
        limit = _fan_avg_limit(w) * math.sqrt(scale)
        assert float(w.abs().max()) <= limit * (1 + 1e-6), name
        assert float(w.std()) == pytest.approx(limit / math.sqrt(3), rel=0.15), name  # U(-a, a): std a/sqrt 3
        assert float(module.bias.detach().abs().max()) == 0.0, name
        checked["near_zero" if scale < 1 else "normal"] += 1
    # conv2 of 8 ResBlocks (2 down, 2 mid, 4 up), to_out of 4 AttnBlocks (1 down, 1 mid, 2 up), conv_out
    assert checked["near_zero"] == 8 + 4 + 1
    assert checked["normal"] > 20
    y = unet(torch.randn(2, 3, 16, 16), torch.tensor([1, 500]))
    assert float(y.detach().abs().max()) < 1e-3  # the output conv starts near zero


def test_every_parameter_gets_a_gradient():
    unet = UNet(config=TINY.replace(dropout=0.1))
    randomize_(unet)
    unet(torch.randn(2, 3, 16, 16), torch.tensor([0, 999])).square().mean().backward()
    missing = [n for n, p in unet.named_parameters() if p.grad is None]
    assert not missing  # DDP and the optimisers need every parameter in the graph
    # The key bias's gradient is zero analytically (softmax is shift-invariant in each query's
    # logits); the folded attention gives it exactly; every other parameter's is non-zero.
    zero = [n for n, p in unet.named_parameters() if not bool(p.grad.abs().sum() > 0)]
    assert zero and all(n.endswith("to_k.bias") for n in zero), zero


def test_channels_last_gives_the_same_output():
    unet = UNet(config=TINY).eval()
    randomize_(unet)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 10, 999])
    with torch.no_grad():
        ref = unet(x, t)
        unet_cl = unet.to(memory_format=torch.channels_last)
        out = unet_cl(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)  # no layout round trips inside


def test_output_depends_on_t_and_batch_items_are_independent():
    unet = UNet(config=TINY).eval()
    randomize_(unet)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 6, 700])
    with torch.no_grad():
        full = unet(x, t)
        singles = torch.cat([unet(x[i : i + 1], t[i : i + 1]) for i in range(3)])
        other_t = unet(x, torch.tensor([900, 300, 2]))
    torch.testing.assert_close(full, singles, rtol=1e-4, atol=1e-5)
    assert float((full - other_t).abs().max()) > 0.1


def test_other_image_sizes_divisible_by_the_downsampling_work():
    unet = UNet(config=TINY).eval()
    assert unet(torch.randn(1, 3, 8, 24), torch.tensor([3])).shape == (1, 3, 8, 24)


@pytest.mark.parametrize(
    ("x_shape", "t", "match"),
    [
        ((2, 1, 16, 16), torch.tensor([1, 2]), r"\(B, 3, H, W\)"),
        ((2, 3, 15, 16), torch.tensor([1, 2]), "divisible by 2"),
        ((2, 3, 16, 16), torch.tensor([1, 2, 3]), r"t must have shape \(2,\)"),
    ],
)
def test_bad_inputs_are_refused(x_shape, t, match):
    with pytest.raises(ValueError, match=match):
        UNet(config=TINY)(torch.randn(x_shape), t)


def test_config_round_trips_through_a_dict_and_is_frozen():
    cfg = UNET_PRESETS["cifar10"]
    d = cfg.to_dict()
    assert d["ch_mult"] == [1, 2, 2, 2]
    assert UNetConfig.from_dict(d) == cfg
    with pytest.raises(AttributeError):
        cfg.ch = 64  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"attn_resolutions": (12,)}, "attn_resolutions"),
        ({"ch": 48}, "multiple of 32"),
        ({"resolution": 20}, "divisible"),
        ({"dropout": 1.5}, "dropout"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"learned_variance": "yes"}, "learned_variance"),
    ],
)
def test_bad_configs_raise_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNET_PRESETS["cifar10"].replace(**overrides)


def test_from_preset_with_overrides_and_unknown_names():
    unet = UNet.from_preset("cifar10", ch=32, dropout=0.0)
    assert unet.config == UNET_PRESETS["cifar10"].replace(ch=32, dropout=0.0)
    with pytest.raises(ValueError, match="unknown U-Net preset 'mnist'"):
        UNet.from_preset("mnist")
    with pytest.raises(ValueError, match="unknown U-Net config field"):
        UNet.from_preset("cifar10", channels=3)
    with pytest.raises(ValueError, match="unknown U-Net config field"):
        UNetConfig.from_dict({"resolution": 32, "heads": 4})


def test_the_network_never_imports_the_math():
    import ast
    from pathlib import Path

    import ddpmkit.nn

    math_modules = {"diffusion", "schedules", "distributions", "respace", "sampling", "chains"}
    for path in Path(ddpmkit.nn.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                assert not (parts[0] == "ddpmkit" and len(parts) > 1 and parts[1] in math_modules), (
                    path,
                    name,
                )


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
