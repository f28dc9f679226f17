"""`ddpm eval bpd|fid|digits`: bits/dim through the full bound, FID and IS, the offline digits metric.

Each writes a JSON file (``--out``; by default ``eval_<kind>.json`` beside the model or the samples,
where ``ddpm report`` finds it) and prints a summary. ``ddpm eval bpd`` appends every finished batch
to ``<out>.partial.jsonl`` and continues from it when rerun with the same settings.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from ddpmkit.cli.args import add_gamma_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="bits/dim (eq. 5), FID and IS, or the offline digits metric",
                              description="Evaluate a model (bits/dim) or a set of samples (FID/IS, digits).")
    sub = p.add_subparsers(dest="eval_kind", metavar="KIND", required=True)

    b = sub.add_parser("bpd", help="test-set NLL in bits/dim through the full T-step bound",
                       description="Bits/dim of MODEL on --data through all T terms of the bound (eq. 5), "
                       "with L_T, sum L_{t-1}, L_0 and rate/distortion by t (Table 4). Resumable.")
    b.add_argument("model", metavar="MODEL", help="run directory, model folder, or diffusers folder")
    b.add_argument("--data", required=True, metavar="SRC",
                   help="data source (digits, cifar10, a folder, an npz)")
    b.add_argument("--split", default="test", help="train, test (default) or all")
    b.add_argument("--n", type=int, default=None, help="the first N examples (default: all)")
    b.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    b.add_argument("--t-chunk", type=int, default=None, metavar="K",
                   help="timesteps per network call (the batch is repeated K times; default 1)")
    b.add_argument("--seed", type=int, default=0, help="noise seed (batch b uses the stream (seed, b))")
    b.add_argument("--no-ema", dest="ema", action="store_false", help="a run directory's raw weights")
    b.add_argument("--no-clip", dest="clip", action="store_false",
                   help="do not clip predicted x0 to [-1, 1] (the authors clip)")
    b.add_argument("--timesteps", default=None, metavar="SPEC",
                   help="the bound of a respaced chain: a count K or any 'ddpm sample --timesteps' SPEC "
                   "(default: all T)")
    b.add_argument("--variance", default="model",
                   help="the reverse variance: model (default: the model's own), fixedlarge (beta), "
                   "fixedsmall (beta-tilde) or analytic (Analytic-DPM's optimal one, from Gamma_t)")
    add_gamma_arguments(b)
    b.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    b.add_argument("--out", default=None, metavar="FILE", help="result JSON (default MODEL/eval_bpd.json)")
    b.set_defaults(func=run_bpd)

    f = sub.add_parser("fid", help="FID and IS of samples against a reference (TF-compatible Inception)",
                       description="FID and Inception Score of SAMPLES (an npz of uint8 NHWC under arr_0, or "
                       "an image folder) against REF (a data source, or an .npz with mu and sigma).")
    f.add_argument("samples", metavar="SAMPLES", help="an .npz (arr_0 uint8 NHWC) or an image folder")
    f.add_argument("--ref", required=True, metavar="REF",
                   help="cifar10-train, cifar10-test, digits, an image folder, an .npz of images, or an "
                   ".npz of statistics (mu, sigma)")
    f.add_argument("--ref-split", default="train", help="split of a data source REF (default train)")
    f.add_argument("--batch-size", type=int, default=100, help="images per Inception call (default 100)")
    f.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="weights-inception-2015-12-05-6726825d.pth (default: torch-fidelity's cache)")
    f.add_argument("--download-weights", action="store_true",
                   help="fetch the Inception weights into torch-fidelity's cache if they are missing")
    f.add_argument("--no-cache", dest="cache", action="store_false",
                   help="recompute the reference statistics instead of reading the cache")
    f.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    f.add_argument("--out", default=None, metavar="FILE", help="result JSON (default: eval_fid.json beside "
                   "the samples)")
    f.set_defaults(func=run_fid)

    d = sub.add_parser("digits", help="the offline digits metric (Frechet distance, classifier score)",
                       description="Frechet distance in a shipped digits classifier's feature space, its "
                       "classifier score and per-class counts, next to real held-out digits of the same "
                       "size.")
    d.add_argument("samples", metavar="SAMPLES", help="an .npz (arr_0 uint8 (N, 8, 8, 1)) or an image folder")
    d.add_argument("--out", default=None, metavar="FILE", help="result JSON (default: eval_digits.json "
                   "beside the samples)")
    d.set_defaults(func=run_digits)


def _default_out(path: str, name: str) -> Path:
    p = Path(path)
    return (p if p.is_dir() else p.parent) / name


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from ddpmkit.fileio import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, sort_keys=False)


def _check_writable(out: Path) -> Path:
    """An output that cannot be written (or is a folder) is a one-line user error before any work."""
    from ddpmkit.fileio import check_output_path

    return check_output_path(out)


def _positive(name: str, value: int | None) -> None:
    """The library's own check (``checks.check_int``), run before the model loads."""
    from ddpmkit.checks import check_int

    if value is not None:
        check_int(value, f"--{name}", low=1)


def run_bpd(args: argparse.Namespace) -> int:
    import torch

    from ddpmkit.data import open_source
    from ddpmkit.distributed import resolve_device
    from ddpmkit.evaluate.bpd import evaluate_bpd, rate_distortion_table
    from ddpmkit.models import load_model

    for name in ("n", "batch_size", "t_chunk"):
        _positive(name.replace("_", "-"), getattr(args, name))
    device = resolve_device(args.device)
    out = _check_writable(Path(args.out) if args.out else _default_out(args.model, "eval_bpd.json"))
    loaded = load_model(args.model, ema=args.ema)
    cfg = loaded.unet.config
    ds = open_source(args.data, resolution=cfg.resolution, channels=cfg.in_channels, split=args.split)
    partial = out.with_name(out.stem + ".partial.jsonl")
    unet = loaded.unet.to(device).eval()
    chain, chain_settings = _bound_chain(args, loaded, device)
    settings = {"model": loaded.source, "ema": args.ema, "data": ds.description, "split": args.split,
                "diffusion": loaded.diffusion.to_dict(), **chain_settings}
    with torch.inference_mode():
        res = evaluate_bpd(unet, chain, ds, n=args.n, batch_size=args.batch_size,
                           t_chunk=args.t_chunk, clip_denoised=args.clip, seed=args.seed,
                           partial_path=partial, settings=settings, device=device, progress=True)
    res["kind"] = "bpd"
    res["table4"] = [{"reverse_time": k, "rate_bpd": r, "distortion_rmse": d}
                     for k, r, d in rate_distortion_table(res)]
    _write_json(out, res)
    print(f"bits/dim {res['bpd']:.5f} +- {res['bpd_stderr']:.5f} on {res['num_examples']} images of "
          f"{ds.description}")
    print(f"  L_T (prior)          {res['prior_bpd']:.5f}")
    print(f"  sum L_(t-1), t >= 2  {res['sum_kl_bpd']:.5f}")
    print(f"  L_0 (decoder)        {res['decoder_bpd']:.5f}")
    print(f"  rate {res['rate_bpd']:.5f} + distortion {res['decoder_bpd']:.5f} (RMSE "
          f"{res['distortion_rmse']:.5f} on [0, 255])")
    print(f"{'reverse time (T-t+1)':>22}  {'rate (bits/dim)':>16}  {'distortion (RMSE [0,255])':>26}")
    for row in res["table4"]:
        print(f"{row['reverse_time']:>22}  {row['rate_bpd']:>16.5f}  {row['distortion_rmse']:>26.5f}")
    print(f"wrote {out} (per-batch results: {partial})")
    return 0


def _bound_chain(args: argparse.Namespace, loaded: Any, device: Any) -> tuple[Any, dict[str, Any]]:
    """The chain --timesteps / --variance ask for, and what the result records of them."""
    from ddpmkit.analytic import reverse_chain
    from ddpmkit.gamma_file import model_gamma, training_data_of
    from ddpmkit.models import resolve_model_path
    from ddpmkit.nn.folder import weights_sha256
    from ddpmkit.respace import diffusion_timesteps, timesteps_from_text

    full = loaded.diffusion.build()
    spec = None if args.timesteps is None else timesteps_from_text(args.timesteps)
    if isinstance(spec, str) and spec.isdigit():
        spec = int(spec)  # a count K: K evenly strided timesteps
    kept = diffusion_timesteps(full, spec)
    if args.timesteps is None and args.variance == "model":
        return full, {}
    gamma, extra = None, {}
    if args.variance == "analytic":  # any other value is parsed (and refused) by reverse_chain
        data = args.gamma_data if args.gamma_data is not None else training_data_of(args.model)
        gamma = model_gamma(loaded.unet, full, resolve_model_path(args.model, ema=args.ema)[1],
                            weights_sha256=weights_sha256(loaded.unet), data=data,
                            num_samples=args.gamma_samples, device=device, progress=True)
        extra = {"gamma": {"data": data, "num_samples": args.gamma_samples}}
    chain = reverse_chain(loaded.diffusion, kept, args.variance, gamma)
    return chain, {"timesteps": kept, "variance": args.variance, **extra}


def _check_fidelity() -> None:
    """The missing package, named before the weights it would load are looked for."""
    import importlib.util

    from ddpmkit.evaluate.inception import FIDELITY_INSTALL

    if importlib.util.find_spec("torch_fidelity") is None:
        raise ValueError(f"FID and IS need the torch-fidelity package (its TF-compatible Inception), "
                         f"which is not installed: {FIDELITY_INSTALL}")


def run_fid(args: argparse.Namespace) -> int:
    from ddpmkit.distributed import resolve_device
    from ddpmkit.evaluate.fid import FewSamplesWarning, compute_fid, load_samples
    from ddpmkit.sample_folder import samples_provenance

    _positive("batch-size", args.batch_size)
    _check_fidelity()
    device = resolve_device(args.device)
    out = _check_writable(Path(args.out) if args.out else _default_out(args.samples, "eval_fid.json"))
    images = load_samples(args.samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewSamplesWarning)  # printed below from res["warnings"]
        res = compute_fid(images, args.ref, batch_size=args.batch_size, split=args.ref_split,
                          device=device, inception_weights=args.inception_weights,
                          download=args.download_weights, use_cache=args.cache, progress=True)
    res.update(kind="fid", samples=str(args.samples), **samples_provenance(args.samples, images))
    _write_json(out, res)
    for w in res["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    is_text = f"IS {res['is_mean']:.3f} +- {res['is_std']:.3f}" if "is_mean" in res else "IS n/a"
    print(f"FID {res['fid']:.4f}  {is_text}  ({res['num_samples']} samples vs {res['ref']}, "
          f"{res['num_ref']} images)")
    print(f"wrote {out}")
    return 0


def run_digits(args: argparse.Namespace) -> int:
    from ddpmkit.evaluate.digits_metric import digits_fd
    from ddpmkit.evaluate.fid import load_samples
    from ddpmkit.sample_folder import samples_provenance

    out = _check_writable(Path(args.out) if args.out else _default_out(args.samples, "eval_digits.json"))
    images = load_samples(args.samples)
    res = digits_fd(images)
    res.update(kind="digits", samples=str(args.samples), **samples_provenance(args.samples, images))
    _write_json(out, res)
    real = res["real"]
    print(f"digits metric on {res['n']} samples (reference: {res['reference']})")
    print(f"{'':>24}{'samples':>12}{'real (held-out, n=' + str(real['n']) + ')':>28}")
    print(f"{'Frechet distance':>24}{res['fd']:>12.4f}{real['fd']:>28.4f}")
    print(f"{'classifier score (1-10)':>24}{res['score']:>12.4f}{real['score']:>28.4f}")
    print(f"{'class counts':>24}  {res['class_counts']}  real: {real['class_counts']}")
    if res["n"] > real["n"]:
        print(f"note: the held-out split has {real['n']} digits, fewer than the {res['n']} samples; "
              "the baseline is at that size", file=sys.stderr)
    print(f"wrote {out}")
    return 0
