"""Samplers for a trained reverse process: plain functions, a model argument, noise generators.

- ``sample_ancestral``: Algorithm 2 of the paper, x_{t-1} = mu_theta(x_t, t) + sigma_t z with the
  model's variance type and x_0 clipping; no noise at the last step. On fewer ``timesteps`` it runs
  the respaced chain (``SpacedDiffusion``, Nichol & Dhariwal; docs/math.md Sec. 10).
- ``sample_ddim``: DDIM (Song, Meng, Ermon 2021, eq. 12) with its eta; ``ddim_invert`` encodes.
- ``p_sample``, ``ddim_step``: the public single steps every sampler is built from.
- ``sample_progressive``, ``sample_from_xt``, ``reconstruct``, ``interpolate``,
  ``sample_shared_xt``: the chains behind the paper's Figures 6-9.

The sampler contract: ``sample_X(model, diffusion, shape, *, timesteps, generator, clip_denoised,
x_T, device, progress, callback, <options>)``; ``timesteps`` is None (all T), a count, an
improved-diffusion string ("ddim50", "10,15,20") or a list (``parse_timesteps``); ``callback(step,
t, x_t, pred_x0)`` runs after each step. Arguments are checked once, not at every step.

Noise. Every sampler takes ``generator``: ``None`` (torch's global RNG), one ``torch.Generator``
(the batch's noise drawn at once), or a sequence of generators, one per sample: sample i then
draws all of its noise from its own stream, so its result does not depend on the batch it is in.
``sample_generators(seed, indices)`` builds those streams (seeded by (seed, index)). Noise is drawn
on the generator's device (the CPU for ``sample_generators``) in float32 and then moved, so a seed
gives the same noise on every device.

Shapes: x, x_t, x0: (B, C, ...) float; t: a Python int (one timestep for the whole batch) or (B,)
int64; timesteps are 0-based (index t is the paper's t + 1). The model is any callable
``model(x_t, t) -> Tensor`` with t (B,) int64. This module imports the math only, never the network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from typing import Any

import numpy as np
import torch

from ddpmkit.diffusion import GaussianDiffusion, SpacedDiffusion, draw_standard_normal
from ddpmkit.enums import parse_enum
from ddpmkit.seeds import Stream, check_nonneg_int, derive_seed

__all__ = [
    "Callback",
    "Encoder",
    "Generators",
    "SamplerType",
    "SpacedDiffusion",
    "Timesteps",
    "ddim_invert",
    "ddim_mean_variance",
    "ddim_step",
    "draw_noise",
    "improved_diffusion_timesteps",
    "interpolate",
    "p_sample",
    "p_sample_loop_progressive",
    "parse_timesteps",
    "prepare_model",
    "reconstruct",
    "respace_diffusion",
    "sample",
    "sample_ancestral",
    "sample_ddim",
    "sample_from_xt",
    "sample_generators",
    "sample_progressive",
    "sample_respaced",
    "sample_seed",
    "sample_shared_xt",
    "space_timesteps",
    "timesteps_from_text",
]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


class SamplerType(str, Enum):
    """How to run the reverse process."""

    DDPM = "ddpm"  # Algorithm 2 (all T steps), or respaced on S strided steps
    DDIM = "ddim"  # Song et al. eq. (12) with eta


# ---------------------------------------------------------------------------------- noise
def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s noise stream: ``derive_seed(seed, Stream.SAMPLES, index)``, a
    63-bit hash, so nearby seeds and indices give unrelated streams (ddpmkit.seeds)."""
    return derive_seed(check_nonneg_int(seed, "seed"), Stream.SAMPLES, check_nonneg_int(index, "index"))


def sample_generators(seed: int, indices: Sequence[int] | range) -> list[torch.Generator]:
    """One CPU generator per sample index, seeded by ``sample_seed(seed, index)``."""
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]


draw_noise = draw_standard_normal  # the samplers' name for the one noise stream (ddpmkit.diffusion)


def _clone_generator(g: torch.Generator) -> torch.Generator:
    """A generator on g's device in g's current state (the two then draw the same numbers)."""
    c = torch.Generator(device=g.device)
    c.set_state(g.get_state())
    return c


# ---------------------------------------------------------------------------------- timesteps
Timesteps = int | str | Sequence[int] | None


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly strided over [0, T-1], both ends included, increasing:
    round(i (T - 1) / (S - 1)) for i = 0..S-1, Python's round (ties to even) of the exact ratio
    (all T when S = T; [T - 1] when S = 1). This is the rounding of a count; improved-diffusion's
    string "S" (``improved_diffusion_timesteps``) accumulates the stride instead and can differ
    by one step at ties."""
    T = num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}] (the model's T = {T}), got {steps!r}")
    steps = int(steps)
    if steps == 1:
        return [T - 1]
    kept = [round(i * (T - 1) / (steps - 1)) for i in range(steps)]
    assert len(set(kept)) == steps, kept
    return kept


def improved_diffusion_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """improved-diffusion's ``space_timesteps(T, spec)`` (Nichol & Dhariwal's
    ``--timestep_respacing``), sorted: "ddimN" is range(0, T, stride) for the smallest stride that
    gives N steps; "a,b,c" splits [0, T) into equal sections (the first T mod n one longer) and
    takes a, b, c steps in them, each at start + round(j stride) with stride = (size - 1) /
    (count - 1) accumulated in floating point (their arithmetic and Python's round, ties included)."""
    T = num_timesteps
    text = spec.strip()
    if text.startswith("ddim"):
        n = text[len("ddim"):]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"timesteps {spec!r}: expected 'ddimN' with N a positive int")
        for stride in range(1, T):
            if len(range(0, T, stride)) == int(n):
                return list(range(0, T, stride))
        raise ValueError(f"timesteps {spec!r}: no integer stride gives exactly {n} of T = {T} steps")
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise ValueError(
            f"timesteps {spec!r}: expected 'ddimN' or comma-separated section counts like '10,15,20'"
        )
    counts = [int(p) for p in parts]
    size_per, extra = divmod(T, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"timesteps {spec!r}: section {i} has {size} steps, cannot take {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def parse_timesteps(num_timesteps: int, timesteps: Timesteps) -> list[int]:
    """The kept timesteps, increasing, from what the user gives: None (all T), a count S
    (``space_timesteps``), an improved-diffusion string ("ddim50", "10,15,20":
    ``improved_diffusion_timesteps``), or an explicit sequence of distinct 0-based timesteps
    (any order, as diffusers' ``timesteps=[...]``)."""
    T = num_timesteps
    if timesteps is None:
        return list(range(T))
    if isinstance(timesteps, str):
        return improved_diffusion_timesteps(T, timesteps)
    if isinstance(timesteps, (int, np.integer)) and not isinstance(timesteps, bool):
        return space_timesteps(T, int(timesteps))
    if isinstance(timesteps, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(timesteps, bool):
        ks = [k.item() if hasattr(k, "item") else k for k in timesteps]
        if ks and all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < T for k in ks) and (
            len(set(ks)) == len(ks)
        ):
            return sorted(ks)
        raise ValueError(f"a timestep list must hold distinct ints in [0, {T - 1}], got {list(timesteps)!r}")
    raise ValueError(f"timesteps must be None, a count, a string like 'ddim50' or a list, got {timesteps!r}")


def respace_diffusion(diffusion: GaussianDiffusion, timesteps: Timesteps) -> SpacedDiffusion:
    """``SpacedDiffusion`` on the kept ``timesteps`` (any form ``parse_timesteps`` takes): a public
    diffusion that calls the model with the original timesteps itself."""
    return SpacedDiffusion(base=diffusion, timesteps=parse_timesteps(diffusion.num_timesteps, timesteps))


# ---------------------------------------------------------------------------------- the contract
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], Any]


def _t_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)  # (B,)


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, C, ...) with positive sizes, got {shape}")
    return shape


def _x_start(
    shape: Sequence[int], x_T: torch.Tensor | None, generator: Generators, device: Any
) -> torch.Tensor:
    """x_T ~ N(0, I) (drawn first from each noise stream), or the given x_T."""
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
            raise ValueError(f"x_T must be a floating-point tensor, got {type(x_T).__name__}")
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T must have shape {tuple(shape)}, got {tuple(x_T.shape)}")
        return x_T if device is None else x_T.to(device)
    return draw_noise(_check_shape(shape), generator, device=device or "cpu", dtype=torch.float32)


def _check_eta(eta: Any) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"eta must be a float >= 0, got {eta!r}")
    return float(eta)


def _check_x_batch(diffusion: GaussianDiffusion, x: Any, name: str) -> None:
    diffusion._check_x(x, name, min_ndim=2)


def _run(
    step_fn: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    kept: Sequence[int],
    callback: Callback | None,
    progress: bool,
    desc: str,
) -> torch.Tensor:
    """The sampler contract's loop: for step = 0, 1, ... at position i = S-1-step (timestep
    kept[i]), (x_prev, pred_x0) = step_fn(i, x_t); then callback(step, kept[i], x_t, pred_x0);
    the tqdm bar (``progress``) is one more callback. Returns the last x_prev."""
    from ddpmkit.logs import progress_bar

    callbacks = [callback] if callback is not None else []
    bar = progress_bar(total=len(kept), disable=not progress, desc=desc, unit="step", leave=False)
    callbacks.append(lambda *_: bar.update(1))
    try:
        for step, i in enumerate(range(len(kept) - 1, -1, -1)):
            x_prev, pred_x0 = step_fn(i, x)
            for cb in callbacks:
                cb(step, kept[i], x, pred_x0)
            x = x_prev
    finally:
        bar.close()
    return x


# ---------------------------------------------------------------------------------- Algorithm 2
def p_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    *,
    noise: torch.Tensor | None,
    clip_denoised: bool = True,
) -> dict[str, torch.Tensor]:
    """One step of Algorithm 2, line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with z = 0 where
    t = 0 (the paper's t = 1) or when ``noise`` is None.

    x_t: (B, C, ...); t: an int or (B,) int64 index of ``diffusion`` (of a ``SpacedDiffusion``: a
    kept position, the model then sees the kept timestep); noise z: x_t's shape or None.
    Returns ``p_mean_variance``'s dict plus ``sample`` = x_{t-1}, all of x_t's shape.
    """
    _check_x_batch(diffusion, x_t, "x_t")
    tt = _t_batch(t, x_t) if isinstance(t, int) and not isinstance(t, bool) else t
    diffusion._check_t(tt, x_t.shape[0])
    if noise is not None:
        diffusion._check_like(noise, x_t, "noise", "x_t")
    return _p_sample(model, diffusion, x_t, tt, noise, clip_denoised)


def _p_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    tt: torch.Tensor,
    noise: torch.Tensor | None,
    clip_denoised: bool,
) -> dict[str, torch.Tensor]:
    p = diffusion._p_mean_variance_model(model, x_t, tt, clip_denoised)
    if noise is None:
        p["sample"] = p["mean"]
        return p
    nonzero = (tt != 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))  # (B, 1, ..., 1)
    p["sample"] = p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise  # Algorithm 2, line 4
    return p


def _chain_for(diffusion: GaussianDiffusion, kept: list[int]) -> GaussianDiffusion:
    """The diffusion whose position i is kept[i]: itself for 0, 1, ..., t, else the respaced one."""
    if kept == list(range(len(kept))):
        return diffusion
    if len(kept) < 2:
        raise ValueError(f"the ddpm sampler needs at least 2 timesteps, got {kept}")
    return SpacedDiffusion(base=diffusion, timesteps=kept)


def _ancestral_chain(
    model: Model,
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    kept: list[int],
    *,
    generator: Generators,
    clip_denoised: bool,
    callback: Callback | None,
    progress: bool,
) -> torch.Tensor:
    """Algorithm 2 from x at kept[-1] over the kept timesteps (respaced when some are skipped)."""
    chain = _chain_for(diffusion, kept)

    def step(i: int, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = draw_noise(x_t.shape, generator, device=x_t.device, dtype=x_t.dtype) if i > 0 else None
        p = _p_sample(model, chain, x_t, _t_batch(i, x_t), z, clip_denoised)
        return p["sample"], p["pred_x0"]

    return _run(step, x, kept, callback, progress, "sampling")


@torch.inference_mode()
def sample_ancestral(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    timesteps: Timesteps = None,
    generator: Generators = None,
    clip_denoised: bool = True,
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Algorithm 2: x_T ~ N(0, I), then x_{t-1} = mu_theta(x_t, t) + sigma_t z for t = T, ..., 1;
    on fewer ``timesteps`` (``parse_timesteps``) the respaced chain (``SpacedDiffusion``).

    The sampler contract (every sampler): shape (B, C, H, W), ``timesteps``, ``generator``,
    ``clip_denoised``, ``x_T``, ``device``, ``progress``, and ``callback(step, t, x_t, pred_x0)``
    after each step (t the original timestep; x_t, pred_x0 (B, C, H, W)). Returns x_0 (B, C, H, W)
    on ``device`` (clipped only through pred_x0; quantise at the edge).
    """
    kept = parse_timesteps(diffusion.num_timesteps, timesteps)
    x = _x_start(shape, x_T, generator, device)
    return _ancestral_chain(model, diffusion, x, kept, generator=generator, clip_denoised=clip_denoised,
                            callback=callback, progress=progress)


def sample_respaced(
    model: Model, diffusion: GaussianDiffusion, shape: Sequence[int], *, steps: int, **kw: Any
) -> torch.Tensor:
    """``sample_ancestral`` on ``steps`` evenly strided timesteps (``space_timesteps``)."""
    T = diffusion.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= T:
        raise ValueError(f"steps must be an int in [2, {T}] for the ddpm sampler (T = {T}), got {steps!r}")
    return sample_ancestral(model, diffusion, shape, timesteps=steps, **kw)


@torch.inference_mode()
def sample_from_xt(
    model: Model,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int,
    *,
    generator: Generators = None,
    clip_denoised: bool = True,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """x_0 ~ p_theta(x_0 | x_t): the reverse chain of Algorithm 2 run from timestep t. (B, C, ...)."""
    t = _check_t_index(t, diffusion, "t_start")
    _check_x_batch(diffusion, x_t, "x_t")
    return _ancestral_chain(model, diffusion, x_t, list(range(t + 1)), generator=generator,
                            clip_denoised=clip_denoised, callback=callback, progress=progress)


def p_sample_loop_progressive(
    model: Model,
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    *,
    t_start: int | None = None,
    generator: Generators = None,
    clip_denoised: bool = True,
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """The reverse chain of Algorithm 2 from x = x_{t_start} (default T - 1), one ``p_sample`` per
    t = t_start, ..., 0, yielding {"t", "x_t", "pred_x0", "sample": x_{t-1}}; the last is x_0."""
    T = diffusion.num_timesteps
    t_start = _check_t_index(T - 1 if t_start is None else t_start, diffusion, "t_start")
    _check_x_batch(diffusion, x, "x")
    from ddpmkit.logs import progress_bar

    for t in progress_bar(iterable=range(t_start, -1, -1), disable=not progress, desc="sampling", unit="step",
                          leave=False):
        with torch.inference_mode():
            z = draw_noise(x.shape, generator, device=x.device, dtype=x.dtype) if t > 0 else None
            p = _p_sample(model, diffusion, x, _t_batch(t, x), z, clip_denoised)
        yield {"t": t, "x_t": x, "pred_x0": p["pred_x0"], "sample": p["sample"]}
        x = p["sample"]


# ---------------------------------------------------------------------------------- DDIM
def ddim_mean_variance(
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    pred_x0: torch.Tensor,
    pred_eps: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, float]:
    """One DDIM step from timestep t to t_prev < t (t_prev = -1: to x_0, abar = 1), Song et al. eq. (12):

        sigma^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)
        mean    = sqrt(abar_prev) pred_x0 + sqrt(1 - abar_prev - sigma^2) pred_eps

    x_t, pred_x0, pred_eps: (B, C, ...). Returns (mean of x_t's shape, sigma^2 as a float).
    With t_prev = t - 1 and eta = 1, sigma^2 = beta-tilde_t and the mean is mu-tilde_t(x_t, pred_x0).
    """
    if not -1 <= t_prev < t < diffusion.num_timesteps:
        raise ValueError(f"expected -1 <= t_prev < t < {diffusion.num_timesteps}, got t={t}, t_prev={t_prev}")
    eta = _check_eta(eta)
    abar_t = float(diffusion.alphas_cumprod[t])
    abar_prev = float(diffusion.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    var = eta**2 * (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    coef_eps = math.sqrt(max(1.0 - abar_prev - var, 0.0))
    return math.sqrt(abar_prev) * pred_x0 + coef_eps * pred_eps, var


def ddim_step(
    model: Model,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = True,
) -> dict[str, torch.Tensor]:
    """One DDIM step x_t -> x_{t_prev} (Song et al. eq. 12; t_prev = -1 lands on x_0): the model's
    pred_x0 (clipped when ``clip_denoised``) and the eps it implies give the mean of
    ``ddim_mean_variance``; sigma z is added when sigma > 0 (``noise`` z then required).

    x_t: (B, C, ...); t, t_prev: ints. Returns {"sample": x_{t_prev}, "pred_x0", "pred_eps"}, x_t's shape.
    """
    _check_x_batch(diffusion, x_t, "x_t")
    t = _check_t_index(t, diffusion)
    if isinstance(t_prev, bool) or not isinstance(t_prev, int) or not -1 <= t_prev < t:
        raise ValueError(f"t_prev must be an int in [-1, t - 1] = [-1, {t - 1}], got {t_prev!r}")
    eta = _check_eta(eta)
    if noise is not None:
        diffusion._check_like(noise, x_t, "noise", "x_t")
    return _ddim_step(model, diffusion, x_t, t, t_prev, eta, lambda: noise, clip_denoised, strict=True)


def _ddim_step(
    model: Model,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float,
    get_noise: Callable[[], torch.Tensor | None],
    clip_denoised: bool,
    strict: bool = False,
) -> dict[str, torch.Tensor]:
    p = diffusion._p_mean_variance_model(model, x_t, _t_batch(t, x_t), clip_denoised)
    mean, var = ddim_mean_variance(diffusion, x_t, t, t_prev, p["pred_x0"], p["pred_eps"], eta)
    out = {"sample": mean, "pred_x0": p["pred_x0"], "pred_eps": p["pred_eps"]}
    if var > 0:
        z = get_noise()
        if z is None:
            raise ValueError(f"eta = {eta} > 0 adds noise at this step: pass noise of x_t's shape")
        out["sample"] = mean + math.sqrt(var) * z
    return out


@torch.inference_mode()
def sample_ddim(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    timesteps: Timesteps = None,
    eta: float = 0.0,
    generator: Generators = None,
    clip_denoised: bool = True,
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (``ddim_step``) over the kept ``timesteps`` (``parse_timesteps``; default all T), the
    last step to x_0; eta = 0 is deterministic given x_T, eta = 1 with all T steps is Algorithm 2
    with sigma_t^2 = beta-tilde_t. A learned variance is ignored. The contract of
    ``sample_ancestral``. shape: (B, C, H, W) -> x_0 of that shape."""
    kept = parse_timesteps(diffusion.num_timesteps, timesteps)
    eta = _check_eta(eta)
    x = _x_start(shape, x_T, generator, device)
    prevs = [-1, *kept[:-1]]

    def step(i: int, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def noise() -> torch.Tensor:
            return draw_noise(x_t.shape, generator, device=x_t.device, dtype=x_t.dtype)

        out = _ddim_step(model, diffusion, x_t, kept[i], prevs[i], eta, noise, clip_denoised)
        return out["sample"], out["pred_x0"]

    return _run(step, x, kept, callback, progress, "ddim")


@torch.inference_mode()
def ddim_invert(
    model: Model,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    timesteps: Timesteps = None,
    *,
    clip_denoised: bool = False,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM encoding x_0 -> x_{k_{S-1}} (eq. 12 with eta = 0 run forward; Song et al.
    Sec. 4.3, improved-diffusion's ``ddim_reverse_sample``): from x at k_{i-1} (x_0 for i = 0, read
    by the model at k_0), x_{k_i} = sqrt(abar_{k_i}) pred_x0 + sqrt(1 - abar_{k_i}) eps, with eps and
    pred_x0 the model's at x_{k_{i-1}}: the sampler's step with eps taken one step early.
    ``sample_ddim(x_T=..., timesteps=..., eta=0)``
    from the result gives x_0 back up to the change of eps over one step (exact as the steps shrink).
    x0: (B, C, ...). Returns the encoding, x0's shape. callback(step, t, x, pred_x0) per step, t = k_i.
    """
    kept = parse_timesteps(diffusion.num_timesteps, timesteps)
    _check_x_batch(diffusion, x0, "x0")
    x = x0
    for i, k in enumerate(kept):
        t_read = kept[max(i - 1, 0)]  # the model at the current point (x_0 read at k_0)
        p = diffusion._p_mean_variance_model(model, x, _t_batch(t_read, x), clip_denoised)
        abar = float(diffusion.alphas_cumprod[k])
        x = math.sqrt(abar) * p["pred_x0"] + math.sqrt(1.0 - abar) * p["pred_eps"]
        if callback is not None:
            callback(i, k, x, p["pred_x0"])
    return x


def sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    sampler: SamplerType | str = SamplerType.DDPM,
    steps: int | None = None,
    timesteps: Timesteps = None,
    eta: float = 0.0,
    generator: Generators = None,
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Dispatch on ``sampler`` ("ddpm": ``sample_ancestral``, respaced on fewer timesteps; "ddim":
    ``sample_ddim``) with the sampler contract. ``steps`` is a count (``timesteps`` takes every
    form of ``parse_timesteps``; give one of the two). shape: (B, C, H, W) -> x_0 (B, C, H, W)."""
    sampler = parse_enum(SamplerType, sampler, "sampler")
    if steps is not None and timesteps is not None:
        raise ValueError("give steps (a count) or timesteps, not both")
    T = diffusion.num_timesteps
    if steps is not None:
        lo = 2 if sampler is SamplerType.DDPM else 1
        if isinstance(steps, bool) or not isinstance(steps, int) or not lo <= steps <= T:
            raise ValueError(
                f"steps must be an int in [{lo}, {T}] for the {sampler.value} sampler, got {steps!r}"
            )
        timesteps = steps
    kw = dict(timesteps=timesteps, generator=generator, clip_denoised=clip_denoised, device=device,
              progress=progress, callback=callback)
    if sampler is SamplerType.DDPM:
        return sample_ancestral(model, diffusion, shape, **kw)
    if sampler is SamplerType.DDIM:
        return sample_ddim(model, diffusion, shape, eta=eta, **kw)
    raise NotImplementedError(sampler)


# ---------------------------------------------------------------------------------- the figures' chains
def _check_t_index(t: int, diffusion: GaussianDiffusion, name: str = "t") -> int:
    T = diffusion.num_timesteps
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < T:
        raise ValueError(f"{name} must be an int in [0, {T - 1}] (0-based timestep), got {t!r}")
    return int(t)


def sample_progressive(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    snapshot_ts: Sequence[int],
    generator: Generators = None,
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Algorithm 2 with snapshots (Fig. 6): x_t and the predicted x_0 at each t in ``snapshot_ts``.

    Returns {"t": the snapshot timesteps, decreasing; "x_t": (K, B, C, H, W); "pred_x0":
    (K, B, C, H, W); "sample": x_0 (B, C, H, W)}.
    """
    ts = sorted({_check_t_index(t, diffusion, "snapshot t") for t in snapshot_ts}, reverse=True)
    xs, x0s = [], []

    def snapshot(step: int, t: int, x_t: torch.Tensor, pred_x0: torch.Tensor) -> None:
        if t in ts:
            xs.append(x_t)
            x0s.append(pred_x0)

    x0 = sample_ancestral(model, diffusion, shape, generator=generator, clip_denoised=clip_denoised,
                          device=device, progress=progress, callback=snapshot)
    return {"t": ts, "x_t": torch.stack(xs), "pred_x0": torch.stack(x0s), "sample": x0}


@torch.inference_mode()
def reconstruct(
    model: Model,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    t: int,
    *,
    generator: Generators = None,
    clip_denoised: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode x0 with q (x_t ~ q(x_t | x_0), eq. 4) and decode with the reverse chain from t.

    x0: (B, C, H, W) in [-1, 1]. Returns (x_t, reconstruction), both (B, C, H, W).
    """
    t = _check_t_index(t, diffusion)
    noise = draw_noise(x0.shape, generator, device=x0.device, dtype=x0.dtype)
    x_t = diffusion.q_sample(x0, _t_batch(t, x0), noise)
    return x_t, sample_from_xt(model, diffusion, x_t, t, generator=generator, clip_denoised=clip_denoised)


@torch.inference_mode()
def interpolate(
    model: Model,
    diffusion: GaussianDiffusion,
    x0_a: torch.Tensor,
    x0_b: torch.Tensor,
    t: int,
    lambdas: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    encoder: Encoder | str = "q",
    timesteps: Timesteps = None,
) -> torch.Tensor:
    """Interpolation in latent space (Sec. 4.3, Fig. 8-9): x_t and x'_t encode x0_a and x0_b,
    xbar_t = (1 - lambda) x_t + lambda x'_t is decoded from t. ``encoder`` "q": the stochastic
    encoder q(x_t | x_0) with shared noise, decoded by Algorithm 2 from t, its noise shared across
    the lambdas of a pair. "ddim": ``ddim_invert`` to t and eta = 0 DDIM back, over the kept
    ``timesteps`` below t plus t itself (deterministic; ``generator`` unused).

    x0_a, x0_b: (B, C, H, W) pairs. Returns (B, L, C, H, W) for the L lambdas.
    """
    t = _check_t_index(t, diffusion)
    encoder = _parse_encoder(encoder)
    if x0_a.shape != x0_b.shape:
        raise ValueError(
            f"the two image batches must share a shape, got {tuple(x0_a.shape)}, {tuple(x0_b.shape)}"
        )
    lam = torch.as_tensor(list(lambdas), dtype=x0_a.dtype, device=x0_a.device)  # (L,)
    if lam.ndim != 1 or lam.numel() == 0:
        raise ValueError(f"lambdas must be a non-empty sequence of floats, got {lambdas!r}")
    B, L = x0_a.shape[0], lam.numel()
    lam_b = lam.view(1, L, *([1] * (x0_a.ndim - 1)))  # (1, L, 1, 1, 1)
    if encoder is Encoder.DDIM:
        kept = [k for k in parse_timesteps(diffusion.num_timesteps, timesteps) if k < t] + [t]
        x_a, x_b = (ddim_invert(model, diffusion, x, kept, clip_denoised=clip_denoised) for x in (x0_a, x0_b))
        xbar = ((1 - lam_b) * x_a[:, None] + lam_b * x_b[:, None]).flatten(0, 1)  # (B L, C, H, W)
        out = sample_ddim(model, diffusion, xbar.shape, timesteps=kept, x_T=xbar, clip_denoised=clip_denoised)
        return out.view(B, L, *x0_a.shape[1:])
    noise = draw_noise(x0_a.shape, generator, device=x0_a.device, dtype=x0_a.dtype)
    tt = _t_batch(t, x0_a)
    x_a, x_b = diffusion.q_sample(x0_a, tt, noise), diffusion.q_sample(x0_b, tt, noise)
    xbar = ((1 - lam_b) * x_a[:, None] + lam_b * x_b[:, None]).flatten(0, 1)  # (B L, C, H, W)
    g_device = generator.device if generator is not None else "cpu"
    chain_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=g_device))
    pair_gens = sample_generators(chain_seed, range(B))
    gens = [_clone_generator(g) for g in pair_gens for _ in range(L)]  # pair i's stream, L times
    out = sample_from_xt(model, diffusion, xbar, t, generator=gens, clip_denoised=clip_denoised)
    return out.view(B, L, *x0_a.shape[1:])


class Encoder(str, Enum):
    """How ``interpolate`` maps x_0 to x_t."""

    Q = "q"  # x_t ~ q(x_t | x_0), eq. (4): the paper's stochastic encoder
    DDIM = "ddim"  # ``ddim_invert``: deterministic


def _parse_encoder(value: Any) -> Encoder:
    return parse_enum(Encoder, value, "encoder")


def timesteps_from_text(text: str) -> Timesteps:
    """A command line's timesteps: "list:0,250,999" is an explicit list; anything else is
    improved-diffusion's string ("ddim50", "10,15,20", "50"). See ``parse_timesteps``."""
    if text.startswith("list:"):
        try:
            return [int(k) for k in text[len("list:"):].split(",")]
        except ValueError:
            raise ValueError(f"timesteps {text!r}: expected 'list:' and comma-separated ints") from None
    return text


@torch.inference_mode()
def sample_shared_xt(
    model: Model,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int,
    n: int,
    *,
    generator: Generators = None,
    clip_denoised: bool = True,
) -> torch.Tensor:
    """n samples x_0 ~ p_theta(x_0 | x_t) that share one x_t (Fig. 7).

    x_t: (1, C, H, W), a batch of one. Returns (n, C, H, W).
    """
    t = _check_t_index(t, diffusion)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if x_t.ndim < 2 or x_t.shape[0] != 1:
        raise ValueError(f"x_t must be a batch of one, (1, C, ...), got {tuple(x_t.shape)}")
    x = x_t.expand(n, *x_t.shape[1:]).contiguous()  # (n, C, H, W)
    return sample_from_xt(model, diffusion, x, t, generator=generator, clip_denoised=clip_denoised)


# ---------------------------------------------------------------------------------- speed
class _FastModel:
    """The network call with the speed options: channels_last input, bf16 autocast, float32 output.
    Under CUDA graph capture the autocast weight cache must be off (PyTorch's CUDA graph notes)."""

    def __init__(self, model: Model, *, channels_last: bool, bf16: bool, autocast_cache: bool = True) -> None:
        self.model, self.channels_last, self.bf16 = model, channels_last, bf16
        self.autocast_cache = autocast_cache

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.bf16:
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                                cache_enabled=self.autocast_cache):
                out = self.model(x, t)
        else:
            out = self.model(x, t)
        return out.float().contiguous()


_Captured = tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]  # (graph, static x, static t, static out)


class _CUDAGraphModel:
    """Replays a captured CUDA graph of the network call, one graph per input shape."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.graphs: dict[tuple[Any, ...], _Captured] = {}

    def _capture(self, x: torch.Tensor, t: torch.Tensor) -> _Captured:
        sx, st = x.clone(), t.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up (cuDNN autotuning, lazy allocations) outside the graph
                self.model(sx, st)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(sx, st)
        return graph, sx, st, out

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, t)
        graph, sx, st, out = self.graphs[key]
        sx.copy_(x)
        st.copy_(t)
        graph.replay()
        return out.clone()


def prepare_model(
    model: Model,
    *,
    device: torch.device | str,
    channels_last: bool | None = None,
    compile: bool = False,
    bf16: bool = False,
    cuda_graphs: bool = False,
) -> Model:
    """The model ready for fast sampling on ``device``: an ``nn.Module`` is moved there and put in
    eval mode; ``channels_last`` (default: on CUDA only) lays activations out NHWC; ``compile``
    wraps it in ``torch.compile``; ``bf16`` runs it under bfloat16 autocast; ``cuda_graphs``
    replays a captured CUDA graph per batch shape. With every option off (the default on the CPU)
    the numbers are those of ``model`` itself. The returned callable gives float32 outputs."""
    device = torch.device(device)
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
    if channels_last is None:
        channels_last = device.type == "cuda"
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    fast: Model = _FastModel(model, channels_last=channels_last, bf16=bf16, autocast_cache=not cuda_graphs)
    if cuda_graphs:
        fast = _CUDAGraphModel(fast)
    return fast
