"""Timestep specs (a count, "quadN" / "linspaceN" / "logsnrN", improved-diffusion's "ddimN" / "10,15,20",
a list) and the spaced diffusion.

A sampler keeps timesteps k_0 < ... < k_{S-1} of the base chain (0-based). ``parse_timesteps``
reads every form a user gives and is the one check of them (``check_steps``: a count;
``check_timestep``: one index). ``SpacedDiffusion`` is the DDPM chain on the kept steps (Nichol &
Dhariwal Sec. 4, improved-diffusion's ``respace.py``; docs/math.md Sec. 10); it calls the model with
the kept timesteps itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ddpmkit.checks import check_int, is_int
from ddpmkit.diffusion import GaussianDiffusion, VarType

__all__ = [
    "SpacedDiffusion",
    "Timesteps",
    "chain_on",
    "check_steps",
    "check_timestep",
    "diffusion_timesteps",
    "improved_diffusion_timesteps",
    "linspace_timesteps",
    "logsnr_timesteps",
    "parse_timesteps",
    "quad_timesteps",
    "respace_diffusion",
    "space_timesteps",
    "timesteps_from_text",
]

Timesteps = int | str | Sequence[int] | None


# ---------------------------------------------------------------------------------- timestep specs
def check_steps(num_timesteps: int, steps: Any, *, low: int = 1, hint: str = "") -> int:
    """The one check of a step count S: an int in [low, T] (``hint`` default: the model's T)."""
    T = num_timesteps
    return check_int(steps, "steps", low=low, high=T, hint=hint or f"(the model's T = {T})")


def check_timestep(num_timesteps: int, t: Any, name: str = "t") -> int:
    """The one check of a single 0-based timestep index: an int in [0, T - 1]."""
    return check_int(t, name, low=0, high=num_timesteps - 1, hint="(0-based timestep)")


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly strided over [0, T-1], both ends included, increasing:
    round(i (T - 1) / (S - 1)) for i = 0..S-1, Python's round (ties to even) of the exact ratio
    (all T when S = T; [T - 1] when S = 1). This is the rounding of a count; improved-diffusion's
    string "S" (``improved_diffusion_timesteps``) accumulates the stride instead and can differ
    by one step at ties."""
    T = num_timesteps
    steps = check_steps(T, steps)
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


def quad_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """DDIM's quadratic selection (Song et al.'s code, "quad"): int((i sqrt(0.8 T) / (S - 1))^2) for
    i = 0..S-1, dense at small t. Where that takes a timestep twice (many steps) it moves to the
    next free one, so S distinct timesteps come back, increasing."""
    T = num_timesteps
    S = check_int(steps, "steps", low=1, high=int(0.8 * T) + 1, hint=f"(quad reaches 0.8 T = {int(0.8 * T)})")
    ks = (np.linspace(0, np.sqrt(0.8 * T), S) ** 2).astype(np.int64).tolist()
    return _distinct(ks, T, low=0)


def linspace_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The S model timesteps of S + 1 points evenly spread over [0, T-1] in t, rounded, without
    the last point 0 (diffusers' "linspace" spacing; the final step goes from the smallest to x_0).
    Increasing, distinct."""
    T = check_int(num_timesteps, "num_timesteps", low=2)
    S = check_int(steps, "steps", low=1, high=T - 1, hint=f"(the model's T = {T})")
    return _distinct(np.round(np.linspace(0, T - 1, S + 1))[1:].astype(np.int64).tolist(), T)


def logsnr_timesteps(alphas_cumprod: Sequence[float] | torch.Tensor, steps: int) -> list[int]:
    """The S model timesteps of S + 1 points evenly spread in the half log-SNR lambda between
    timestep T-1 and 0 (Lu et al.'s logSNR-uniform choice), each the nearest integer timestep,
    without the last point 0. Increasing, distinct: a timestep taken twice moves to the next free one."""
    abar = np.asarray(torch.as_tensor(alphas_cumprod, dtype=torch.float64))
    T = abar.shape[0]
    S = check_int(steps, "steps", low=1, high=T - 1, hint=f"(the model's T = {T})")
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))  # (T,), decreasing in t
    targets = np.linspace(lam[0], lam[-1], S + 1)[1:]  # (S,), increasing in t
    return _distinct([int(np.argmin(np.abs(lam - v))) for v in targets], T)


def _distinct(ks: list[int], T: int, *, low: int = 1) -> list[int]:
    """Sorted and >= low, then each moved up past its predecessor and down below T - (later ones)."""
    ks = sorted(max(k, low) for k in ks)
    for i in range(1, len(ks)):
        ks[i] = max(ks[i], ks[i - 1] + 1)
    for i in range(len(ks) - 1, -1, -1):
        ks[i] = min(ks[i], T - len(ks) + i)
    return ks


SELECTIONS = ("quad", "linspace", "logsnr")  # "quadN", "linspaceN", "logsnrN" before improved-diffusion's


def parse_timesteps(num_timesteps: int, timesteps: Timesteps, *,
                    alphas_cumprod: torch.Tensor | None = None) -> list[int]:
    """The kept timesteps, increasing, from what the user gives: None (all T), a count S
    (``space_timesteps``), a selection string ("quad20": ``quad_timesteps``, "linspace20":
    ``linspace_timesteps``, "logsnr20": ``logsnr_timesteps``, which needs the schedule's
    ``alphas_cumprod``), an improved-diffusion string ("ddim50", "10,15,20":
    ``improved_diffusion_timesteps``), or an explicit sequence of distinct 0-based timesteps
    (any order, as diffusers' ``timesteps=[...]``)."""
    T = num_timesteps
    if timesteps is None:
        return list(range(T))
    if isinstance(timesteps, str):
        return _parse_text(T, timesteps, alphas_cumprod)
    if is_int(timesteps):
        return space_timesteps(T, int(timesteps))
    if isinstance(timesteps, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(timesteps, bool):
        ks = [k.item() if hasattr(k, "item") else k for k in timesteps]
        if ks and all(is_int(k) and 0 <= k < T for k in ks) and (
            len(set(ks)) == len(ks)
        ):
            return sorted(ks)
        raise ValueError(f"a timestep list must hold distinct ints in [0, {T - 1}], got {list(timesteps)!r}")
    raise ValueError(f"timesteps must be None, a count, a string like 'ddim50' or a list, got {timesteps!r}")


def diffusion_timesteps(diffusion: GaussianDiffusion, timesteps: Timesteps) -> list[int]:
    """``parse_timesteps`` for this diffusion: its T, and its schedule for "logsnrN"."""
    return parse_timesteps(diffusion.num_timesteps, timesteps, alphas_cumprod=diffusion.alphas_cumprod)


def _parse_text(T: int, text: str, alphas_cumprod: torch.Tensor | None) -> list[int]:
    for name in SELECTIONS:
        if text.strip().startswith(name):
            n = text.strip()[len(name):]
            if not n.isdigit():
                raise ValueError(f"timesteps {text!r}: expected '{name}N' with N a positive int")
            if name == "quad":
                return quad_timesteps(T, int(n))
            if name == "linspace":
                return linspace_timesteps(T, int(n))
            if alphas_cumprod is None:
                raise ValueError(f"timesteps {text!r}: logSNR spacing needs the diffusion's schedule")
            return logsnr_timesteps(alphas_cumprod, int(n))
    return improved_diffusion_timesteps(T, text)


def timesteps_from_text(text: str) -> Timesteps:
    """A command line's timesteps: "list:0,250,999" is an explicit list; anything else is
    improved-diffusion's string ("ddim50", "10,15,20", "50"). See ``parse_timesteps``."""
    if text.startswith("list:"):
        try:
            return [int(k) for k in text[len("list:"):].split(",")]
        except ValueError:
            raise ValueError(f"timesteps {text!r}: expected 'list:' and comma-separated ints") from None
    return text


def _check_kept_timesteps(timesteps: Any, T: int) -> list[int]:
    """``timesteps`` as a list of >= 2 increasing ints in [0, T - 1], or a ValueError."""
    try:
        ks = [int(k) for k in timesteps]
        ok = all(float(k) == int(k) for k in timesteps)
    except (TypeError, ValueError):
        ks, ok = [], False
    increasing = all(b > a for a, b in zip(ks, ks[1:], strict=False))
    if not ok or len(ks) < 2 or not increasing or ks[0] < 0 or ks[-1] >= T:
        raise ValueError(
            f"timesteps must be at least 2 increasing ints in [0, {T - 1}], got {list(timesteps)!r}"
            if isinstance(timesteps, Sequence) else f"timesteps must be a sequence of ints, got {timesteps!r}"
        )
    return ks


# ---------------------------------------------------------------------------------- the spaced chain
class SpacedDiffusion(GaussianDiffusion):
    """``base`` restricted to the increasing kept timesteps k_0 < ... < k_{S-1} (Nichol & Dhariwal,
    Sec. 4; improved-diffusion's ``SpacedDiffusion``). Index i of this diffusion is the base's
    timestep k_i: every method that calls the model (``p_mean_variance``, ``training_losses``,
    ``calc_bpd_loop`` and the samplers) passes it k_i, so the model needs no wrapper.

    Its betas are 1 - abar_{k_i} / abar_{k_{i-1}} (abar_{k_{-1}} = 1), so its alphas_cumprod are the
    base's at the kept steps; fixed variances are beta or beta-tilde of this chain and
    ``learned_range`` interpolates this chain's bounds (as improved-diffusion). Eps and x_0 models
    are read as on the base. An x_prev model's output is the mean of x_{k_i - 1} of the *base*
    chain, so it is converted through the base's one-step posterior to x_0 and the mean is then
    this chain's posterior mean at that x_0 (docs/math.md, "Respacing"). A raw ``learned``
    log-variance is a one-step sigma^2 of the base chain and has no meaning for a jump of several
    steps: it is refused unless every step is kept.

    Attributes: base, timesteps (tuple of the S kept base timesteps), timestep_map ((S,) int64).
    """

    def __init__(self, *, base: GaussianDiffusion, timesteps: Sequence[int]) -> None:
        ks = _check_kept_timesteps(timesteps, base.num_timesteps)
        if isinstance(base, SpacedDiffusion):  # respacing a respaced chain: compose the maps
            ks = [base.timesteps[k] for k in ks]
            base = base.base
        T = base.num_timesteps
        if base.var_type is VarType.LEARNED and len(ks) != T:
            raise ValueError(
                f"var_type 'learned' predicts the one-step log sigma^2 of the {T}-step chain, which "
                f"does not apply to a respaced chain of {len(ks)} steps; sample with all {T} steps, "
                "with DDIM (which ignores the variance), or train with var_type 'learned_range'"
            )
        abar = base.alphas_cumprod[ks]  # (S,) float64
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        super().__init__(
            betas=1.0 - abar / abar_prev,
            mean_type=base.mean_type,
            var_type=base.var_type,
            loss_type=base.loss_type,
            hybrid_lambda=base.hybrid_lambda,
            decoder_cdf=base.decoder_cdf,
        )
        self.base = base
        self.timesteps = tuple(ks)
        self.timestep_map = torch.tensor(ks, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"SpacedDiffusion(S={self.num_timesteps} of {self.base!r})"

    # the hooks of GaussianDiffusion: the model sees k_i, an x_prev model is read on the base chain
    def _model_t(self, t: torch.Tensor) -> torch.Tensor:
        key = ("timestep_map", t.device, torch.int64)
        table = self._cache.get(key)
        if table is None:
            table = self._cache[key] = self.timestep_map.to(t.device)
        return table[t]

    def _x0_from_model_xprev(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.base.predict_x0_from_xprev(x_t, self._model_t(t), out, check=False)  # the base's eq. (7)

    def _mean_from_model_xprev(
        self, out: torch.Tensor, pred_x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return self.q_posterior_mean(pred_x0, x_t, t, check=False)  # the jump k_i -> k_{i-1}

    def _xprev_target(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.base.q_posterior_mean(x0, x_t, self._model_t(t), check=False)


def respace_diffusion(diffusion: GaussianDiffusion, timesteps: Timesteps) -> SpacedDiffusion:
    """``SpacedDiffusion`` on the kept ``timesteps`` (any form ``parse_timesteps`` takes): a public
    diffusion that calls the model with the original timesteps itself."""
    return SpacedDiffusion(base=diffusion, timesteps=diffusion_timesteps(diffusion, timesteps))


def chain_on(diffusion: GaussianDiffusion, kept: list[int]) -> GaussianDiffusion:
    """The diffusion whose index i is kept[i]: itself for 0, 1, ..., t, else the spaced one."""
    if kept == list(range(len(kept))):
        return diffusion
    if len(kept) < 2:
        raise ValueError(f"the ddpm sampler needs at least 2 timesteps, got {kept}")
    return SpacedDiffusion(base=diffusion, timesteps=kept)
