"""Negative log-likelihood in bits/dim through the full T-step variational bound, eq. (5).

    L = L_T + sum_{t=2}^{T} L_{t-1} + L_0     (paper's 1-based t)

per example from ``GaussianDiffusion.calc_bpd_loop``, averaged over a data set, with the rate and
distortion of progressive coding (Sec. 4.3, Table 4, Fig. 5): having received x_t (paper time t),
the rate is the bits sent so far, L_T + sum_{s=t}^{T-1} L_s, and the distortion is the RMSE of the
prediction of x_0 from x_t on the [0, 255] scale. At t = 1 the rate is L_T + sum_{t>=1} L_t and the
remaining L_0 is the distortion term (the paper's 1.78 / 1.97 bits/dim on CIFAR-10).
``rate_distortion`` gives the same by t for one batch of images (``ddpm figure rate-distortion``)
and ``format_rate_distortion_table`` writes its Table 4 as text.

Results are appended batch by batch to a JSONL file (``partial_path``, locked while written): a
header line with the settings (the SHA-256 of the weights and of the examples among them), then
one line per finished batch with its example indices, per-example total and prior
bits/dim, and the batch's sums of every term by t. A rerun with the same settings skips the
batches already there, and the noise of batch b comes from a generator seeded with (seed, b), so
an interrupted and resumed evaluation gives exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpmkit import schema
from ddpmkit.checks import check_int
from ddpmkit.fileio import RunLock, append_line_synced, atomic_write_bytes, read_json_lines
from ddpmkit.nn.folder import weights_sha256
from ddpmkit.seeds import Stream, derived_generator

__all__ = ["evaluate_bpd", "format_rate_distortion_table", "rate_distortion", "rate_distortion_by_t",
           "rate_distortion_table", "table4_reverse_times"]

PARTIAL_FORMAT = "ddpmkit.bpd_partial"


def _weights_sha256(model: Any) -> str | None:
    """``nn.folder.weights_sha256`` of an nn.Module (a sample folder's digest), None for another callable."""
    return weights_sha256(model) if isinstance(model, torch.nn.Module) else None


def _data_sha256(dataset: Any, total: int, batch_size: int) -> str:
    """SHA-256 over the first ``total`` examples as evaluated (dtype, shape, bytes of each batch)."""
    h = hashlib.sha256()
    for start in range(0, total, batch_size):
        x = _load_batch(dataset, list(range(start, min(start + batch_size, total)))).cpu().contiguous()
        h.update(f"{x.dtype}|{tuple(x.shape)}|".encode())
        h.update(x.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_batch(dataset: Any, idx: list[int]) -> torch.Tensor:
    return dataset.get_batch(idx) if hasattr(dataset, "get_batch") else torch.stack([dataset[i] for i in idx])


_RECORD_SCHEMA = {"batch": int, "start": int, "stop": int, "total_bpd": [float], "prior_bpd": [float],
                  "vb_sum": [float], "x0_mse_sum": [float]}


def _record_problem(record: Any, b: int, header: dict[str, Any]) -> str | None:
    """Why ``record`` is not batch ``b`` of the evaluation ``header`` describes, or None."""
    if record is None:
        return "torn or not valid JSON"
    shape = schema.problem(record, _RECORD_SCHEMA)
    if shape is not None:
        return shape
    start, stop = b * header["batch_size"], min((b + 1) * header["batch_size"], header["n"])
    n, T = stop - start, header["num_timesteps"]
    if (record["batch"], record["start"], record["stop"]) != (b, start, stop) or start >= stop:
        return f"not batch {b} (examples {start}..{stop - 1})"
    if (len(record["total_bpd"]), len(record["prior_bpd"]), len(record["vb_sum"]),
            len(record["x0_mse_sum"])) != (n, n, T, T):
        return f"lists not of lengths ({n}, {n}, {T}, {T})"
    if not all(math.isfinite(v) for key in ("total_bpd", "prior_bpd", "vb_sum", "x0_mse_sum")
               for v in record[key]):
        return "a value that is not finite"  # our bound terms are finite; this record was edited
    return None


def _read_partial(path: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished batches of a partial file made with ``header``'s settings ([] if none). The first
    record that is not the next batch (torn by an interruption, or edited) and all after it are
    dropped with a warning naming the file: those batches are redone."""
    if not path.is_file():
        return []
    lines = read_json_lines(path)
    old = lines[0][1] if lines else None
    if old != header:
        differ = (", ".join(sorted(k for k in {*old, *header} if old.get(k) != header.get(k)))
                  if isinstance(old, dict) else "the header is not valid JSON")
        raise ValueError(f"{path} holds a bits/dim evaluation with other settings (differing: {differ}); "
                         "delete it or choose another --out")
    batches = []
    for b, (_, record) in enumerate(lines[1:]):
        why = _record_problem(record, b, header)
        if why is not None:
            warnings.warn(f"{path} line {b + 2}: {why}; batch {b} and later are computed again",
                          RuntimeWarning, stacklevel=3)
            break
        batches.append(record)
    return batches


def _run_batch(model: Any, diffusion: Any, x0: torch.Tensor, *, seed: int, batch: int,
               clip_denoised: bool, t_chunk: int | None) -> dict[str, Any]:
    g = derived_generator(seed, Stream.BPD_BATCH, batch)  # CPU: the same noise on any device
    out = diffusion.calc_bpd_loop(model, x0, clip_denoised=clip_denoised, t_chunk=t_chunk, generator=g)
    vb, x0_mse = out["vb"].double().cpu(), out["x0_mse"].double().cpu()  # (B, T) each
    return {
        "total_bpd": out["total_bpd"].double().cpu().tolist(),
        "prior_bpd": out["prior_bpd"].double().cpu().tolist(),
        "vb_sum": vb.sum(0).tolist(),  # (T,) sums over the batch's examples
        "x0_mse_sum": x0_mse.sum(0).tolist(),
    }


def evaluate_bpd(
    model: Any, diffusion: Any, dataset: Any, *, n: int | None = None, batch_size: int = 64,
    t_chunk: int | None = None, clip_denoised: bool = True, seed: int = 0,
    partial_path: str | os.PathLike | None = None, settings: dict[str, Any] | None = None,
    device: str | torch.device = "cpu", progress: bool = False,
) -> dict[str, Any]:
    """Bits/dim of the first ``n`` examples of ``dataset`` (default all) under ``model``.

    model: any callable (x_t (B, C, H, W), t (B,)) -> output; diffusion: a GaussianDiffusion;
    dataset: ``ds[i]`` -> (C, H, W) float in [-1, 1] (``get_batch(indices)`` used when present).
    ``settings`` (JSON-able) identify the run in the partial file's header, beside everything that
    changes the value: n, batch size, seed, T, clipping, the SHA-256 of the examples and, when
    ``model`` is an nn.Module, of its weights. A partial file is locked while it is written (one
    evaluation per file). Returns a dict (see ``summarize``): bpd and its standard error, L_T, sum
    of L_{t-1} (t >= 2), L_0, "by_t", and "settings" (the header).
    """
    total = len(dataset) if n is None else int(n)
    if total < 1 or total > len(dataset):
        raise ValueError(f"n must be between 1 and the {len(dataset)} examples of the data, got {n}")
    check_int(batch_size, "batch_size", low=1)
    header = {"format": PARTIAL_FORMAT, "version": 2, "n": total, "batch_size": batch_size, "seed": seed,
              "num_timesteps": diffusion.num_timesteps, "clip_denoised": clip_denoised, **(settings or {}),
              "weights_sha256": _weights_sha256(model),
              "data_sha256": _data_sha256(dataset, total, batch_size)}
    path = Path(partial_path) if partial_path is not None else None
    if path is None:
        return _evaluate(model, diffusion, dataset, header, None, [], t_chunk=t_chunk, device=device,
                         progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with RunLock(path.parent, name=f".{path.name}.lock", what=str(path)):
        done = _read_partial(path, header)
        # rewriting the header and the complete records drops a torn last line
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in [header, *done]).encode())
        return _evaluate(model, diffusion, dataset, header, path, done, t_chunk=t_chunk, device=device,
                         progress=progress)


def _evaluate(model: Any, diffusion: Any, dataset: Any, header: dict[str, Any], path: Path | None,
              done: list[dict[str, Any]], *, t_chunk: int | None, device: str | torch.device,
              progress: bool) -> dict[str, Any]:
    """The batches after ``done``, each appended to ``path`` when given; then the summary."""
    from ddpmkit.logs import progress_bar

    total, batch_size, seed = header["n"], header["batch_size"], header["seed"]
    num_batches = math.ceil(total / batch_size)
    start_time = time.perf_counter()
    with progress_bar(total=total, initial=min(len(done) * batch_size, total), disable=not progress,
                      desc="bits/dim", unit="img") as bar:
        for b in range(len(done), num_batches):
            idx = list(range(b * batch_size, min((b + 1) * batch_size, total)))
            x0 = _load_batch(dataset, idx).to(device)
            record = {"batch": b, "start": idx[0], "stop": idx[-1] + 1,
                      **_run_batch(model, diffusion, x0, seed=seed, batch=b,
                                   clip_denoised=header["clip_denoised"], t_chunk=t_chunk)}
            if path is not None:
                append_line_synced(path, json.dumps(record))
            done.append(record)
            bar.update(len(idx))
            bar.set_postfix(bpd=f"{np.mean([v for r in done for v in r['total_bpd']]):.4f}")
    result = summarize(done, num_timesteps=header["num_timesteps"])
    result["seconds"] = time.perf_counter() - start_time
    result["settings"] = header
    return result


def summarize(batches: list[dict[str, Any]], *, num_timesteps: int) -> dict[str, Any]:
    """Combine per-batch records into the bound's terms (bits/dim, means over examples).

    by_t lists, for 0-based index i = paper's t - 1 (i = 0 .. T-1): "L" = the term L_i of eq. (5)
    (i = 0 is the decoder L_0, i >= 1 the KL L_i), "rate" = L_T + sum_{s > i} L_s and "distortion"
    = sqrt(mean ||x0_hat(x_t) - x0||^2 / dim) * 127.5 (RMSE on [0, 255]).
    """
    totals = np.array([v for r in batches for v in r["total_bpd"]], np.float64)
    priors = np.array([v for r in batches for v in r["prior_bpd"]], np.float64)
    n = totals.shape[0]
    vb = np.sum([r["vb_sum"] for r in batches], axis=0) / n  # (T,)
    x0_mse = np.sum([r["x0_mse_sum"] for r in batches], axis=0) / n  # (T,)
    assert vb.shape == (num_timesteps,), vb.shape
    prior = float(priors.mean())
    rate, distortion = rate_distortion_by_t(vb, x0_mse, prior)
    return {
        "bpd": float(totals.mean()),
        "bpd_stderr": float(totals.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "num_examples": n,
        "prior_bpd": prior,  # L_T
        "sum_kl_bpd": float(vb[1:].sum()),  # sum_{t=2}^{T} L_{t-1}
        "decoder_bpd": float(vb[0]),  # L_0
        "rate_bpd": float(rate[0]),  # L_T + sum_{t>=2} L_{t-1}: the rate at t = 1 (Sec. 4.3)
        "distortion_rmse": float(distortion[0]),
        "by_t": {"L": vb.tolist(), "rate": rate.tolist(), "distortion": distortion.tolist()},
    }


def rate_distortion_by_t(vb: np.ndarray, x0_mse: np.ndarray,
                         prior_bpd: float) -> tuple[np.ndarray, np.ndarray]:
    """Progressive coding (Sec. 4.3) from the bound's mean terms; the one place it is computed.

    vb: (T,) mean L_i in bits/dim (0-based i, i = 0 the decoder); x0_mse: (T,) mean
    ||x0_hat(x_i) - x0||^2 / dim; prior_bpd: mean L_T. Returns (rate, distortion), (T,) float64:
    rate[i] = L_T + sum_{s > i} L_s (bits received once x_i is known) and distortion[i] =
    127.5 sqrt(x0_mse[i]) (RMSE on [0, 255]).
    """
    vb, x0_mse = np.asarray(vb, np.float64), np.asarray(x0_mse, np.float64)
    rate = prior_bpd + (np.cumsum(vb[::-1])[::-1] - vb)  # (T,)
    return rate, np.sqrt(x0_mse) * 127.5


def rate_distortion_table(result: dict[str, Any], rows: int = 10) -> list[tuple[int, float, float]]:
    """Table 4's rows: (reverse process time T - t + 1, rate in bits/dim, distortion RMSE [0, 255])
    at reverse times T, (rows - 1) T / rows, ..., T / rows (the paper's rows for rows = 10)."""
    rate, dist = result["by_t"]["rate"], result["by_t"]["distortion"]
    T = len(rate)
    return [(k, rate[T - k], dist[T - k]) for k in table4_reverse_times(T, rows)]  # t = T-k+1 -> index T-k


def table4_reverse_times(T: int, rows: int = 10) -> list[int]:
    """The reverse process times k = T - t + 1 of Table 4's rows: T, (rows - 1) T / rows, ..., T / rows
    (rounded, at least 1); row k reads index T - k of a (T,) by-t array."""
    return [max(1, round(T * (rows - i) / rows)) for i in range(rows)]


def rate_distortion(model: Any, diffusion: Any, x0: torch.Tensor, *, seed: int = 0,
                    t_chunk: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Rate and distortion along the reverse process (Sec. 4.3, Fig. 5, Table 4) on images x0
    (B, C, H, W) in [-1, 1], from the terms of ``calc_bpd_loop``, averaged over the images.

    With 0-based t (x_t is the paper's x_{t+1}): rate[t] = L_T + sum_{k > t} vb[k], the bits/dim
    received once x_t is known (the decoder term vb[0] excluded), and distortion[t] =
    RMSE(pred_x0(x_t), x_0) on the [0, 255] scale = 127.5 sqrt(x0_mse[t]). Returns a JSON-able dict
    with per-t lists, the totals (rate = rate[0], distortion = the decoder's vb[0], total_bpd) and a
    Table-4-style list of rows at reverse-process times T, 0.9 T, ..., 0.1 T."""
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on any device
    terms = diffusion.calc_bpd_loop(model, x0, generator=g, t_chunk=t_chunk, progress=progress)
    vb = terms["vb"].double().mean(0).cpu().numpy()  # (T,)
    prior = float(terms["prior_bpd"].double().mean())
    T = vb.shape[0]
    rate, distortion = rate_distortion_by_t(vb, terms["x0_mse"].double().mean(0).cpu().numpy(), prior)
    by_t = {"rate": rate.tolist(), "distortion": distortion.tolist()}
    table = [{"reverse_time": r, "t": T - r + 1, "rate_bpd": rt, "distortion_rmse": d}  # paper's 1-based t
             for r, rt, d in rate_distortion_table({"by_t": by_t})]
    return {
        "num_images": int(x0.shape[0]),
        "num_timesteps": T,
        "total_bpd": float(terms["total_bpd"].double().mean()),
        "rate_bpd": float(rate[0]),
        "distortion_bpd": float(vb[0]),
        "prior_bpd": prior,
        "rate": rate.tolist(),
        "distortion_rmse": distortion.tolist(),
        "table": table,
    }


def format_rate_distortion_table(rd: dict[str, Any]) -> str:
    """Table 4 of the paper as text: reverse-process time, rate (bits/dim), distortion (RMSE)."""
    lines = [
        f"rate {rd['rate_bpd']:.5f} + distortion {rd['distortion_bpd']:.5f} = "
        f"{rd['total_bpd']:.5f} bits/dim on {rd['num_images']} images",
        f"{'reverse time (T-t+1)':>22}  {'rate (bits/dim)':>16}  {'distortion (RMSE [0,255])':>26}",
    ]
    lines += [f"{r['reverse_time']:>22}  {r['rate_bpd']:>16.5f}  {r['distortion_rmse']:>26.5f}"
              for r in rd["table"]]
    return "\n".join(lines)
