"""The family registry: a plain dict from `model.family` to (class, config dataclass)."""

from genkit.families.ddpm import DDPM, DDPMConfig
from genkit.families.gan import GAN, GANConfig
from genkit.families.glow import Glow, GlowConfig
from genkit.families.nice import NICE, NICEConfig
from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig

FAMILIES = {
    "ddpm": (DDPM, DDPMConfig),
    "gan": (GAN, GANConfig),
    "rectified_flow": (RectifiedFlow, RectifiedFlowConfig),
    "nice": (NICE, NICEConfig),
    "glow": (Glow, GlowConfig),
}
