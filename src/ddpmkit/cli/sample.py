"""`ddpm sample`: draw samples from a trained model into PNG files, a grid and an FID-ready npz.

Sample i (global index) is written to ``DIR/{i:06d}.png`` and draws all of its noise from its own
stream seeded by (seed, i), so the images do not depend on the batch size, and a run can be split
into shards (``--start-index``) or resumed: indices whose PNG exists are skipped. At the end,
``DIR/samples_NxHxWxC.npz`` (uint8 NHWC under ``arr_0``, index order) covers every index PNG in
DIR, and ``DIR/grid.png`` shows the first 64 of them. ``DIR/sampling.json`` records the settings;
a later run into the same DIR must use the same ones.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ddpmkit.enums import unknown_choice
from ddpmkit.fileio import read_json_object

SAMPLERS = ("ddpm", "ddim")
INDEX_PNG = re.compile(r"^(\d+)\.png$")
NPZ_NAME = re.compile(r"^samples_(\d+)x\d+x\d+x\d+\.npz$")
SETTINGS_NAME = "sampling.json"
GRID_SIZE = 64


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    """--device and the speed options, shared with `ddpm figure`."""
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--bf16", action="store_true", help="run the network under bfloat16 autocast (GPU)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the network call as a CUDA graph")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="draw samples (Algorithm 2, respaced DDPM or DDIM) into PNGs, a grid and an npz",
        description="Draw samples from MODEL (a training run directory, our model folder, or a "
        "diffusers folder). Default: Algorithm 2 with all T steps, the model's variance and x0 clipping.",
    )
    p.add_argument("model", metavar="MODEL", help="run directory, model folder, or diffusers folder")
    p.add_argument("--n", type=int, required=True, help="number of samples (indices START .. START+N-1)")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the PNGs and the npz go")
    p.add_argument("--sampler", default="ddpm", help="ddpm (default; Algorithm 2 or respaced) or ddim")
    p.add_argument("--steps", type=int, default=None, help="sampling steps S <= T (default: all T)")
    p.add_argument("--timesteps", default=None, metavar="SPEC",
                   help="instead of --steps: improved-diffusion's 'ddim50' or '10,15,20', "
                   "or 'list:0,250,999'")
    p.add_argument("--eta", type=float, default=None, help="DDIM's eta (default 0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (sample i uses the stream (seed, i))")
    p.add_argument("--batch-size", type=int, default=None, help="samples per network call (default: "
                   "all N at once, within a memory bound; see auto_batch_size)")
    p.add_argument("--start-index", type=int, default=0, help="global index of the first sample")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="a run directory's raw weights instead of the EMA ones")
    p.add_argument("--no-clip", dest="clip", action="store_false", help="do not clip predicted x0 to [-1, 1]")
    add_speed_arguments(p)
    p.set_defaults(func=run)


def resolve_device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; expected cpu")
    return device


def _check_args(args: argparse.Namespace) -> None:
    if args.sampler not in SAMPLERS:
        raise unknown_choice("--sampler", args.sampler, list(SAMPLERS))
    for name, lo in (("n", 1), ("batch_size", 1), ("start_index", 0), ("seed", 0)):
        if getattr(args, name) is not None and getattr(args, name) < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.eta is not None:
        if args.sampler != "ddim":
            raise ValueError("--eta applies to --sampler ddim only")
        if not args.eta >= 0:
            raise ValueError(f"--eta must be >= 0, got {args.eta}")


def auto_batch_size(unet_config: Any, n: int, device: Any) -> int:
    """The most samples per network call, up to ``n``, whose activations fit a memory bound.

    Bigger batches are faster per image on CPUs and GPUs alike (measured: docs/training.md). The
    bound is half the free GPU memory on CUDA, else a quarter of the RAM (at most 8 GiB); an image
    is taken to need 4 bytes x (the skip activations kept for the up path + 8 times the largest
    activation + the largest attention matrix), float32, generous for inference under no_grad.
    """
    import os

    import torch

    c = unet_config
    acts = [c.ch * m * (c.resolution // 2**i) ** 2 for i, m in enumerate(c.ch_mult)]
    lowest = c.resolution // 2 ** (len(c.ch_mult) - 1)
    attn = max([(r * r) ** 2 for r in c.attn_resolutions] + [lowest ** 4])
    per_image = 4 * ((c.num_res_blocks + 1) * sum(acts) + 8 * max(acts) + attn)
    if device.type == "cuda":
        bound = torch.cuda.mem_get_info(device)[0] // 2
    else:
        bound = min(8 << 30, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    return max(1, min(n, bound // per_image))


def existing_indices(out_dir: Path) -> set[int]:
    """Indices of the sample PNGs (``000123.png``) in ``out_dir``."""
    if not out_dir.is_dir():
        return set()
    return {int(m.group(1)) for p in out_dir.iterdir() if (m := INDEX_PNG.match(p.name))}


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Write DIR/sampling.json, or check that the samples already there were made the same way."""
    path = out_dir / SETTINGS_NAME
    keys = ("sampler", "steps", "timesteps", "eta", "seed", "clip_denoised", "ema", "image_shape",
            "num_timesteps", "model_sha256")
    if path.is_file():
        old = read_json_object(path)
        diff = [k for k in keys if old.get(k) != settings.get(k)]
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} there vs {settings.get(k)!r} now" for k in diff)
            raise ValueError(f"{out_dir} holds samples made with other settings ({changes}); "
                             "use another --output-dir")
        return
    from ddpmkit.fileio import atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings, sort_keys=False)


def weights_sha256(net: Any) -> str:
    """SHA-256 over a network's state dict (names, dtypes, shapes, bytes): which model made a folder."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def drop_torn_pngs(out_dir: Path, done: set[int], shape: tuple[int, int, int]) -> set[int]:
    """The indices in ``done`` whose PNG decodes to ``shape`` (C, H, W); each other one (empty or cut
    short by a power cut, say) is deleted with a message naming it, so that it is drawn again."""
    from PIL import Image

    good = set()
    for i in sorted(done):
        path = out_dir / f"{i:06d}.png"
        try:
            with Image.open(path) as im:
                im.load()
                ok = im.size == (shape[2], shape[1]) and len(im.getbands()) == shape[0]
        except (OSError, ValueError, SyntaxError):
            ok = False
        if ok:
            good.add(i)
        else:
            print(f"ddpm sample: {path} is unreadable or of the wrong size; drawing it again",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
    return good


def run(args: argparse.Namespace) -> int:
    from ddpmkit.fileio import RunLock

    _check_args(args)
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {out_dir}: exists and is not a folder")
    with RunLock(out_dir):  # one sampler per folder; an unwritable folder fails here, before any work
        return _run(args, out_dir)


def _run(args: argparse.Namespace, out_dir: Path) -> int:
    from ddpmkit.config import check_fits
    from ddpmkit.images import save_image
    from ddpmkit.logs import progress_bar
    from ddpmkit.models import load_model
    from ddpmkit.sampling import (
        parse_timesteps,
        prepare_model,
        sample,
        sample_generators,
        space_timesteps,
        timesteps_from_text,
    )

    device = resolve_device(args.device)
    loaded = load_model(args.model, ema=args.ema)
    # the automatic batch (None) is chosen within the memory bound later; one image must fit
    check_fits(loaded.unet.config, loaded.diffusion.num_timesteps, args.batch_size or 1, training=False,
               device=device)
    diffusion = loaded.diffusion.build()
    T = diffusion.num_timesteps
    steps = args.steps if args.steps is not None else T
    if steps > T:
        raise ValueError(f"--steps must be <= T = {T} (the model's diffusion steps), got {steps}")
    if args.sampler == "ddpm" and steps < 2:
        raise ValueError(f"--steps must be in [2, {T}] for --sampler ddpm, got {steps}")
    space_timesteps(T, steps)
    kept = None  # --timesteps: the kept list, recorded in sampling.json
    if args.timesteps is not None:
        if args.steps is not None:
            raise ValueError("give --steps or --timesteps, not both")
        kept = parse_timesteps(T, timesteps_from_text(args.timesteps))
        steps = len(kept)
        if args.sampler == "ddpm" and steps < 2:
            raise ValueError(f"--timesteps must keep at least 2 steps for --sampler ddpm, got {kept}")
    cfg = loaded.unet.config
    shape = (cfg.in_channels, cfg.resolution, cfg.resolution)  # (C, H, W)
    eta = 0.0 if args.eta is None else float(args.eta)
    _check_settings(out_dir, {
        "model": loaded.source, "sampler": args.sampler, "steps": steps,
        **({"timesteps": kept} if kept else {}), "eta": eta, "seed": args.seed,
        "clip_denoised": args.clip, "ema": args.ema, "image_shape": list(shape), "num_timesteps": T,
        "model_sha256": weights_sha256(loaded.unet),
    })
    wanted = range(args.start_index, args.start_index + args.n)
    done = drop_torn_pngs(out_dir, existing_indices(out_dir), shape)
    todo = [i for i in wanted if i not in done]
    model = prepare_model(loaded.unet, device=device, compile=args.compile, bf16=args.bf16,
                          cuda_graphs=args.cuda_graphs)
    batch = args.batch_size or auto_batch_size(cfg, max(1, len(todo)), device)
    start = time.perf_counter()
    with progress_bar(total=len(todo), desc="samples", unit="img", disable=not todo) as bar:
        for k in range(0, len(todo), batch):
            idx = todo[k : k + batch]
            x0 = sample(model, diffusion, (len(idx), *shape), sampler=args.sampler, eta=eta,
                        **({"timesteps": kept} if kept else {"steps": steps}),
                        generator=sample_generators(args.seed, idx), clip_denoised=args.clip, device=device,
                        progress=sys.stderr.isatty())  # a per-step bar on terminals only
            for i, img in zip(idx, x0.float().cpu(), strict=True):
                save_image(img, out_dir / f"{i:06d}.png")
            bar.update(len(idx))
    elapsed = time.perf_counter() - start
    npz, grid = write_npz_and_grid(out_dir)
    skipped = len(wanted) - len(todo)
    rate = len(todo) / elapsed if todo and elapsed > 0 else 0.0
    print(f"sampled {len(todo)} images in {elapsed:.1f} s on {device}, batch {batch}; skipped {skipped} "
          f"existing\n{rate:.2f} images/s")
    print(f"wrote {npz} and {grid}")
    return 0


def write_npz_and_grid(out_dir: Path) -> tuple[Path, Path]:
    """``samples_NxHxWxC.npz`` of every index PNG in out_dir (index order) and ``grid.png`` of the
    first 64; older ``samples_*.npz`` files (fewer indices) are removed."""
    from PIL import Image

    from ddpmkit.fileio import atomic_write_bytes
    from ddpmkit.images import save_image_grid

    indices = sorted(existing_indices(out_dir))
    if not indices:
        raise ValueError(f"{out_dir}: no sample PNGs to collect")
    arrays = []
    for i in indices:
        with Image.open(out_dir / f"{i:06d}.png") as im:
            a = np.asarray(im)
        arrays.append(a[..., None] if a.ndim == 2 else a)  # (H, W, C)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{out_dir}: the sample PNGs differ in shape {sorted(shapes)}")
    images = np.stack(arrays)  # (N, H, W, C) uint8
    name = "samples_{}x{}x{}x{}.npz".format(*images.shape)
    npz = out_dir / name
    buf = io.BytesIO()
    np.savez(buf, arr_0=images)
    atomic_write_bytes(npz, buf.getvalue())
    for old in out_dir.iterdir():  # superseded: they cover fewer indices
        m = NPZ_NAME.match(old.name)
        if m and old.name != name and int(m.group(1)) < len(images):
            old.unlink(missing_ok=True)
    grid = save_image_grid(images[:GRID_SIZE], out_dir / "grid.png", min_width=512)  # upscaled to be legible
    return npz, grid

