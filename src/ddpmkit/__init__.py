"""ddpmkit: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel, NeurIPS 2020).

Public API re-exports only.
"""

__version__ = "0.1.0"

# the DDPM math (issue 2); "X as X" marks an explicit re-export
from ddpmkit.diffusion import DiffusionConfig as DiffusionConfig  # noqa: E402
from ddpmkit.diffusion import GaussianDiffusion as GaussianDiffusion  # noqa: E402
from ddpmkit.diffusion import LossType as LossType  # noqa: E402
from ddpmkit.diffusion import MeanType as MeanType  # noqa: E402
from ddpmkit.diffusion import VarType as VarType  # noqa: E402
from ddpmkit.distributions import discretized_gaussian_log_likelihood as discretized_gaussian_log_likelihood  # noqa: E402,E501
from ddpmkit.distributions import normal_kl as normal_kl  # noqa: E402
from ddpmkit.models import LoadedModel as LoadedModel  # noqa: E402
from ddpmkit.models import load_model as load_model  # noqa: E402
from ddpmkit.models import load_unet as load_unet  # noqa: E402

# the paper's U-Net (issue 3)
from ddpmkit.nn import UNET_PRESETS as UNET_PRESETS  # noqa: E402
from ddpmkit.nn import UNet as UNet  # noqa: E402
from ddpmkit.nn import UNetConfig as UNetConfig  # noqa: E402
from ddpmkit.schedules import BETA_SCHEDULES as BETA_SCHEDULES  # noqa: E402
from ddpmkit.schedules import get_named_beta_schedule as get_named_beta_schedule  # noqa: E402
