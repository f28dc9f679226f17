"""ddpmkit: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel, NeurIPS 2020).

Public API re-exports only.
"""

__version__ = "0.1.0"
