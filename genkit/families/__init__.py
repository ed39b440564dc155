"""The family registry: a plain dict from `model.family` to (class, config dataclass)."""

from genkit.families.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from genkit.families.ddpm import DDPM, DDPMConfig
from genkit.families.ldm import LDM, LDMConfig
from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig

FAMILIES = {
    "autoencoder_kl": (AutoencoderKL, AutoencoderKLConfig),
    "ddpm": (DDPM, DDPMConfig),
    "rectified_flow": (RectifiedFlow, RectifiedFlowConfig),
    "ldm": (LDM, LDMConfig),
}
