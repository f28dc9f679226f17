"""The paper's Sec. 4.3 chains: progressive generation, reconstruction, interpolation, shared x_t, inversion.

- ``sample_progressive``: Algorithm 2 with snapshots of x_t and pred_x0 (Fig. 6).
- ``sample_from_xt``: the reverse chain from a given x_t; ``sample_shared_xt``: n draws that share
  one x_t (Fig. 7); ``reconstruct``: encode with q, decode from t (Fig. 9's rows).
- ``interpolate``: decode the mix of two encodings (Fig. 8-9), with q or ``ddim_invert`` as encoder.
- ``ddim_invert``: deterministic DDIM encoding x_0 -> x_t (Song et al. Sec. 4.3).

Shapes: x0, x_t: (B, C, H, W); t: a Python int, 0-based. Built on the samplers of ``ddpmkit.sampling``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import Any

import torch

from ddpmkit.checks import check_int
from ddpmkit.diffusion import GaussianDiffusion, Model, check_tensor
from ddpmkit.enums import parse_enum
from ddpmkit.respace import Timesteps, check_timestep, diffusion_timesteps
from ddpmkit.sampling import Callback, sample_ancestral, sample_ddim, t_batch
from ddpmkit.seeds import Generators, clone_generator, draw_standard_normal, sample_generators

__all__ = [
    "Encoder",
    "ddim_invert",
    "interpolate",
    "reconstruct",
    "sample_from_xt",
    "sample_progressive",
    "sample_shared_xt",
]


class Encoder(str, Enum):
    """How ``interpolate`` maps x_0 to x_t."""

    Q = "q"  # x_t ~ q(x_t | x_0), eq. (4): the paper's stochastic encoder
    DDIM = "ddim"  # ``ddim_invert``: deterministic


def _parse_encoder(value: Any) -> Encoder:
    return parse_enum(Encoder, value, "encoder")


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
    T = diffusion.num_timesteps
    ts = sorted({check_timestep(T, t, "snapshot t") for t in snapshot_ts}, reverse=True)
    xs, x0s = [], []

    def snapshot(step: int, t: int, x_t: torch.Tensor, pred_x0: torch.Tensor) -> None:
        if t in ts:
            xs.append(x_t)
            x0s.append(pred_x0)

    x0 = sample_ancestral(model, diffusion, shape, generator=generator, clip_denoised=clip_denoised,
                          device=device, progress=progress, callback=snapshot)
    return {"t": ts, "x_t": torch.stack(xs), "pred_x0": torch.stack(x0s), "sample": x0}


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
    t = check_timestep(diffusion.num_timesteps, t, "t_start")
    check_tensor(x_t, "x_t", min_ndim=2)
    return sample_ancestral(model, diffusion, x_t.shape, timesteps=list(range(t + 1)), x_T=x_t,
                            generator=generator, clip_denoised=clip_denoised, progress=progress,
                            callback=callback)


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
    t = check_timestep(diffusion.num_timesteps, t)
    noise = draw_standard_normal(x0.shape, generator, device=x0.device, dtype=x0.dtype)
    x_t = diffusion.q_sample(x0, t_batch(t, x0), noise)
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
    t = check_timestep(diffusion.num_timesteps, t)
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
        kept = [k for k in diffusion_timesteps(diffusion, timesteps) if k < t] + [t]
        x_a, x_b = (ddim_invert(model, diffusion, x, kept, clip_denoised=clip_denoised) for x in (x0_a, x0_b))
        xbar = ((1 - lam_b) * x_a[:, None] + lam_b * x_b[:, None]).flatten(0, 1)  # (B L, C, H, W)
        out = sample_ddim(model, diffusion, xbar.shape, timesteps=kept, x_T=xbar, clip_denoised=clip_denoised)
        return out.view(B, L, *x0_a.shape[1:])
    noise = draw_standard_normal(x0_a.shape, generator, device=x0_a.device, dtype=x0_a.dtype)
    tt = t_batch(t, x0_a)
    x_a, x_b = diffusion.q_sample(x0_a, tt, noise), diffusion.q_sample(x0_b, tt, noise)
    xbar = ((1 - lam_b) * x_a[:, None] + lam_b * x_b[:, None]).flatten(0, 1)  # (B L, C, H, W)
    g_device = generator.device if generator is not None else "cpu"
    chain_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=g_device))
    pair_gens = sample_generators(chain_seed, range(B))
    gens = [clone_generator(g) for g in pair_gens for _ in range(L)]  # pair i's stream, L times
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
    t = check_timestep(diffusion.num_timesteps, t)
    n = check_int(n, "n", low=1)
    if x_t.ndim < 2 or x_t.shape[0] != 1:
        raise ValueError(f"x_t must be a batch of one, (1, C, ...), got {tuple(x_t.shape)}")
    x = x_t.expand(n, *x_t.shape[1:]).contiguous()  # (n, C, H, W)
    return sample_from_xt(model, diffusion, x, t, generator=generator, clip_denoised=clip_denoised)


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
    kept = diffusion_timesteps(diffusion, timesteps)
    check_tensor(x0, "x0", min_ndim=2)
    x = x0
    for i, k in enumerate(kept):
        t_read = kept[max(i - 1, 0)]  # the model at the current point (x_0 read at k_0)
        p = diffusion.p_mean_variance(model, x, t_batch(t_read, x), clip_denoised, check=False)
        abar = float(diffusion.alphas_cumprod[k])
        x = math.sqrt(abar) * p["pred_x0"] + math.sqrt(1.0 - abar) * p["pred_eps"]  # eq. (12), eta = 0
        if callback is not None:
            callback(i, k, x, p["pred_x0"])
    return x
