"""Samplers for a trained reverse process: plain functions, a model argument, noise generators.

- ``sample_ancestral``: Algorithm 2 of the paper, x_{t-1} = mu_theta(x_t, t) + sigma_t z with the
  model's variance type and x_0 clipping; no noise at the last step.
- ``sample_respaced``: the same on S evenly strided timesteps, with the betas respaced from
  alphas_cumprod at the kept steps (Nichol & Dhariwal's ``SpacedDiffusion``).
- ``sample_ddim``: DDIM (Song, Meng, Ermon 2021, eq. 12) with its eta.
- ``sample_progressive``, ``sample_from_xt``, ``reconstruct``, ``interpolate``,
  ``sample_shared_xt``: the chains behind the paper's Figures 6-9.

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

from ddpmkit.diffusion import GaussianDiffusion

__all__ = [
    "Generators",
    "SamplerType",
    "ddim_mean_variance",
    "draw_noise",
    "interpolate",
    "p_sample_loop_progressive",
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
]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


class SamplerType(str, Enum):
    """How to run the reverse process."""

    DDPM = "ddpm"  # Algorithm 2 (all T steps), or respaced on S strided steps
    DDIM = "ddim"  # Song et al. eq. (12) with eta


# ---------------------------------------------------------------------------------- noise
def _check_nonneg_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s noise stream: a 63-bit hash of (seed, index) (numpy's
    ``SeedSequence``), so nearby seeds and indices give unrelated streams."""
    seed, index = _check_nonneg_int(seed, "seed"), _check_nonneg_int(index, "index")
    lo, hi = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32).tolist()
    return ((hi << 32) | lo) & ((1 << 63) - 1)


def sample_generators(seed: int, indices: Sequence[int] | range) -> list[torch.Generator]:
    """One CPU generator per sample index, seeded by ``sample_seed(seed, index)``."""
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]


def draw_noise(
    shape: Sequence[int], generator: Generators, *, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """eps ~ N(0, I) of ``shape`` (B, ...) on ``device``.

    ``generator``: None (the global RNG on ``device``), a generator (noise drawn on its device in
    float32, then moved), or B generators (sample b drawn from generator b, on its device).
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        z = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return _to_device(z, device, dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"expected one generator per sample ({shape[0]}), got {len(generator)}")
    z = torch.stack(
        [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
    )  # (B, ...)
    return _to_device(z, device, dtype)


def _to_device(z: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Move CPU noise to ``device``; to a GPU through pinned memory, without waiting for it."""
    device = torch.device(device)
    if z.device.type == "cpu" and device.type == "cuda":
        return z.pin_memory().to(device=device, non_blocking=True).to(dtype)
    return z.to(device=device, dtype=dtype)


def _clone_generator(g: torch.Generator) -> torch.Generator:
    """A generator on g's device in g's current state (the two then draw the same numbers)."""
    c = torch.Generator(device=g.device)
    c.set_state(g.get_state())
    return c


# ---------------------------------------------------------------------------------- timesteps
def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly strided over [0, T-1], both ends included, increasing:
    round(i (T - 1) / (S - 1)) for i = 0..S-1 (all T when S = T; [T - 1] when S = 1)."""
    T = num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}] (the model's T = {T}), got {steps!r}")
    if steps == 1:
        return [T - 1]
    kept = [round(i * (T - 1) / (steps - 1)) for i in range(steps)]
    assert len(set(kept)) == steps, kept
    return kept


def respace_diffusion(diffusion: GaussianDiffusion, timesteps: Sequence[int]) -> GaussianDiffusion:
    """The diffusion restricted to the increasing ``timesteps`` k_0 < ... < k_{S-1}.

    Its betas are 1 - abar_{k_i} / abar_{k_{i-1}} (abar_{k_{-1}} = 1), so its alphas_cumprod are
    the original ones at the kept steps; the mean/variance types carry over (a fixed variance is
    then beta or beta-tilde of the respaced chain, as in improved-diffusion). Call the model through
    ``_TimestepMap`` so that it sees the original timestep indices.
    """
    ks = list(timesteps)
    if len(ks) < 2 or any(b <= a for a, b in zip(ks, ks[1:], strict=False)) or ks[0] < 0 or (
        ks[-1] >= diffusion.num_timesteps
    ):
        raise ValueError(f"timesteps must increase within [0, {diffusion.num_timesteps - 1}] "
                         f"and number at least 2, got {ks}")
    abar = diffusion.alphas_cumprod[ks]  # (S,) float64
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return GaussianDiffusion(
        betas=1.0 - abar / abar_prev,
        mean_type=diffusion.mean_type,
        var_type=diffusion.var_type,
        loss_type=diffusion.loss_type,
        hybrid_lambda=diffusion.hybrid_lambda,
        decoder_cdf=diffusion.decoder_cdf,
    )


class _TimestepMap:
    """Calls ``model`` with the original timestep of each respaced index: t -> timesteps[t]."""

    def __init__(self, model: Model, timesteps: Sequence[int]) -> None:
        self.model = model
        self.timesteps = torch.tensor(list(timesteps), dtype=torch.int64)
        self._on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        table = self._on.get(t.device)
        if table is None:
            table = self._on[t.device] = self.timesteps.to(t.device)
        return self.model(x, table[t])


# ---------------------------------------------------------------------------------- Algorithm 2
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
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T must have shape {tuple(shape)}, got {tuple(x_T.shape)}")
        return x_T if device is None else x_T.to(device)
    return draw_noise(_check_shape(shape), generator, device=device or "cpu", dtype=torch.float32)


@torch.inference_mode()
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
    """The reverse chain of Algorithm 2 from x = x_{t_start} (default t_start = T - 1: x = x_T).

    At each t = t_start, ..., 0 yields {"t": t, "x_t": x_t, "pred_x0": x0 predicted from x_t,
    "sample": x_{t-1} = mean + exp(log_var / 2) z} (z = 0 at t = 0); tensors (B, C, ...).
    The last "sample" is x_0.
    """
    from tqdm.auto import tqdm

    T = diffusion.num_timesteps
    t_start = T - 1 if t_start is None else t_start
    if isinstance(t_start, bool) or not isinstance(t_start, int) or not 0 <= t_start < T:
        raise ValueError(f"t_start must be an int in [0, {T - 1}], got {t_start!r}")
    for t in tqdm(range(t_start, -1, -1), disable=not progress, desc="sampling", unit="step", leave=False):
        tt = _t_batch(t, x)
        p = diffusion.p_mean_variance(model, x, tt, clip_denoised=clip_denoised)
        if t > 0:
            z = draw_noise(x.shape, generator, device=x.device, dtype=x.dtype)
            x_prev = p["mean"] + torch.exp(0.5 * p["log_variance"]) * z  # Algorithm 2, line 4
        else:
            x_prev = p["mean"]  # z = 0 at the paper's t = 1
        yield {"t": t, "x_t": x, "pred_x0": p["pred_x0"], "sample": x_prev}
        x = x_prev


def sample_from_xt(
    model: Model,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int,
    *,
    generator: Generators = None,
    clip_denoised: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """x_0 ~ p_theta(x_0 | x_t): the reverse chain of Algorithm 2 run from timestep t. (B, C, ...)."""
    x = x_t
    for out in p_sample_loop_progressive(
        model, diffusion, x_t, t_start=t, generator=generator, clip_denoised=clip_denoised, progress=progress
    ):
        x = out["sample"]
    return x


def sample_ancestral(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    generator: Generators = None,
    clip_denoised: bool = True,
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Algorithm 2: x_T ~ N(0, I), then x_{t-1} = mu_theta(x_t, t) + sigma_t z for t = T, ..., 1.

    shape: (B, C, H, W). Returns x_0: (B, C, H, W) float32 on ``device`` (clipped to [-1, 1] only
    through pred_x0 when ``clip_denoised``; quantise at the edge).
    """
    x = _x_start(shape, x_T, generator, device)
    return sample_from_xt(
        model, diffusion, x, diffusion.num_timesteps - 1,
        generator=generator, clip_denoised=clip_denoised, progress=progress,
    )


def sample_respaced(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    steps: int,
    generator: Generators = None,
    clip_denoised: bool = True,
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Algorithm 2 on ``steps`` evenly strided timesteps (``space_timesteps``) of the respaced
    diffusion (``respace_diffusion``); the model sees the original timesteps. steps = T is
    Algorithm 2 itself. shape: (B, C, H, W) -> x_0 of that shape."""
    T = diffusion.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= T:
        raise ValueError(f"steps must be an int in [2, {T}] for the ddpm sampler (T = {T}), got {steps!r}")
    kept = space_timesteps(T, steps)
    spaced = respace_diffusion(diffusion, kept)
    return sample_ancestral(
        _TimestepMap(model, kept), spaced, shape,
        generator=generator, clip_denoised=clip_denoised, x_T=x_T, device=device, progress=progress,
    )


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
    if not (isinstance(eta, (int, float)) and 0 <= eta):
        raise ValueError(f"eta must be a float >= 0, got {eta!r}")
    abar_t = float(diffusion.alphas_cumprod[t])
    abar_prev = float(diffusion.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    var = eta**2 * (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    coef_eps = math.sqrt(max(1.0 - abar_prev - var, 0.0))
    return math.sqrt(abar_prev) * pred_x0 + coef_eps * pred_eps, var


@torch.inference_mode()
def sample_ddim(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    steps: int | None = None,
    eta: float = 0.0,
    generator: Generators = None,
    clip_denoised: bool = True,
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM on ``steps`` evenly strided timesteps (default all T); eta = 0 is deterministic given x_T,
    eta = 1 with steps = T is Algorithm 2 with sigma_t^2 = beta-tilde_t. The model's predicted
    x_0 (clipped when ``clip_denoised``) and the eps implied by it drive eq. (12); a learned
    variance is ignored. shape: (B, C, H, W) -> x_0 of that shape."""
    from tqdm.auto import tqdm

    T = diffusion.num_timesteps
    kept = space_timesteps(T, T if steps is None else steps)
    if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta >= 0):
        raise ValueError(f"eta must be a float >= 0, got {eta!r}")
    x = _x_start(shape, x_T, generator, device)
    prevs = [-1, *kept[:-1]]
    for i in tqdm(range(len(kept) - 1, -1, -1), disable=not progress, desc="ddim", unit="step", leave=False):
        t, t_prev = kept[i], prevs[i]
        p = diffusion.p_mean_variance(model, x, _t_batch(t, x), clip_denoised=clip_denoised)
        mean, var = ddim_mean_variance(diffusion, x, t, t_prev, p["pred_x0"], p["pred_eps"], eta)
        if var > 0:
            x = mean + math.sqrt(var) * draw_noise(x.shape, generator, device=x.device, dtype=x.dtype)
        else:
            x = mean
    return x


def sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    sampler: SamplerType | str = SamplerType.DDPM,
    steps: int | None = None,
    eta: float = 0.0,
    generator: Generators = None,
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Dispatch: "ddpm" with steps None or T is Algorithm 2, with fewer steps the respaced chain;
    "ddim" is ``sample_ddim``. shape: (B, C, H, W) -> x_0 (B, C, H, W)."""
    allowed = [s.value for s in SamplerType]
    if sampler not in allowed:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {allowed}")
    sampler = SamplerType(sampler)
    T = diffusion.num_timesteps
    kw = dict(generator=generator, clip_denoised=clip_denoised, device=device, progress=progress)
    if sampler is SamplerType.DDPM:
        if steps is None or steps == T:
            return sample_ancestral(model, diffusion, shape, **kw)
        return sample_respaced(model, diffusion, shape, steps=steps, **kw)
    if sampler is SamplerType.DDIM:
        return sample_ddim(model, diffusion, shape, steps=steps, eta=eta, **kw)
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
    x = _x_start(shape, None, generator, device)
    xs, x0s, last = [], [], None
    for out in p_sample_loop_progressive(
        model, diffusion, x, generator=generator, clip_denoised=clip_denoised, progress=progress
    ):
        if out["t"] in ts:
            xs.append(out["x_t"])
            x0s.append(out["pred_x0"])
        last = out
    assert last is not None
    return {"t": ts, "x_t": torch.stack(xs), "pred_x0": torch.stack(x0s), "sample": last["sample"]}


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
) -> torch.Tensor:
    """Interpolation in latent space (Sec. 4.3, Fig. 8-9): x_t = q(x0_a) and x'_t = q(x0_b) with
    shared noise, xbar_t = (1 - lambda) x_t + lambda x'_t, decoded by the reverse chain from t.
    The reverse chain's noise is also shared across the lambdas of a pair.

    x0_a, x0_b: (B, C, H, W) pairs. Returns (B, L, C, H, W) for the L lambdas.
    """
    t = _check_t_index(t, diffusion)
    if x0_a.shape != x0_b.shape:
        raise ValueError(
            f"the two image batches must share a shape, got {tuple(x0_a.shape)}, {tuple(x0_b.shape)}"
        )
    lam = torch.as_tensor(list(lambdas), dtype=x0_a.dtype, device=x0_a.device)  # (L,)
    if lam.ndim != 1 or lam.numel() == 0:
        raise ValueError(f"lambdas must be a non-empty sequence of floats, got {lambdas!r}")
    B, L = x0_a.shape[0], lam.numel()
    noise = draw_noise(x0_a.shape, generator, device=x0_a.device, dtype=x0_a.dtype)
    tt = _t_batch(t, x0_a)
    x_a, x_b = diffusion.q_sample(x0_a, tt, noise), diffusion.q_sample(x0_b, tt, noise)
    lam_b = lam.view(1, L, *([1] * (x0_a.ndim - 1)))  # (1, L, 1, 1, 1)
    xbar = ((1 - lam_b) * x_a[:, None] + lam_b * x_b[:, None]).flatten(0, 1)  # (B L, C, H, W)
    g_device = generator.device if generator is not None else "cpu"
    chain_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=g_device))
    pair_gens = sample_generators(chain_seed, range(B))
    gens = [_clone_generator(g) for g in pair_gens for _ in range(L)]  # pair i's stream, L times
    out = sample_from_xt(model, diffusion, xbar, t, generator=gens, clip_denoised=clip_denoised)
    return out.view(B, L, *x0_a.shape[1:])


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
