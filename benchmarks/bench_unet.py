"""The paper's CIFAR-10 U-Net, side by side: ddpmkit, HF diffusers and denoising-diffusion-pytorch.

One run on one machine measures, interleaved (round-robin over the systems in every repetition)
and as medians of warmed-up repetitions:

- training images/s: forward + L_simple (MSE on eps, eq. 14) + backward + Adam step, batch 16, 128;
- sampling-step images/s: one no-grad forward, batch 16 and 256;
- the wall time of a full sample of 16 images: DDIM with 50 steps (measured end to end with each
  library's own sampler) and Algorithm 2 with 1000 steps (on the CPU extrapolated from the
  measured DDIM-50 per-step time unless ``--full-ddpm``; the table says which);
- peak memory (CPU: the peak RSS (VmHWM) of a fresh subprocess above its post-import RSS; CUDA:
  ``torch.cuda.max_memory_allocated``);
- the machine's limit in the same run: fp32 GEMM (2048^3) and 3x3 conv GFLOP/s (channels_last, the
  U-Net's shapes), and each system's achieved fraction of the conv ceiling, with FLOPs counted by
  ``torch.utils.flop_counter.FlopCounterMode``.

The systems:
- ddpmkit: ``UNet.from_preset("cifar10")`` (35,746,307 parameters);
- diffusers: ``UNet2DModel`` with google/ddpm-cifar10-32's released config (35,746,307 parameters);
- ddpd: lucidrains' ``Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=True)``, its README setting
  (35,711,491 parameters; a different architecture, see ``DDPD_ARCHITECTURE``).
All three train with the paper's CIFAR-10 dropout 0.1 (``--dropout``), so the training steps do the
same work; sampling runs in eval mode.

    python benchmarks/bench_unet.py                     # CPU, 2 threads, writes benchmarks/RESULTS.md
    python benchmarks/bench_unet.py --device cuda       # bf16 autocast, channels_last, torch.compile,
                                                        # CUDA graphs for sampling
    python benchmarks/bench_unet.py --quick             # a smoke run with tiny counts (no file written)

Needs ``pip install diffusers`` and ``pip install denoising-diffusion-pytorch --no-deps einops
ema-pytorch accelerate`` (ddpd imports torchvision at module level for its Trainer only; when
torchvision is absent a stand-in module is inserted while ddpd is imported and removed after).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' samplers draw progress bars

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

SYSTEMS = ("ddpmkit", "diffusers", "ddpd")
RESOLUTION, CHANNELS, T = 32, 3, 1000
DIFFUSERS_CIFAR10_CONFIG = {  # google/ddpm-cifar10-32 unet/config.json (reference/released_models.md)
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "mid_block_scale_factor": 1,
    "add_attention": True,
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "attn_norm_num_groups": None,
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "resnet_time_scale_shift": "default",
    "center_input_sample": False,
    "dropout": 0.0,
}
DDPD_KWARGS = {"dim": 64, "dim_mults": (1, 2, 4, 8), "flash_attn": True}
DDPD_ARCHITECTURE = (
    "lucidrains `Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=True)` (its README setting): 7x7 input "
    "conv, 4 levels of 64/128/256/512 channels at 32/16/8/4 px, 2 ResNet blocks per level (RMSNorm, "
    "time as scale-shift), linear attention (4 heads x 32) at the first three levels, full 4-head "
    "attention at the innermost level and in the middle, pixel-unshuffle + 1x1 conv downsampling, "
    "a final ResNet block on concat(h, input features) and a 1x1 output conv"
)


# ------------------------------------------------------------------------------------- the systems
def _import_ddpd():
    """denoising_diffusion_pytorch's module, imported without torchvision if that is absent (only
    its Dataset/Trainer use torchvision; the Unet and GaussianDiffusion do not)."""
    try:
        import torchvision  # noqa: F401

        stand_in = False
    except ImportError:
        stand_in = True
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.utils = types.ModuleType("torchvision.utils")
        sys.modules.update(
            {"torchvision": tv, "torchvision.transforms": tv.transforms, "torchvision.utils": tv.utils}
        )
    try:
        import denoising_diffusion_pytorch.denoising_diffusion_pytorch as ddpd
    finally:
        if stand_in:
            for name in ("torchvision", "torchvision.transforms", "torchvision.utils"):
                sys.modules.pop(name, None)
    return ddpd


class EpsModel(nn.Module):
    """Every system as ``model(x_t, t) -> eps`` (B, 3, 32, 32), so the timing loops are shared."""

    def __init__(self, name: str, net: nn.Module) -> None:
        super().__init__()
        self.name, self.net = name, net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(x, t)
        return out.sample if self.name == "diffusers" else out


def build_system(name: str, *, dropout: float = 0.1) -> EpsModel:
    """The system's U-Net with the paper's CIFAR-10 training dropout (0.1) for all three, so that the
    training steps do the same work (the released diffusers config says 0.0: it is for inference)."""
    if name == "ddpmkit":
        from ddpmkit.nn import UNet

        net = UNet.from_preset("cifar10", dropout=dropout)
    elif name == "diffusers":
        from diffusers import UNet2DModel

        net = UNet2DModel(**{**DIFFUSERS_CIFAR10_CONFIG, "dropout": dropout})
    elif name == "ddpd":
        net = _import_ddpd().Unet(**DDPD_KWARGS, dropout=dropout)
    else:
        raise ValueError(f"unknown system {name!r}; expected one of {list(SYSTEMS)}")
    return EpsModel(name, net)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "ddpmkit", "diffusers", "denoising-diffusion-pytorch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        info = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        model = f"{info.get('Model name', model)}, {info.get('CPU(s)', '?')} CPUs"
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}; torch threads {torch.get_num_threads()}"


# ------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Options:
    device: torch.device
    channels_last: bool
    bf16: bool
    compile: bool
    cuda_graphs: bool
    reps: int
    big_reps: int
    sample_reps: int


def _inputs(batch: int, opts: Options, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, CHANNELS, RESOLUTION, RESOLUTION, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, T, (batch,), generator=g)
    fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
    return (
        x0.to(opts.device).contiguous(memory_format=fmt),
        eps.to(opts.device).contiguous(memory_format=fmt),
        t.to(opts.device),
    )


@dataclass
class Bench:
    """One system under test: the model and the callables / state the timing loops use."""

    name: str
    model: EpsModel
    opt: torch.optim.Optimizer | None = None
    train_fn: Callable[..., torch.Tensor] | None = None
    sample_fn: Callable[..., torch.Tensor] | None = None
    flops: tuple[float, float] = (0.0, 0.0)  # executed, per image: forward, forward + backward
    arch_flops: tuple[float, float] = (0.0, 0.0)  # the architecture's as written (see architecture_flops)


def make_train_step(b: Bench, batch: int, opts: Options) -> Callable[[], None]:
    """One step of Algorithm 1: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, L_simple, backward, Adam."""
    x0, eps, t = _inputs(batch, opts)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).float().to(opts.device)
    a = abar[t][:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # eq. (4)
    opt, fn = b.opt, b.train_fn
    assert opt is not None and fn is not None, "prepare_training first"

    def step() -> None:
        with torch.autocast(opts.device.type, dtype=torch.bfloat16, enabled=opts.bf16):
            loss = F.mse_loss(fn(x_t, t).float(), eps)  # eq. (14)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def prepare_training(b: Bench, opts: Options) -> None:
    b.model.train()
    # The paper's lr; fused Adam (CPU and CUDA) for every system, as ddpmkit's trainer uses.
    b.opt = torch.optim.Adam(b.model.parameters(), lr=2e-4, fused=True)
    b.train_fn = torch.compile(b.model) if opts.compile else b.model


def make_forward(b: Bench, batch: int, opts: Options) -> Callable[[], None]:
    x, _, t = _inputs(batch, opts, seed=1)
    fn = b.sample_fn
    assert fn is not None, "prepare_sampling first"

    def forward() -> None:
        with torch.inference_mode():
            fn(x, t)

    return forward


def prepare_sampling(b: Bench, opts: Options) -> None:
    """The sampling-step callable: eval mode; on CUDA through ddpmkit's ``prepare_model`` (channels_last,
    bf16 autocast, torch.compile, CUDA graphs), the same wrapper for every system."""
    b.model.eval()
    if opts.device.type == "cuda":
        from ddpmkit.accel import prepare_model

        b.sample_fn = prepare_model(
            b.model,
            device=opts.device,
            channels_last=opts.channels_last,
            compile=opts.compile,
            bf16=opts.bf16,
            cuda_graphs=opts.cuda_graphs,
        )
    else:
        b.sample_fn = b.model


CPU_TIMES: dict[str, list[float]] = {}  # the process CPU seconds of the last round_robin's calls


def round_robin(
    fns: dict[str, Callable[[], None]], reps: int, device: torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall seconds per call of each fn: ``warmup`` untimed calls each, then ``reps`` rounds, every
    round calling each system once in turn (so a disturbance of the machine hits all systems alike).
    The process CPU seconds of the same calls go to ``CPU_TIMES`` (robust to other processes' load
    when one thread runs; with more threads, waiting threads may spin and count)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    CPU_TIMES.clear()
    CPU_TIMES.update({k: [] for k in fns})
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            CPU_TIMES[name].append(time.process_time() - c0)
    return times


# ------------------------------------------------------------------------------------- the machine's limit
def ceiling_fns(opts: Options) -> dict[str, tuple[Callable[[], None], float]]:
    """fp32 GEMM 2048^3 and 3x3 convs (channels_last) at the U-Net's two largest shapes: fn, FLOPs."""
    dev, dtype = opts.device, torch.bfloat16 if opts.bf16 else torch.float32
    a = torch.randn(2048, 2048, device=dev, dtype=dtype)
    b = torch.randn(2048, 2048, device=dev, dtype=dtype)
    kind = "bf16" if opts.bf16 else "fp32"
    out: dict[str, tuple[Callable[[], None], float]] = {
        f"{kind} GEMM 2048^3": (lambda: torch.mm(a, b), 2 * 2048**3)
    }
    for cin, hw, batch in ((128, 32, 16), (256, 16, 16)):
        x = torch.randn(batch, cin, hw, hw, device=dev, dtype=dtype).contiguous(
            memory_format=torch.channels_last
        )
        w = torch.randn(cin, cin, 3, 3, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        flops = 2 * batch * cin * cin * 9 * hw * hw

        def conv(x=x, w=w) -> None:
            with torch.no_grad():
                F.conv2d(x, w, padding=1)

        out[f"{kind} conv3x3 {cin}->{cin} {hw}x{hw} b{batch} channels_last"] = (conv, flops)
    return out


def architecture_flops(b: Bench, opts: Options, dropout: float) -> tuple[float, float]:
    """FLOPs per image of the architecture as written (App. B: nearest upsampling then a 3x3 conv,
    four attention projections), the base of the ceiling fractions. ddpmkit computes the same
    function with fewer FLOPs (phase convs, folded projections), so its architecture is counted on
    diffusers' ``UNet2DModel`` with the same config; the other systems execute what they describe."""
    if b.name != "ddpmkit":
        return b.flops
    reference = build_system("diffusers", dropout=dropout).to(opts.device)
    return count_flops(reference, opts, train=False), count_flops(reference, opts, train=True)


def count_flops(model: EpsModel, opts: Options, *, train: bool, batch: int = 2) -> float:
    """FLOPs per image of one forward (no grad) or one forward + backward, by FlopCounterMode."""
    x, _, t = _inputs(batch, opts, seed=2)
    was_training = model.training
    model.train(train)
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            model(x, t).float().square().mean().backward()
        else:
            with torch.no_grad():
                model(x, t)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return counter.get_total_flops() / batch


# ------------------------------------------------------------------------------------- full samples
def full_sampler(b: Bench, opts: Options, *, batch: int, steps: int) -> Callable[[], None]:
    """Each library's own sampler: DDIM (eta 0) when steps < 1000, Algorithm 2 when steps == 1000."""
    dev, name, model = opts.device, b.name, b.model
    if name == "ddpmkit":
        from ddpmkit.diffusion import DiffusionConfig
        from ddpmkit.sampling import sample_ancestral, sample_ddim

        diffusion = DiffusionConfig().build()
        fn = b.sample_fn
        shape = (batch, CHANNELS, RESOLUTION, RESOLUTION)
        if steps == T:
            return lambda: sample_ancestral(
                fn, diffusion, shape, generator=torch.Generator().manual_seed(0), device=dev
            )
        return lambda: sample_ddim(
            fn, diffusion, shape, timesteps=steps, generator=torch.Generator().manual_seed(0), device=dev
        )
    if name == "diffusers":
        from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

        sched_kw = {
            "num_train_timesteps": T,
            "beta_start": 1e-4,
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "clip_sample": True,
        }
        if steps == T:
            pipe = DDPMPipeline(
                unet=model.net, scheduler=DDPMScheduler(variance_type="fixed_large", **sched_kw)
            )
        else:
            pipe = DDIMPipeline(unet=model.net, scheduler=DDPMScheduler(**sched_kw))
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def run() -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=opts.bf16):
                kw = {} if steps == T else {"eta": 0.0}
                pipe(
                    batch_size=batch,
                    num_inference_steps=steps,
                    output_type="np",
                    generator=torch.Generator(dev).manual_seed(0),
                    **kw,
                )

        return run
    if name == "ddpd":
        ddpd = _import_ddpd()
        diffusion = ddpd.GaussianDiffusion(
            model.net,
            image_size=RESOLUTION,
            timesteps=T,
            sampling_timesteps=steps,
            objective="pred_noise",
            beta_schedule="linear",
        ).to(dev)
        diffusion.eval()

        def run() -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=opts.bf16):
                diffusion.sample(batch_size=batch)

        return run
    raise ValueError(f"unknown system {name!r}")


# ------------------------------------------------------------------------------------- peak memory
def _proc_status_mib(key: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, MiB. Unlike getrusage's
    ru_maxrss, which a child inherits from its parent across fork + exec, VmHWM starts afresh
    with the new program."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def memory_child(name: str, mode: str, batch: int, dropout: float) -> None:
    """(subprocess) peak RSS above the post-import RSS for one training step or one forward."""
    opts = Options(torch.device("cpu"), False, False, False, False, 1, 1, 1)
    gc.collect()
    base = _proc_status_mib("VmRSS")
    b = Bench(name, build_system(name, dropout=dropout))
    if mode == "train":
        prepare_training(b, opts)
        make_train_step(b, batch, opts)()
    else:
        prepare_sampling(b, opts)
        make_forward(b, batch, opts)()
    print(json.dumps({"peak_mib": _proc_status_mib("VmHWM") - base}))


def peak_memory_cpu(name: str, mode: str, batch: int, args: argparse.Namespace) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--_memory",
        name,
        mode,
        str(batch),
        "--threads",
        str(args.threads),
        "--dropout",
        str(args.dropout),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def peak_memory_cuda(fn: Callable[[], None], device: torch.device) -> float:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ------------------------------------------------------------------------------------- the run
@dataclass
class Results:
    meta: dict[str, str] = field(default_factory=dict)
    cells: dict[str, dict[str, str]] = field(default_factory=dict)  # row -> system -> text
    ceilings: dict[str, float] = field(default_factory=dict)  # name -> GFLOP/s
    notes: list[str] = field(default_factory=list)

    def put(self, row: str, system: str, text: str) -> None:
        self.cells.setdefault(row, {})[system] = text


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _spread(xs: list[float]) -> str:
    return f"{min(xs):.3g}-{max(xs):.3g} s" if len(xs) > 1 else f"{xs[0]:.3g} s"


def measure_all(args: argparse.Namespace, opts: Options, res: Results) -> None:
    dev = opts.device
    benches = {name: Bench(name, build_system(name, dropout=args.dropout).to(dev)) for name in args.systems}
    for b in benches.values():
        if opts.channels_last:
            b.model.to(memory_format=torch.channels_last)
        res.put("parameters", b.name, f"{sum(p.numel() for p in b.model.parameters()):,}")
        b.flops = (count_flops(b.model, opts, train=False), count_flops(b.model, opts, train=True))
        b.arch_flops = architecture_flops(b, opts, args.dropout)
        executed = f"{b.flops[0] / 1e9:.2f}; {b.flops[1] / 1e9:.2f}"
        res.put("GFLOP / image executed: forward; fwd+bwd", b.name, executed)
        res.put(
            "GFLOP / image of the architecture: forward; fwd+bwd",
            b.name,
            f"{b.arch_flops[0] / 1e9:.2f}; {b.arch_flops[1] / 1e9:.2f}",
        )

    ceil = ceiling_fns(opts)
    times = round_robin({k: v[0] for k, v in ceil.items()}, max(opts.reps, 5), dev)
    for k, (_, flops) in ceil.items():
        res.ceilings[k] = flops / _median(times[k]) / 1e9
    conv_ceiling = max(v for k, v in res.ceilings.items() if " conv3x3 " in k)
    log(f"ceilings (GFLOP/s): {res.ceilings}")

    for b in benches.values():
        prepare_training(b, opts)
    for batch in args.train_batches:
        fns = {name: make_train_step(b, batch, opts) for name, b in benches.items()}
        times = round_robin(fns, opts.reps if batch <= 32 else opts.big_reps, dev)
        _put_rates(res, f"training img/s, batch {batch}", batch, times, benches, 1, conv_ceiling)
        del fns
    for b in benches.values():
        b.opt = b.train_fn = None  # free the Adam state
        b.model.zero_grad(set_to_none=True)
    gc.collect()

    for b in benches.values():
        prepare_sampling(b, opts)
    for batch in args.sample_batches:
        fns = {name: make_forward(b, batch, opts) for name, b in benches.items()}
        times = round_robin(fns, opts.reps if batch <= 32 else opts.big_reps, dev)
        _put_rates(
            res,
            f"sampling-step img/s (no-grad forward), batch {batch}",
            batch,
            times,
            benches,
            0,
            conv_ceiling,
        )

    measure_full_samples(args, opts, benches, res)
    measure_memory(args, opts, benches, res)
    add_ratios(args, res)


def _put_rates(
    res: Results,
    row: str,
    batch: int,
    times: dict[str, list[float]],
    benches: dict[str, Bench],
    which_flops: int,
    conv_ceiling: float,
) -> None:
    for name, ts in times.items():
        ips = batch / _median(ts)
        res.put(row, name, f"{ips:.2f}")
        res.put(
            f"{row}: fraction of conv ceiling",
            name,
            f"{ips * benches[name].arch_flops[which_flops] / 1e9 / conv_ceiling:.0%}",
        )
        res.put(f"{row}: min-max time per call", name, _spread(ts))
        if opts_device_is_cpu(benches):
            res.put(f"{row}: images per process-CPU-second", name, f"{batch / _median(CPU_TIMES[name]):.2f}")
    log(f"{row}: {res.cells[row]}")


def opts_device_is_cpu(benches: dict[str, Bench]) -> bool:
    return next(iter(benches.values())).model.parameters().__next__().device.type == "cpu"


def measure_full_samples(
    args: argparse.Namespace, opts: Options, benches: dict[str, Bench], res: Results
) -> None:
    dev, warmup = opts.device, 1 if opts.device.type == "cuda" else 0  # CPU: the models are warm already
    for batch in args.full_batches:
        fns = {name: full_sampler(b, opts, batch=batch, steps=args.ddim_steps) for name, b in benches.items()}
        times = round_robin(fns, opts.sample_reps, dev, warmup=warmup)
        row = f"full sample of {batch}: DDIM {args.ddim_steps} steps, wall s"
        for name, ts in times.items():
            res.put(row, name, f"{_median(ts):.1f}")
            if not args.full_ddpm:
                res.put(
                    f"full sample of {batch}: DDPM {T} steps, wall s (EXTRAPOLATED)",
                    name,
                    f"{_median(ts) / args.ddim_steps * T:.0f}",
                )
        log(f"{row}: {res.cells[row]}")
        if args.full_ddpm:
            fns = {name: full_sampler(b, opts, batch=batch, steps=T) for name, b in benches.items()}
            times = round_robin(fns, 1, dev, warmup=0)
            row = f"full sample of {batch}: DDPM {T} steps, wall s (measured once)"
            for name, ts in times.items():
                res.put(row, name, f"{ts[0]:.1f}")
            log(f"{row}: {res.cells[row]}")
    if not args.full_ddpm:
        res.notes.append(
            f"The DDPM {T}-step wall time is EXTRAPOLATED, not measured: {T} x (the measured DDIM-"
            f"{args.ddim_steps} wall time / {args.ddim_steps}), i.e. {T} x the per-step time of each "
            "library's own sampler including its update arithmetic (Algorithm 2's update differs from "
            "DDIM's only in a few elementwise ops). Measure it with --full-ddpm."
        )


def measure_memory(args: argparse.Namespace, opts: Options, benches: dict[str, Bench], res: Results) -> None:
    tb, sb = max(args.train_batches), max(args.sample_batches)
    for name, b in benches.items():
        if opts.device.type == "cuda":
            prepare_training(b, opts)
            train_peak = peak_memory_cuda(make_train_step(b, tb, opts), opts.device)
            b.opt = b.train_fn = None
            prepare_sampling(b, opts)
            sample_peak = peak_memory_cuda(make_forward(b, sb, opts), opts.device)
        else:
            train_peak = peak_memory_cpu(name, "train", tb, args)
            sample_peak = peak_memory_cpu(name, "sample", sb, args)
        res.put(f"peak memory MiB, training batch {tb}", name, f"{train_peak:.0f}")
        res.put(f"peak memory MiB, sampling step batch {sb}", name, f"{sample_peak:.0f}")
    how = (
        (
            "torch.cuda.max_memory_allocated during one step minus the allocation before it (weights "
            "excluded; gradients and Adam state counted when first allocated)"
        )
        if opts.device.type == "cuda"
        else (
            "peak RSS (VmHWM) of a fresh subprocess per system and mode, minus its RSS after "
            "imports: weights, gradients, Adam state and activations of one step"
        )
    )
    res.notes.append(f"Peak memory: {how}.")


def add_ratios(args: argparse.Namespace, res: Results) -> None:
    if "diffusers" not in args.systems:
        return
    for row in list(res.cells):
        cpu_row = row.endswith(": images per process-CPU-second")
        if row.startswith(("training img/s, batch", "sampling-step img/s")) and (":" not in row or cpu_row):
            base = float(res.cells[row]["diffusers"])
            for name, text in res.cells[row].items():
                res.put(f"{row}: x diffusers", name, f"{float(text) / base:.2f}x")


def render(res: Results, systems: list[str]) -> str:
    m = res.meta
    lines = [
        f"# U-Net benchmark: ddpmkit vs diffusers vs denoising-diffusion-pytorch ({m['device']})",
        "",
        f"- date: {m['date']}",
        f"- machine: {m['machine']}",
        f"- versions: {m['versions']}",
        f"- command: `{m['command']}`",
        f"- options: {m['options']}",
        f"- training dropout (all three systems): {m['dropout']}",
        f"- load average before / after the run: {m['load_before']} / {m['load_after']}",
        f"- ddpd = denoising-diffusion-pytorch: {DDPD_ARCHITECTURE}.",
        "",
        "Medians of warmed-up repetitions, systems interleaved round-robin in every repetition.",
        "",
        "| | " + " | ".join(systems) + " |",
        "|---|" + "---:|" * len(systems),
    ]
    order = sorted(res.cells, key=_row_order)
    for row in order:
        lines.append(f"| {row} | " + " | ".join(res.cells[row].get(s, "n/a") for s in systems) + " |")
    lines += ["", "The machine's limit, measured in the same run:", "", "| kernel | GFLOP/s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in res.ceilings.items()]
    lines += [
        "",
        "Fractions of the conv ceiling: images/s x the architecture's FLOPs per image (counted by "
        "FlopCounterMode; for ddpmkit on diffusers' model of the same architecture, since ddpmkit "
        "computes the same function with fewer FLOPs) / the best conv row above.",
    ]
    lines += [f"\n{n}" for n in res.notes]
    return "\n".join(lines) + "\n"


def _row_order(row: str) -> tuple[int, str]:
    for i, prefix in enumerate(("parameters", "GFLOP", "training", "sampling", "full", "peak")):
        if row.startswith(prefix):
            return i, row
    return 9, row


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU (default: 2)")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions at batch <= 32 (default 5)")
    p.add_argument("--big-reps", type=int, default=3, help="timed repetitions at the big batches (default 3)")
    p.add_argument("--sample-reps", type=int, default=1, help="timed full samples per system (default 1)")
    p.add_argument("--train-batches", type=int, nargs="+", default=[16, 128])
    p.add_argument("--sample-batches", type=int, nargs="+", default=[16, 256])
    p.add_argument(
        "--full-batches",
        type=int,
        nargs="+",
        default=None,
        help="batches of the full samples (default: 16 on the CPU, 16 and 256 on CUDA)",
    )
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--dropout", type=float, default=0.1, help="training dropout of all three (default 0.1)")
    p.add_argument(
        "--full-ddpm",
        action="store_true",
        default=None,
        help="measure the 1000-step sample instead of extrapolating it (default on CUDA)",
    )
    p.add_argument("--no-compile", action="store_true", help="CUDA: skip torch.compile")
    p.add_argument("--no-cuda-graphs", action="store_true", help="CUDA: skip CUDA graphs")
    p.add_argument(
        "--channels-last",
        action="store_true",
        default=None,
        help="feed channels_last inputs / models (default: on CUDA only)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: tiny batches and counts, no file written")
    p.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    p.add_argument("--_memory", nargs=3, metavar=("SYSTEM", "MODE", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.full_batches is None:
        args.full_batches = [16, 256] if cuda else [16]
    if args.full_ddpm is None:
        args.full_ddpm = cuda
    if args.channels_last is None:
        args.channels_last = cuda
    if args.quick:
        args.reps, args.big_reps, args.sample_reps = 2, 1, 1
        args.train_batches, args.sample_batches, args.full_batches = [2, 4], [2, 4], [2]
        args.ddim_steps, args.full_ddpm = 3, False
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._memory:
        memory_child(args._memory[0], args._memory[1], int(args._memory[2]), args.dropout)
        return
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    opts = Options(
        dev,
        channels_last=args.channels_last,
        bf16=cuda,
        compile=cuda and not args.no_compile,
        cuda_graphs=cuda and not args.no_cuda_graphs,
        reps=args.reps,
        big_reps=args.big_reps,
        sample_reps=args.sample_reps,
    )
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    res = Results()
    res.meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": "CUDA" if cuda else "CPU",
        "machine": machine(dev),
        "versions": ", ".join(f"{k} {v}" for k, v in versions().items()),
        "command": "python "
        + " ".join([os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]),
        "options": (
            f"bf16 autocast {opts.bf16}, channels_last {opts.channels_last}, torch.compile "
            f"{opts.compile}, CUDA graphs (sampling step) {opts.cuda_graphs}, reps {opts.reps} "
            f"(big batches {opts.big_reps}, full samples {opts.sample_reps})"
        ),
        "dropout": str(args.dropout),
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    t0 = time.time()
    measure_all(args, opts, res)
    res.meta["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    res.notes.append(f"Whole run: {(time.time() - t0) / 60:.1f} min.")
    text = render(res, args.systems)
    print(text)
    if not args.quick:
        Path(args.out).write_text(text)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
