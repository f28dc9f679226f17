"""The paper's U-Net (App. B) and its layers. Never imports the math (diffusion, schedules, ...)."""

from ddpmkit.nn.folder import save_model_folder
from ddpmkit.nn.unet import UNET_PRESETS, UNet, UNetConfig, read_model_folder

__all__ = ["UNET_PRESETS", "UNet", "UNetConfig", "read_model_folder", "save_model_folder"]
