"""One prepared device run: the ``gpu`` tests, then training and sampling speed of the paper's CIFAR-10
U-Net, beside diffusers' UNet2DModel with google/ddpm-cifar10-32's released config, on one GPU.

Each part runs in its own subprocess with its own time limit (a hung kernel or a slow compile
costs that part only) and the whole run stops starting parts at ``--budget`` seconds. Results go to
``OUT/gpu_check.json`` and a markdown table ``OUT/gpu_check.md`` (OUT: ``--out``, default $OUT).

Parts (``--parts``, default all):
- ``tests``: ``pytest -m gpu tests/test_gpu.py`` (log in OUT/gpu_tests.log);
- ``ceiling``: bf16 matmul TFLOP/s (8192^3), the denominator of the "fraction of ceiling" column;
- ``train-fp32``, ``train-bf16``, ``train-bf16-compile``, ``train-diffusers-bf16``: training img/s at
  batch 128 through ddpmkit's own ``UpdateStep`` (L_simple, backward, grad clip, fused Adam,
  EMA: the real step; torch.compile wraps the network it calls) and peak memory;
- ``sample-bf16-graphs``, ``sample-bf16-eager``, ``sample-diffusers-bf16``: the wall time of 256
  samples x 1000 steps of Algorithm 2 (``sample_ancestral``, one CUDA generator), and peak memory;
- ``sync``: the profiler's count of host synchronisations (cudaStreamSynchronize,
  cudaDeviceSynchronize, cudaEventSynchronize, blocking cudaMemcpy) per sampling step, after warm-up.

    python benchmarks/gpu_check.py --device cuda --out "$OUT"    # on the device (gpu_check.sh)
    python benchmarks/gpu_check.py --device cpu --dry-run --out /tmp/gc   # rehearsal, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PARTS = ("train-fp32", "train-bf16", "train-bf16-compile", "train-diffusers-bf16")
SAMPLE_PARTS = ("sample-bf16-graphs", "sample-bf16-eager", "sample-diffusers-bf16")
PARTS = ("tests", "ceiling", *TRAIN_PARTS, *SAMPLE_PARTS, "sync")
LIMITS_S = {"tests": 170, "ceiling": 30, "train-fp32": 45, "train-bf16": 40, "train-bf16-compile": 110,
            "train-diffusers-bf16": 45, "sample-bf16-graphs": 40, "sample-bf16-eager": 45,
            "sample-diffusers-bf16": 60, "sync": 30}
# google/ddpm-cifar10-32 unet/config.json (shared/reference/released_models.md)
CIFAR10_DIFFUSERS = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "mid_block_scale_factor": 1,
    "add_attention": True, "attention_head_dim": None, "norm_num_groups": 32, "norm_eps": 1e-06,
    "act_fn": "silu", "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
    "downsample_padding": 0, "downsample_type": "conv", "upsample_type": "conv",
    "resnet_time_scale_shift": "default", "center_input_sample": False, "dropout": 0.1,
}  # fmt: skip
NO_DIFFUSERS = "diffusers is not installed (gpu_check.sh installs a carried wheel from .whl/)"
TINY_DIFFUSERS = {**CIFAR10_DIFFUSERS, "sample_size": 16, "block_out_channels": [32, 64],
                  "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                  "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1}


# ----------------------------------------------------------------------------------- sizes
def sizes(dry_run: bool) -> dict[str, Any]:
    """Full sizes on the device; tiny ones for the CPU rehearsal (same code paths)."""
    if dry_run:
        return {"batch": 4, "warmup": 1, "steps": 3, "samples": 4, "T": 5, "res": 16, "matmul": 256,
                "unet": {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,)},
                "diffusers": TINY_DIFFUSERS}
    return {"batch": 128, "warmup": 5, "steps": 30, "samples": 256, "T": 1000, "res": 32, "matmul": 8192,
            "unet": {}, "diffusers": CIFAR10_DIFFUSERS}


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ----------------------------------------------------------------------------------- networks
def ddpmkit_unet(sz: dict[str, Any], dropout: float) -> Any:
    from ddpmkit.nn import UNet

    return UNet.from_preset("cifar10", resolution=sz["res"], dropout=dropout, **sz["unet"])


def diffusers_unet(sz: dict[str, Any], dropout: float) -> Any:
    import torch
    from diffusers import UNet2DModel

    class Eps(torch.nn.Module):  # model(x_t, t) -> eps, the interface of ddpmkit's samplers
        def __init__(self) -> None:
            super().__init__()
            self.unet = UNet2DModel(**{**sz["diffusers"], "dropout": dropout})

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.unet(x, t).sample

    return Eps()


def flops_per_image(net: Any, sz: dict[str, Any], device: Any, *, train: bool) -> float:
    """FLOPs of one image's forward (x3 for forward + backward when ``train``), FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, sz["res"], sz["res"], device=device)
    t = torch.tensor([1, 500], device=device) % sz["T"]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x, t)
    return fc.get_total_flops() / 2 * (3 if train else 1)


# ----------------------------------------------------------------------------------- parts
def part_ceiling(args: argparse.Namespace, sz: dict[str, Any]) -> dict[str, Any]:
    import torch

    device = torch.device(args.device)
    n = sz["matmul"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 50 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    return {"matmul_tflops": 2 * n**3 / dt / 1e12, "dtype": str(dtype).removeprefix("torch."), "n": n}


def _trainer(sz: dict[str, Any], device: Any, precision: str, tmp: Path) -> Any:
    """ddpmkit's own trainer on random CIFAR-shaped data (the step is what is timed, not the data)."""
    import numpy as np

    from ddpmkit.config import apply_overrides, train_preset
    from ddpmkit.distributed import DistInfo
    from ddpmkit.train import _build_run

    npz = tmp / "data.npz"
    np.savez(npz, np.random.default_rng(0).integers(0, 256, (256, sz["res"], sz["res"], 3), dtype=np.uint8))
    over = {"data": str(npz), "batch_size": str(sz["batch"]), "precision": precision,
            "diffusion.num_timesteps": str(sz["T"]), "unet.resolution": str(sz["res"])}
    over.update({f"unet.{k}": ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
                 for k, v in sz["unet"].items()})
    config = apply_overrides(train_preset("cifar10"), over)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    return _build_run(config, tmp / "run", info, progress=False)


def part_train(args: argparse.Namespace, sz: dict[str, Any], name: str) -> dict[str, Any]:
    import torch

    device = torch.device(args.device)
    precision = "fp32" if name == "train-fp32" else "bf16"
    with tempfile.TemporaryDirectory() as tmp:
        run = _trainer(sz, device, precision, Path(tmp))
        st, update = run.state, run.update
        if name == "train-diffusers-bf16":  # the same step around diffusers' network
            net = diffusers_unet(sz, dropout=0.1).to(device)
            st.model = update.net = net
            st.opt = torch.optim.Adam(net.parameters(), lr=2e-4, fused=True)
            st.ema = torch.optim.swa_utils.AveragedModel(
                net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9999), use_buffers=True)
        if device.type == "cuda":
            st.model = st.model.to(memory_format=torch.channels_last)
            update.net = st.model
        if name == "train-bf16-compile":
            update.net = torch.compile(st.model)
        flops = flops_per_image(st.model, sz, device, train=True)
        x0 = torch.rand(sz["batch"], 3, sz["res"], sz["res"], device=device) * 2 - 1
        if device.type == "cuda":
            x0 = x0.contiguous(memory_format=torch.channels_last)
            torch.cuda.reset_peak_memory_stats(device)
        t_compile = time.perf_counter()
        finite = [update(x0, i).finite for i in range(sz["warmup"])]
        sync(device)
        warm_s = time.perf_counter() - t_compile
        t0 = time.perf_counter()
        finite += [update(x0, sz["warmup"] + i).finite for i in range(sz["steps"])]
        sync(device)
        dt = time.perf_counter() - t0
    img_s = sz["steps"] * sz["batch"] / dt
    return {"img_per_s": img_s, "batch": sz["batch"], "steps_timed": sz["steps"], "warmup_s": warm_s,
            "all_finite": all(finite), "peak_mib": peak_mib(device), "tflops": img_s * flops / 1e12,
            "gflop_per_image_train": flops / 1e9}


def _sampling_model(args: argparse.Namespace, sz: dict[str, Any], name: str) -> Any:
    from ddpmkit.accel import prepare_model

    net = diffusers_unet(sz, dropout=0.0) if "diffusers" in name else ddpmkit_unet(sz, dropout=0.0)
    graphs = name.endswith("graphs") and args.device.startswith("cuda")
    return net, prepare_model(net, device=args.device, bf16=True, cuda_graphs=graphs)


def part_sample(args: argparse.Namespace, sz: dict[str, Any], name: str) -> dict[str, Any]:
    import torch

    from ddpmkit.diffusion import DiffusionConfig
    from ddpmkit.sampling import sample_ancestral

    device = torch.device(args.device)
    if name.endswith("graphs") and device.type != "cuda":
        return {"skipped": "CUDA graphs need a CUDA device"}
    diffusion = DiffusionConfig(num_timesteps=sz["T"]).build()
    net, model = _sampling_model(args, sz, name)
    shape = (sz["samples"], 3, sz["res"], sz["res"])
    sample_ancestral(model, DiffusionConfig(num_timesteps=2).build(), shape, device=device,
                     generator=torch.Generator(device).manual_seed(1))  # warm-up, graph capture
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    g = torch.Generator(device).manual_seed(0)
    x = sample_ancestral(model, diffusion, shape, device=device, generator=g)
    sync(device)
    wall = time.perf_counter() - t0
    flops = flops_per_image(net, sz, device, train=False)
    return {"wall_s": wall, "samples": sz["samples"], "steps": sz["T"],
            "finite": bool(torch.isfinite(x).all()), "peak_mib": peak_mib(device),
            "tflops": flops * sz["samples"] * sz["T"] / wall / 1e12}


def part_sync(args: argparse.Namespace, sz: dict[str, Any]) -> dict[str, Any]:
    """Host syncs per sampling step: profile steps 2.. of a short chain (step 1 holds the warm-up)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ddpmkit.diffusion import DiffusionConfig
    from ddpmkit.sampling import sample_ancestral

    device = torch.device(args.device)
    steps = 20 if device.type == "cuda" else 4
    _, model = _sampling_model(args, sz, "sample-bf16-graphs")
    diffusion = DiffusionConfig(num_timesteps=steps).build()
    shape = (min(sz["samples"], 16), 3, sz["res"], sz["res"])
    def chain() -> None:
        g = torch.Generator(device).manual_seed(0)
        sample_ancestral(model, diffusion, shape, device=device, generator=g)

    chain()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        chain()
        sync(device)
    names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
             "aten::item", "aten::_local_scalar_dense")
    counts = {n: 0 for n in names}
    for e in prof.events():
        if e.name in counts:
            counts[e.name] += 1
    # the final torch.cuda.synchronize above is one cudaDeviceSynchronize, outside the loop
    in_loop = (counts["cudaStreamSynchronize"] + counts["cudaEventSynchronize"] + counts["cudaMemcpy"]
               + max(0, counts["cudaDeviceSynchronize"] - 1) + counts["aten::_local_scalar_dense"])
    return {"steps": steps, "counts": counts, "syncs_per_step": in_loop / steps, "profiled_on": device.type}


def part_tests(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_gpu.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": proc.returncode, "summary": summary}


def run_part(args: argparse.Namespace, name: str) -> dict[str, Any]:
    sz = sizes(args.dry_run)
    if name == "tests":
        return part_tests(args, Path(args.out))
    if name == "ceiling":
        return part_ceiling(args, sz)
    if name in TRAIN_PARTS:
        if name == "train-bf16-compile" and args.dry_run and args.device == "cpu":
            return {"skipped": "torch.compile is not rehearsed on the CPU (minutes of inductor build)"}
        if "diffusers" in name and not _has_diffusers():
            return {"skipped": NO_DIFFUSERS}
        return part_train(args, sz, name)
    if name in SAMPLE_PARTS:
        if "diffusers" in name and not _has_diffusers():
            return {"skipped": NO_DIFFUSERS}
        return part_sample(args, sz, name)
    if name == "sync":
        return part_sync(args, sz)
    raise ValueError(f"unknown part {name!r}; expected one of {list(PARTS)}")


def _has_diffusers() -> bool:
    import importlib.util

    return importlib.util.find_spec("diffusers") is not None


# ----------------------------------------------------------------------------------- the driver
def child(args: argparse.Namespace) -> None:
    import torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the fp32 rows: TF32
    res = run_part(args, args.child)
    Path(args.result).write_text(json.dumps(res))


def versions() -> dict[str, str]:
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__,
         "cuda": str(torch.version.cuda), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if torch.cuda.is_available():
        v["device"] = torch.cuda.get_device_name(0)
    else:
        v["device"] = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    try:
        import diffusers

        v["diffusers"] = diffusers.__version__
    except ImportError:
        v["diffusers"] = "not installed"
    return v


def drive(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results: dict[str, Any] = {"versions": versions(), "dry_run": args.dry_run, "device_arg": args.device,
                               "command": " ".join(sys.argv), "parts": {}}
    log = open(out / "gpu_check.log", "a")
    for name in args.parts:
        left = args.budget - (time.monotonic() - start)
        limit = min(LIMITS_S[name] * (4 if args.dry_run else 1), left)
        if limit < 5:
            results["parts"][name] = {"skipped": f"the run's budget of {args.budget} s was spent"}
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result_path = f.name
        cmd = [sys.executable, __file__, "--child", name, "--result", result_path, "--device", args.device,
               "--out", str(out)] + (["--dry-run"] if args.dry_run else [])
        t0 = time.monotonic()
        print(f"[{time.monotonic() - start:6.1f}s] {name} (limit {limit:.0f} s)", flush=True)
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit, cwd=ROOT)
            ok = proc.returncode == 0
            res = json.loads(Path(result_path).read_text()) if ok else {"error": f"exit {proc.returncode}"}
        except subprocess.TimeoutExpired:
            res = {"error": f"over its limit of {limit:.0f} s"}
        res["part_s"] = round(time.monotonic() - t0, 1)
        results["parts"][name] = res
        print(f"         -> {json.dumps(res)}", flush=True)
        log.flush()
        Path(result_path).unlink(missing_ok=True)
    results["total_s"] = round(time.monotonic() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "gpu_check.md").write_text(render(results))
    return results


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(r: dict[str, Any]) -> str:
    """The markdown table: one row per timed part, with its ratio to diffusers and ceiling fraction."""
    p, v = r["parts"], r["versions"]
    ceiling = p.get("ceiling", {}).get("matmul_tflops")
    lines = [f"GPU check, {v['date_utc']} UTC, {v['device']}; python {v['python']}, torch {v['torch']} "
             f"(CUDA {v['cuda']}), diffusers {v['diffusers']}"
             + (" - DRY RUN, tiny sizes" if r["dry_run"] else ""),
             "", f"command: `{r['command']}`; total {r['total_s']} s", ""]
    if "tests" in p:
        lines += [f"gpu tests: {p['tests'].get('summary', p['tests'])}", ""]
    if ceiling:
        c = p["ceiling"]
        lines += [f"matmul ceiling ({c['dtype']}, {c['n']}^3): {ceiling:.1f} TFLOP/s", ""]
    lines += ["| part | result | vs diffusers | TFLOP/s (fraction of ceiling) | peak MiB | note |",
              "| --- | --- | --- | --- | --- | --- |"]
    d_train = p.get("train-diffusers-bf16", {}).get("img_per_s")
    d_wall = p.get("sample-diffusers-bf16", {}).get("wall_s")
    for name in (*TRAIN_PARTS, *SAMPLE_PARTS):
        res = p.get(name)
        if res is None:
            continue
        if "skipped" in res or "error" in res:
            lines.append(f"| {name} | - | - | - | - | {res.get('skipped') or res.get('error')} |")
            continue
        if name in TRAIN_PARTS:
            main = f"{res['img_per_s']:.1f} img/s (batch {res['batch']})"
            ratio = res["img_per_s"] / d_train if d_train and "diffusers" not in name else None
            note = "" if res["all_finite"] else "NON-FINITE steps"
        else:
            main = f"{res['wall_s']:.2f} s ({res['samples']} x {res['steps']} steps)"
            ratio = d_wall / res["wall_s"] if d_wall and "diffusers" not in name else None
            note = "" if res["finite"] else "NON-FINITE samples"
        frac = f"{res['tflops']:.2f}" + (f" ({res['tflops'] / ceiling:.1%})" if ceiling else "")
        ratio_s = f"{ratio:.2f}x" if ratio else "-"
        lines.append(f"| {name} | {main} | {ratio_s} | {frac} | {_fmt(res['peak_mib'], '.0f')} | {note} |")
    s = p.get("sync")
    if s:
        lines += ["", "host syncs per sampling step (profiler): " + (
            f"{s['syncs_per_step']:.2f} over {s['steps']} steps on {s['profiled_on']}, counts {s['counts']}"
            if "counts" in s else str(s))]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes: a rehearsal of every code path")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--budget", type=float, default=450.0, help="seconds after which no part is started")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    results = drive(args)
    print((Path(args.out) / "gpu_check.md").read_text())
    bad = [n for n, r in results["parts"].items() if "error" in r]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
