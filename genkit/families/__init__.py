"""The family registry: a plain dict from `model.family` to (class, config dataclass)."""

from genkit.families.ar_prior import ArPrior, ArPriorConfig
from genkit.families.ddpm import DDPM, DDPMConfig
from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from genkit.families.vqgan import VQGAN, VQGANConfig

FAMILIES = {
    "ddpm": (DDPM, DDPMConfig),
    "rectified_flow": (RectifiedFlow, RectifiedFlowConfig),
    "vqgan": (VQGAN, VQGANConfig),
    "ar_prior": (ArPrior, ArPriorConfig),
}
