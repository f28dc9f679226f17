"""What one reproduction run does: its sizes, the Table 2 variants and their configs, the split, the work.

Every variant gets the same sizes (one recipe); only the parameterization, the variance and the
loss change. The work weights only apportion the progress bar between stages; measured run times
are in the README ("What the paper found") and docs/reproduce-digits/.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ddpmkit.config import TrainConfig, apply_overrides, train_preset
from ddpmkit.diffusion import LossType, MeanType, VarType

__all__ = ["NN_WORK", "SIMPLE", "SIZES", "VARIANTS", "ReproduceSizes", "Variant", "digits_split", "eval_work",
           "figures_work", "train_work", "variant_config"]


@dataclass(frozen=True, kw_only=True)
class ReproduceSizes:
    """How much of everything one run does. Every variant gets the same sizes (one recipe)."""

    name: str
    smoke: bool
    steps: int  # training steps per variant (the digits preset's batch 128, lr, EMA, warm-up)
    num_timesteps: int  # T: the paper's 1000 except in the tests' tiny size
    bpd_examples: int  # test digits through the full bound (the first N of the 360)
    bpd_batch: int
    t_chunk: int  # timesteps per network call in the bound
    num_samples: int  # ancestral samples per variant for the digits metric and the NN panel
    recon_examples: int = 4  # test digits in the progressive-reconstruction figure
    progressive_examples: int = 4  # chains in the progressive-generation figure
    unet_ch: int | None = None  # None: the digits preset's U-Net (64 channels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SIZES: dict[str, ReproduceSizes] = {
    "default": ReproduceSizes(name="default", smoke=False, steps=1200, num_timesteps=1000,
                              bpd_examples=100, bpd_batch=100, t_chunk=5, num_samples=200),
    "quick": ReproduceSizes(name="quick", smoke=True, steps=40, num_timesteps=1000, bpd_examples=8,
                            bpd_batch=8, t_chunk=25, num_samples=16, recon_examples=2,
                            progressive_examples=2),
}


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One row of Table 2 (or the learned-range hybrid), with the paper's CIFAR-10 numbers."""

    key: str
    label: str
    table: str
    mean_type: MeanType
    var_type: VarType
    loss_type: LossType
    paper: dict[str, Any]


# Table 2 of Ho et al. (CIFAR-10, unconditional); Table 1 for the NLLs. "-" in the paper = unstable.
VARIANTS: tuple[Variant, ...] = (
    Variant(key="mu_bound_learned", label="μ̃: L, learned diagonal Σ", table="Table 2",
            mean_type=MeanType.X_PREV, var_type=VarType.LEARNED, loss_type=LossType.KL,
            paper={"is": 7.28, "is_std": 0.10, "fid": 23.69}),
    Variant(key="mu_bound_fixed", label="μ̃: L, fixed isotropic Σ", table="Table 2",
            mean_type=MeanType.X_PREV, var_type=VarType.FIXED_LARGE, loss_type=LossType.KL,
            paper={"is": 8.06, "is_std": 0.09, "fid": 13.22}),
    Variant(key="mu_mse", label="μ̃: ‖μ̃ − μ_θ‖² (unweighted)", table="Table 2",
            mean_type=MeanType.X_PREV, var_type=VarType.FIXED_LARGE, loss_type=LossType.MSE,
            paper={"unstable": True}),
    Variant(key="eps_bound_learned", label="ε: L, learned diagonal Σ", table="Table 2",
            mean_type=MeanType.EPS, var_type=VarType.LEARNED, loss_type=LossType.KL,
            paper={"unstable": True}),
    Variant(key="eps_bound_fixed", label="ε: L, fixed isotropic Σ", table="Table 2",
            mean_type=MeanType.EPS, var_type=VarType.FIXED_LARGE, loss_type=LossType.KL,
            paper={"is": 7.67, "is_std": 0.13, "fid": 13.51, "nll": 3.70}),
    Variant(key="eps_simple", label="ε: L_simple", table="Table 2",
            mean_type=MeanType.EPS, var_type=VarType.FIXED_LARGE, loss_type=LossType.MSE,
            paper={"is": 9.46, "is_std": 0.11, "fid": 3.17, "nll": 3.75}),
    Variant(key="eps_hybrid_range", label="ε: L_hybrid, learned_range Σ (Nichol & Dhariwal)",
            table="Nichol & Dhariwal 2021", mean_type=MeanType.EPS, var_type=VarType.LEARNED_RANGE,
            loss_type=LossType.HYBRID, paper={}),
)
SIMPLE = "eps_simple"


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """The fixed split of the 1797 digits as index arrays (train, test): the first 1437, the last 360."""
    from ddpmkit.data.sources import DIGITS_NUM_TEST, load_digits_uint8

    n = load_digits_uint8("all")[0].shape[0]
    idx = np.arange(n)
    return idx[: n - DIGITS_NUM_TEST], idx[n - DIGITS_NUM_TEST:]


def variant_config(variant: Variant, sizes: ReproduceSizes, seed: int) -> TrainConfig:
    """The digits preset with this variant's parameterization, variance and loss; nothing else changes."""
    learned = variant.var_type.is_learned
    over: dict[str, Any] = {"steps": sizes.steps, "seed": seed, "diffusion.mean_type": variant.mean_type,
                            "diffusion.var_type": variant.var_type, "diffusion.loss_type": variant.loss_type,
                            "diffusion.num_timesteps": sizes.num_timesteps, "unet.learned_variance": learned,
                            "sample_every": sizes.steps + 1, "num_samples": 0,
                            "checkpoint_every": max(1, min(500, sizes.steps))}
    if sizes.unet_ch is not None:
        over["unet.ch"] = sizes.unet_ch
    return apply_overrides(train_preset("digits"), over)



# Relative work of the stages, in units of one image through the U-Net's forward pass: weights for
# the progress bar, not times.
TRAIN_STEP_WORK = 512.0  # a forward and a backward pass of the preset's batch of 128 images
EVAL_FIXED_WORK = 3000.0  # loading the model and the digits classifier, the metric itself
FIGURE_IMAGE_WORK = 6.0  # the figures call the network on one image at a time
FIGURES_FIXED_WORK = 7000.0
NN_WORK = 7000.0  # the nearest-neighbour stage: distances and the classifier's features


def train_work(s: ReproduceSizes) -> float:
    """One variant's training (the U-Net's work grows with the square of its channels)."""
    return s.steps * TRAIN_STEP_WORK * (1 if s.unet_ch is None else (s.unet_ch / 64) ** 2)


def eval_work(s: ReproduceSizes) -> float:
    """One variant's evaluation: every sample and every bound example through all T steps."""
    return (s.bpd_examples + s.num_samples) * s.num_timesteps + EVAL_FIXED_WORK


def figures_work(s: ReproduceSizes) -> float:
    """The L_simple figures: four reconstructions per test digit and the progressive chains."""
    images = s.recon_examples * 4 + s.progressive_examples
    return images * s.num_timesteps * FIGURE_IMAGE_WORK + FIGURES_FIXED_WORK
