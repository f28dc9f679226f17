"""The CUDA path against the CPU / float32 reference (marker ``gpu``), and the checks of it that mean
something on the CPU too (unmarked, in the default suite).

Each test takes a ``device``: "cuda" params carry the ``gpu`` marker and skip, saying why, where no
CUDA device is present (``python -m pytest -m gpu``; benchmarks/gpu_check.sh runs them on the
device machine). A "cpu" param is there only where the same comparison is a real check on the CPU
(float32 against a float64 reference, bf16 autocast against float32, a skipped update, a gloo run
cut and resumed). Tolerances are stated next to each test with where they come from.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpmkit import checkpoint as ckpt
from ddpmkit.accel import prepare_model
from ddpmkit.config import apply_overrides, train_preset
from ddpmkit.diffusion import DiffusionConfig
from ddpmkit.nn import UNet, UNetConfig
from ddpmkit.sampling import sample_ancestral
from ddpmkit.seeds import sample_generators
from ddpmkit.train import train

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA device (none here); run on the device machine: bash benchmarks/gpu_check.sh"
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)],
                    id="cuda")
NUM_IMAGES = 40

# A two-level U-Net with attention at 4x4: every layer kind (down/upsample, folded attention).
TINY_UNET = UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(4,))


@pytest.fixture(autouse=True)
def exact_cuda_float32():
    """float32 on CUDA means float32: TF32 off in cuBLAS and cuDNN (cuDNN's default is on)."""
    if not HAS_CUDA:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def overrides(npz: Path, **extra) -> dict[str, str]:
    over = {"data": str(npz), "unet.ch": "32", "unet.ch_mult": "1,2", "unet.num_res_blocks": "1",
            "unet.attn_resolutions": "4", "unet.dropout": "0.0", "random_flip": "true",
            "diffusion.num_timesteps": "100", "batch_size": "16", "steps": "6", "checkpoint_every": "3",
            "log_every": "1", "sample_every": "1000", "num_samples": "0", "warmup_steps": "2", "lr": "1e-3",
            "num_threads": "1"}
    over.update({k: str(v) for k, v in extra.items()})
    return over


def randomized_unet(seed: int = 0) -> UNet:
    """TINY_UNET with every parameter random (the zero-init output layer would hide errors)."""
    torch.manual_seed(seed)
    net = UNet(config=TINY_UNET)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def fixed_batch(seed: int = 0, b: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 1, 8, 8, generator=g) * 2 - 1  # (B, 1, 8, 8)
    t = torch.randint(0, 100, (b,), generator=g)  # (B,)
    return x0, t, torch.randn(b, 1, 8, 8, generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------- one fp32 step
def loss_and_grads(device: str, dtype: torch.dtype) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one training step (eq. 14) of randomized_unet on fixed_batch."""
    diffusion = DiffusionConfig(num_timesteps=100).build()
    net = randomized_unet().to(device=device, dtype=dtype).train()
    x0, t, noise = (v.to(device) for v in fixed_batch(b=4))
    loss = diffusion.training_losses(net, x0.to(dtype), t, noise.to(dtype))["loss"].mean()
    loss.backward()
    return float(loss.detach()), {k: p.grad.detach().double().cpu() for k, p in net.named_parameters()}


# Against float64 on the CPU: float32 on the CPU is off by 7e-8 relative on the loss and <= 1.3e-4
# relative (norm, floored as below) on each gradient (measured here, the worst a time-embedding
# projection); CUDA's float32 reductions run in other orders, so allow ~8x: 1e-6 on the loss, 1e-3 on
# the gradients. A wrong layer is off by O(1).
STEP_LOSS_RTOL, STEP_GRAD_RTOL = 1e-6, 1e-3
# The output alone: float32 on the CPU 1.4e-6 relative to float64 (measured); 5e-6 leaves room for
# CUDA's orders and still catches one fp16 rounding in the attention's value path (7.2e-6, tried) or
# TF32 convolutions (~1e-3).
STEP_OUT_RTOL = 5e-6


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_fp32_training_step_equals_the_float64_cpu_step(device):
    ref_loss, ref_grads = loss_and_grads("cpu", torch.float64)
    loss, grads = loss_and_grads(device, torch.float32)
    assert loss == pytest.approx(ref_loss, rel=STEP_LOSS_RTOL)
    # relative to each gradient's norm, floored at 1e-4 of the largest (a conv bias in front of a
    # one-channel-per-group GroupNorm has a zero gradient in exact arithmetic)
    floor = 1e-4 * max(float(g.norm()) for g in ref_grads.values())
    worst = max((float((grads[k] - g).norm()) / max(float(g.norm()), floor), k) for k, g in ref_grads.items())
    assert worst[0] <= STEP_GRAD_RTOL, worst
    # the network's output alone, where the loss (dominated by E[eps^2]) would hide a precision loss
    x, t, _ = fixed_batch(b=4)
    with torch.no_grad():
        ref_out = randomized_unet().double()(x.double(), t)
        out = randomized_unet().to(device)(x.to(device), t.to(device))
    assert rel_err(out, ref_out) <= STEP_OUT_RTOL


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_fp32_training_runs_on_cuda_and_cpu_give_the_same_losses(tmp_path, tiny_npz):
    # The whole loop (data order, shared generator, fused Adam) on both devices: per-step losses
    # within 1e-4 relative (Adam's first steps are sign-like, so float32 noise in a near-zero
    # gradient moves a weight by up to 2 lr; that shifts later losses by far less than 1e-4).
    runs = {d: train(apply_overrides(train_preset("digits"), overrides(tiny_npz)), tmp_path / d,
                     device=d, progress=False) for d in ("cpu", "cuda")}
    assert all(r.exit_code == 0 for r in runs.values())
    assert sorted(runs["cuda"].losses) == sorted(runs["cpu"].losses) == list(range(1, 7))
    for s, v in runs["cpu"].losses.items():
        assert runs["cuda"].losses[s] == pytest.approx(v, rel=1e-4), s


# ------------------------------------------------------------------------------- mixed precision
# Per-step losses of the same run (same data and noise) in bf16/fp16 vs float32: on the CPU, 5 steps
# of bf16 stayed within 4.2e-5 relative (measured here; the zero-initialised output layer keeps the
# early loss near E[eps^2], so on the CPU this mostly checks finiteness). On CUDA the run is 40 steps,
# where the network's output matters; 2e-2 allows bf16's 2^-9 rounding through ~20 layers. A broken
# autocast path (a layer in the wrong dtype, an overflow) gives non-finite or far-off losses.
MIXED_LOSS_RTOL = 2e-2


@pytest.mark.parametrize("device, precision", [
    pytest.param("cpu", "bf16", marks=pytest.mark.slow),
    pytest.param("cuda", "bf16", marks=CUDA.marks, id="cuda-bf16"),
    pytest.param("cuda", "fp16", marks=CUDA.marks, id="cuda-fp16"),
])
def test_mixed_precision_trains_finite_and_tracks_fp32(tmp_path, tiny_npz, device, precision):
    steps = 5 if device == "cpu" else 40
    over = overrides(tiny_npz, steps=steps, checkpoint_every=steps, batch_size=8)
    ref = train(apply_overrides(train_preset("digits"), over), tmp_path / "fp32", device=device,
                progress=False)
    with warnings.catch_warnings():  # a non-finite (skipped) step warns: none may happen here
        warnings.simplefilter("error", RuntimeWarning)
        run = train(apply_overrides(train_preset("digits"), {**over, "precision": precision}),
                    tmp_path / precision, device=device, progress=False)
    assert ref.exit_code == run.exit_code == 0
    assert sorted(run.losses) == list(range(1, steps + 1)), "every step finite (a skipped step has no loss)"
    for s, v in ref.losses.items():
        assert run.losses[s] == pytest.approx(v, rel=MIXED_LOSS_RTOL), s
    for k, v in run.model.state_dict().items():
        assert torch.isfinite(v).all(), k


# ------------------------------------------------------------------------------- skipped steps
@pytest.mark.parametrize("device, precision", [
    pytest.param("cpu", "fp32", marks=pytest.mark.slow),  # test_train covers the CPU skip; here the helper
    pytest.param("cuda", "fp16", marks=CUDA.marks, id="cuda-fp16"),
])
def test_a_nonfinite_step_is_skipped_without_touching_weights_or_ema(tmp_path, tiny_npz, device, precision,
                                                                    monkeypatch):
    # Update 2 (0-based) gets a NaN loss: under fp16 the grad scaler finds inf/NaN gradients, skips
    # the optimiser step and halves its scale; the EMA must not average that step either.
    over = overrides(tiny_npz, steps=4, checkpoint_every=1, keep_last=10, precision=precision)
    from tiny_runs import inject_nonfinite

    with pytest.warns(RuntimeWarning, match="step 3: non-finite"):
        inject_nonfinite(monkeypatch, lambda step: step == 2)
        run = train(apply_overrides(train_preset("digits"), over), tmp_path, device=device, progress=False)
    assert run.exit_code == 0 and sorted(run.losses) == [1, 2, 4]
    states = {s: ckpt.load_checkpoint(tmp_path / "checkpoints" / f"step-{s:09d}") for s in (2, 3, 4)}
    for group in ("model", "ema"):
        for k, v in states[2].tensors[group].items():
            assert torch.equal(states[3].tensors[group][k], v), f"step 3 changed {group}/{k}"
        after = states[4].tensors[group]
        assert not all(torch.equal(after[k], v) for k, v in states[3].tensors[group].items())
    if precision == "fp16":
        assert states[3].state["scaler"]["scale"] == states[2].state["scaler"]["scale"] / 2


# ------------------------------------------------------------------------------- sampling
def tiny_diffusion():
    return DiffusionConfig(num_timesteps=20, beta_start=1e-3, beta_end=0.2).build()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_graph_sampling_equals_eager(bf16):
    # The graph replays the eager kernels on copies of the same inputs: equal up to 1e-5 (float32
    # and bf16 alike; a stale static input or a missed copy-out gives O(1) differences).
    net, diffusion = randomized_unet(), tiny_diffusion()
    out = {}
    for graphs in (False, True):
        model = prepare_model(net, device="cuda", bf16=bf16, cuda_graphs=graphs)
        out[graphs] = sample_ancestral(model, diffusion, (4, 1, 8, 8),
                                       generator=sample_generators(0, range(4)), device="cuda").cpu()
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_cuda_sampling_equals_cpu_sampling():
    # Noise comes from per-sample CPU streams on every device; 20 float32 steps on either device agree
    # to 1e-4 (the clipped chain does not amplify float32 rounding much over 20 steps).
    net, diffusion = randomized_unet(), tiny_diffusion()
    out = {}
    for d in ("cpu", "cuda"):
        model = prepare_model(net, device=d, channels_last=False)
        out[d] = sample_ancestral(model, diffusion, (4, 1, 8, 8), generator=sample_generators(0, range(4)),
                                  device=d).cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=0, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_calc_bpd_loop_on_cuda_equals_cpu_for_a_seed():
    # The same seed must give the same noise on both devices (as the samplers do: drawn on a CPU
    # generator, then moved); total bits/dim then agree to 1e-4 relative (float32 sums over T terms).
    net, diffusion = randomized_unet(), tiny_diffusion()
    x0 = fixed_batch(b=4)[0]
    out = {}
    for d in ("cpu", "cuda"):
        model = prepare_model(net, device=d, channels_last=False)
        res = diffusion.calc_bpd_loop(model, x0.to(d), t_chunk=5, generator=torch.Generator().manual_seed(0))
        out[d] = res["total_bpd"].double().cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------- fast layers
# bf16 autocast against float32 on the same device, relative error of the whole output (norm):
# measured 2.0e-2 on the CPU for the randomized tiny U-Net (each bf16 rounding is 2^-9 = 2e-3, ~20
# layers deep), 5e-2 bounds it with CUDA's kernels. A layer computed in the wrong layout or dtype
# is off by O(1).
BF16_OUT_RTOL = 5e-2


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("channels_last", [False, True])
def test_unet_under_bf16_autocast_is_within_tolerance_of_fp32(device, channels_last):
    net = randomized_unet()
    x, t, _ = fixed_batch(b=4)
    ref = prepare_model(net, device=device, channels_last=False)(x.to(device), t.to(device))
    x, t = x.to(device), t.to(device)
    fast = prepare_model(net, device=device, channels_last=channels_last, bf16=True)(x, t)
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    assert rel_err(fast, ref) <= BF16_OUT_RTOL


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_transposed_conv_upsample_and_folded_attention_under_bf16_match_fp32(device):
    """Each fast layer alone, channels_last input, bf16 autocast vs float32 (same bound)."""
    from ddpmkit.nn.layers import AttnBlock, Upsample

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 8, 8, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    for layer in (Upsample(64), AttnBlock(64)):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        layer = layer.to(device).to(memory_format=torch.channels_last).eval()
        with torch.no_grad():
            ref = layer(x)
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                fast = layer(x)
        assert rel_err(fast.float(), ref) <= BF16_OUT_RTOL, type(layer).__name__


# ------------------------------------------------------------------------------- torchrun
def _torchrun(run: Path, over: dict[str, str], device: str, *extra: str, pause: int = -1) -> subprocess.Popen:
    launcher = Path(__file__).with_name("kill_launcher.py")  # test-only: pauses after step ``pause``
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(launcher), "-1", os.devnull, "--pause-after", str(pause), "--",
           "--device", device, "--no-progress", "-o", str(run), *extra]
    cmd += [a for k, v in over.items() for a in ("--set", f"{k}={v}")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if (run / "metrics.jsonl").is_file() and step in _losses(run):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged")


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant: torchrun starts its worker in a session of its own,
    so a killpg of the agent's group does not reach it (read from /proc; Linux only)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in reversed(tree):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_torchrun_run_killed_and_resumed_equals_the_straight_run(tmp_path, tiny_npz, device):
    # One torchrun process (gloo on the CPU, NCCL on CUDA). On CUDA cuDNN's backward kernels may sum in
    # another order between the two runs: losses within 1e-5 relative, weights within 5e-5 (the DDP
    # test's bounds). On the CPU both are exact.
    over = overrides(tiny_npz)
    straight = _torchrun(tmp_path / "straight", over, device)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    cut = _torchrun(tmp_path / "cut", over, device, pause=4)
    try:
        _wait_for_step(tmp_path / "cut", cut, 4)  # one step past the checkpoint at 3
        _kill_tree(cut.pid)  # torchrun and its worker
        cut.wait(timeout=30)
    finally:
        if cut.poll() is None:
            _kill_tree(cut.pid)
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step-000000003"
    resumed = _torchrun(tmp_path / "cut", over, device, "--resume", "auto")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out and "at step 3" in out
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    exact = device == "cpu"
    for s in a:
        assert b[s] == (a[s] if exact else pytest.approx(a[s], rel=1e-5)), s
    sa = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "straight"))
    sb = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "cut"))
    for group in ("model", "ema"):
        for k, v in sa.tensors[group].items():
            torch.testing.assert_close(sb.tensors[group][k], v, rtol=0, atol=0 if exact else 5e-5,
                                       msg=f"{group}/{k}")


# ------------------------------------------------------------------------------- ddpm sample
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_ddpm_sample_from_a_diffusers_folder_on_cuda_equals_cpu(tmp_path):
    # 10 steps of a randomized diffusers UNet2DModel; the noise streams are per sample on the CPU, so
    # the images agree up to float32 rounding: one uint8 level on at most 1% of the pixels.
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (gpu_check.sh installs it)")
    from ddpmkit.cli import main

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_eps=1e-6,
                                 downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=10, beta_start=1e-3, beta_end=0.2,
                                        variance_type="fixed_large", clip_sample=True)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    arrays = {}
    for d in ("cpu", "cuda"):
        assert main(["sample", str(tmp_path / "pipe"), "--n", "8", "--output-dir", str(tmp_path / d),
                     "--device", d, "--seed", "1"]) == 0
        (path,) = (tmp_path / d).glob("samples_*.npz")
        with np.load(path) as f:
            arrays[d] = f["arr_0"].astype(int)
    assert arrays["cpu"].std() > 10  # not blank
    diff = np.abs(arrays["cuda"] - arrays["cpu"])
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01


# ------------------------------------------------------------------------------- no host sync
class HostSync(AssertionError):
    pass


def _no_sync_model(net, armed: list[bool]):
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        armed[0] = True  # from the first network call on, the loop may not read a tensor on the host
        return net(x, t)
    return model


def _trap(name: str, armed: list[bool], original):
    def f(self, *args, **kwargs):
        if armed[0]:
            raise HostSync(f"Tensor.{name} inside the sampling loop (a host sync per step on CUDA)")
        return original(self, *args, **kwargs)
    return f


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


def test_sampling_loop_reads_no_tensor_on_the_host(monkeypatch):
    """After the boundary checks (armed at the first network call), Algorithm 2's loop must not
    read a tensor's value on the host: on CUDA each such read waits for the GPU, every step."""
    net, diffusion = randomized_unet(), tiny_diffusion()
    armed = [False]
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, _trap(name, armed, getattr(torch.Tensor, name)))
    x = sample_ancestral(_no_sync_model(net, armed), diffusion, (2, 1, 8, 8),
                         generator=sample_generators(0, range(2)))
    monkeypatch.undo()
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


def test_the_host_read_trap_catches_a_read_in_the_loop(monkeypatch):
    """The trap itself: a model that reads t's value on the host is caught at its second call."""
    net, diffusion = randomized_unet(), tiny_diffusion()
    armed = [False]
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, _trap(name, armed, getattr(torch.Tensor, name)))
    inner = _no_sync_model(net, armed)

    def reads(x, t):
        out = inner(x, t)
        int(t[0])
        return out
    with pytest.raises(HostSync, match="__int__|__index__|item"):
        diffusion.p_mean_variance(reads, torch.zeros(2, 1, 8, 8), torch.tensor([3, 3]))



@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_cuda_sampling_loop_does_not_synchronize():
    # torch's sync debug mode raises on any synchronizing call (item, nonzero, a blocking copy) once
    # armed, here from the second step on (the first carries the boundary checks and warm-up).
    net, diffusion = randomized_unet(), tiny_diffusion()
    fast = prepare_model(net, device="cuda")
    calls = [0]

    def model(x, t):
        calls[0] += 1
        if calls[0] == 2:
            torch.cuda.set_sync_debug_mode("error")
        return fast(x, t)
    try:
        x = sample_ancestral(model, diffusion, (4, 1, 8, 8), generator=sample_generators(0, range(4)),
                             device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()
