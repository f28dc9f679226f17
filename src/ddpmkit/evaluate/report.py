"""`ddpm report RUN`: a report card of a training run, each number next to the paper's.

Reads RUN/config.json (the TrainConfig), RUN/metrics.jsonl (per-step loss and throughput),
RUN/model/ (the EMA U-Net: parameter count), the newest sample grid RUN/samples/step-*.png and
the results of ``ddpm eval`` found in RUN (``eval_bpd*.json``, ``eval_fid*.json``,
``eval_digits*.json``: in RUN or one folder below, or deeper, such as beside the samples of
``ddpm sample RUN`` in RUN/samples/<sampler>-<steps>/, when their sampling.json names this run's
weights). Writes OUT/report.md, OUT/report.json, OUT/loss_curve.png and OUT/samples.png (the
grid, enlarged nearest-neighbour to >= 512 px wide). Missing pieces are reported as such.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ddpmkit.charts import plot_lines
from ddpmkit.fileio import atomic_write_bytes, check_output_path, read_json_lines, read_json_object
from ddpmkit.images import enlarge, readable_scale, save_pil

__all__ = ["PAPER", "build_report"]

# Figures as published (Ho et al. 2020, Tables 1-3, Sec. 4, App. B; /work/shared/reference/paper.md).
PAPER: dict[str, dict[str, Any]] = {
    "cifar10": {
        "params": 35_746_307,
        "steps": 800_000,
        "batch_size": 128,
        "steps_per_s": 21.0,  # TPU v3-8
        "img_per_s": 21.0 * 128,
        "hardware": "TPU v3-8",
        "bpd": 3.75,  # L_simple model, test set (<=); the true-bound (L) model: 3.70
        "bpd_note": "<= 3.75 test (L_simple model); <= 3.70 for the model trained on the bound L",
        "rate_bpd": 1.78,
        "decoder_bpd": 1.97,
        "distortion_rmse": 0.95,
        "fid": 3.17,  # 50k samples vs the training set; vs the test set 5.24
        "fid_note": "3.17 vs train set (5.24 vs test set), 50,000 samples, EMA weights",
        "is_mean": 9.46,
        "is_note": "9.46 +- 0.11, 50,000 samples",
    },
    "256": {
        "params": 113_673_219,
        "batch_size": 64,
        "steps_per_s": 2.2,
        "img_per_s": 2.2 * 64,
        "hardware": "TPU v3-8",
        "fid_note": "LSUN Bedroom 6.36 (large model 4.90), Church 7.89, Cat 19.75 (Table 3)",
    },
}


def _dataset_kind(config: dict[str, Any]) -> str:
    preset = str(config.get("preset", "")).lower()
    data = str(config.get("data") or "digits").lower()
    if preset == "digits" or data == "digits":
        return "digits"
    if preset == "cifar10" or "cifar" in data:
        return "cifar10"
    if preset in ("celebahq256", "lsun256") or config.get("unet", {}).get("resolution") == 256:
        return "256"
    return "other"


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    # a line cut short by an interruption reads as None and is skipped
    return [r for _, r in read_json_lines(path) if isinstance(r, dict) and "step" in r]


def _find_evals(run: Path) -> dict[str, dict[str, Any]]:
    """The newest ``eval_<kind>*.json`` of each kind: in RUN or one folder below, or deeper in RUN
    (e.g. beside samples in RUN/samples/ddim-50/) when the samples it scored were drawn from this
    run's current weights, as their ``sampling.json`` records (``model_sha256``)."""
    found: dict[str, tuple[float, dict[str, Any]]] = {}
    near = [*run.glob("eval_*.json"), *run.glob("*/eval_*.json")]
    deep = [p for p in sorted(run.rglob("eval_*.json"))
            if len(p.relative_to(run).parts) > 2 and p.relative_to(run).parts[0] != "checkpoints"]
    hashes = _run_weights(run) if deep else set()
    for path in near + deep:
        try:
            data = read_json_object(path)
        except (OSError, ValueError):
            continue
        kind = data.get("kind")
        if path in deep and _sampled_from(path, data) not in hashes:
            continue
        if kind in ("bpd", "fid", "digits"):
            mtime = path.stat().st_mtime
            if kind not in found or mtime > found[kind][0]:
                found[kind] = (mtime, {**data, "file": str(path)})
    return {k: v for k, (_, v) in found.items()}


def _run_weights(run: Path) -> set[str]:
    """The weights hashes of RUN/model (EMA) and RUN/model_raw (``nn.folder.weights_sha256``)."""
    from ddpmkit.models import load_unet
    from ddpmkit.nn.folder import weights_sha256

    out = set()
    for ema in (True, False):
        try:
            out.add(weights_sha256(load_unet(run, ema=ema)))
        except (ValueError, FileNotFoundError, NotADirectoryError):
            pass
    return out


def _sampled_from(path: Path, data: dict[str, Any]) -> str | None:
    """The ``model_sha256`` in the sampling.json of the samples an evaluation scored: beside the
    evaluation, or in the folder of its ``samples`` path."""
    samples = Path(str(data.get("samples", "")))
    for folder in (path.parent, samples if samples.is_dir() else samples.parent):
        try:
            return read_json_object(folder / "sampling.json").get("model_sha256")
        except (OSError, ValueError):
            continue
    return None


def _param_count(run: Path) -> int | None:
    from ddpmkit.models import load_unet

    try:
        unet = load_unet(run)
    except (ValueError, FileNotFoundError, NotADirectoryError):
        return None
    return sum(p.numel() for p in unet.parameters())


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def build_report(run: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write the report card of training run ``run`` into ``out`` (default RUN/report); returns it."""
    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"{run}: not a training run directory (expected a folder with config.json)")
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{run}: no config.json; expected a training run directory written by `ddpm train`")
    config = read_json_object(cfg_path)
    out = check_output_path(Path(out) if out is not None else run / "report", folder=True)
    out.mkdir(parents=True, exist_ok=True)
    kind = _dataset_kind(config)
    paper = PAPER.get(kind, PAPER["cifar10"])  # no digits experiment in the paper: CIFAR-10 for scale
    metrics = _read_metrics(run / "metrics.jsonl")
    steps = metrics[-1]["step"] if metrics else None
    batch = config.get("batch_size")
    timed = metrics[1:] or metrics  # the first window includes start-up (and compilation)
    rates = [r["steps_per_s"] for r in timed if isinstance(r.get("steps_per_s"), int | float)]
    sps = statistics.median(rates) if rates else None
    evals = _find_evals(run)
    report: dict[str, Any] = {
        "run": str(run), "dataset": kind, "preset": config.get("preset"), "data": config.get("data"),
        "params": _param_count(run), "steps": steps, "target_steps": config.get("steps"),
        "batch_size": batch, "images_seen": steps * batch if steps is not None and batch else None,
        "steps_per_s": sps, "img_per_s": sps * batch if sps is not None and batch else None,
        "final_loss": metrics[-1].get("loss") if metrics else None, "evals": evals, "paper": paper,
    }
    files = _write_figures(run, out, metrics)
    report["files"] = files
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(out / "report.md", _markdown(report).encode())
    return report


def _write_figures(run: Path, out: Path, metrics: list[dict[str, Any]]) -> dict[str, str]:
    files: dict[str, str] = {}
    pts = [(r["step"], r["loss"]) for r in metrics if isinstance(r.get("loss"), int | float)]
    if pts:
        xs, ys = zip(*pts, strict=True)
        positive = all(y > 0 for y in ys)
        files["loss_curve"] = str(plot_lines(out / "loss_curve.png", {"training loss": (list(xs), list(ys))},
                                             title="Training loss", xlabel="step", ylabel="loss",
                                             logy=positive))
    grids = sorted((run / "samples").glob("step-*.png"))
    if grids:
        files["samples"] = str(_readable_copy(grids[-1], out / "samples.png"))
        files["samples_from"] = str(grids[-1])
    return files


def _readable_copy(src: Path, dst: Path, min_width: int = 512) -> Path:
    """``src`` copied to ``dst`` atomically, enlarged nearest-neighbour by the smallest whole factor
    that makes it >= ``min_width`` px wide (as is when it already is)."""
    from PIL import Image

    with Image.open(src) as im:
        return save_pil(enlarge(im, readable_scale(im.width, min_width)), dst)


def _row(name: str, ours: Any, paper: Any, digits: int = 4) -> str:
    return f"| {name} | {_fmt(ours, digits)} | {_fmt(paper, digits)} |"


def _markdown(r: dict[str, Any]) -> str:
    p, ev = r["paper"], r["evals"]
    scale = r["dataset"] not in PAPER
    note = (" The paper has no experiment on these data: its CIFAR-10 figures are shown for scale."
            if scale else "")
    lines = [f"# Report card: {r['run']}", "",
             f"Data: {r['data'] or 'digits'} (preset {r['preset']}).{note}", "",
             f"| quantity | this run | paper{' (CIFAR-10)' if scale else ''} |", "|---|---|---|",
             _row("parameters", r["params"], p.get("params")),
             _row("training steps", r["steps"], p.get("steps")),
             _row("batch size", r["batch_size"], p.get("batch_size")),
             _row("images seen", r["images_seen"],
                  p["steps"] * p["batch_size"] if "steps" in p and "batch_size" in p else None),
             _row("steps/s (median)", r["steps_per_s"], p.get("steps_per_s"), 2),
             _row("images/s", r["img_per_s"],
                  f"{p['img_per_s']:,.0f} ({p['hardware']})" if "img_per_s" in p else None, 1),
             _row("final training loss", r["final_loss"], None)]
    if "bpd" in ev:
        b = ev["bpd"]
        lines += [_row(f"NLL bits/dim ({b.get('num_examples')} images)", b.get("bpd"), p.get("bpd_note")),
                  _row("  L_T (prior)", b.get("prior_bpd"), None),
                  _row("  sum L_(t-1), t >= 2", b.get("sum_kl_bpd"), None),
                  _row("  rate = L_T + sum L_(t-1)", b.get("rate_bpd"), p.get("rate_bpd")),
                  _row("  L_0 (decoder, distortion)", b.get("decoder_bpd"), p.get("decoder_bpd")),
                  _row("  distortion RMSE [0, 255]", b.get("distortion_rmse"), p.get("distortion_rmse"))]
    if "fid" in ev:
        f = ev["fid"]
        lines += [_row(f"FID ({f.get('num_samples')} samples vs {f.get('ref')})", f.get("fid"),
                       p.get("fid_note")),
                  _row("IS", f.get("is_mean"), p.get("is_note"))]
    if "digits" in ev:
        d = ev["digits"]
        real = d.get("real", {})
        lines += [_row(f"digits Frechet distance ({d.get('n')} samples)", d.get("fd"),
                       f"real held-out digits: {_fmt(real.get('fd'))}"),
                  _row("digits classifier score (1-10)", d.get("score"),
                       f"real held-out digits: {_fmt(real.get('score'))}"),
                  _row("digits class counts", d.get("class_counts"), f"real: {real.get('class_counts')}")]
    wanted = ("bpd", "digits") if r["dataset"] == "digits" else ("bpd", "fid")
    missing = [k for k in wanted if k not in ev]
    if missing:
        lines += ["", "Not evaluated yet: " + ", ".join(f"`ddpm eval {k}`" for k in missing) + "."]
    for w in ev.get("fid", {}).get("warnings", []):
        lines += ["", f"Warning: {w}."]
    files = r["files"]
    if "samples" in files:
        lines += ["", f"## Samples ({Path(files['samples_from']).name})", "", "![samples](samples.png)"]
    if "loss_curve" in files:
        lines += ["", "## Training loss", "", "![loss curve](loss_curve.png)"]
    return "\n".join(lines) + "\n"
