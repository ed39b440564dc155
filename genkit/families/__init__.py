"""The family registry: a plain dict from `model.family` to (class, config dataclass).

A new family is one module (a class deriving from `genkit.families.base.Family` and its
capabilities, a config dataclass deriving from `genkit.config.FamilyConfig`), one line here and
one recipe; the contract tests pick it up. docs/architecture.md walks through it.
"""

from genkit.families.ar_prior import ArPrior, ArPriorConfig
from genkit.families.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from genkit.families.consistency import Consistency, ConsistencyConfig
from genkit.families.ddpm import DDPM, DDPMConfig
from genkit.families.edm import EDM, EDMConfig
from genkit.families.gan import GAN, GANConfig
from genkit.families.glow import Glow, GlowConfig
from genkit.families.ldm import LDM, LDMConfig
from genkit.families.meanflow import MeanFlow, MeanFlowConfig
from genkit.families.nice import NICE, NICEConfig
from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from genkit.families.vqgan import VQGAN, VQGANConfig

FAMILIES = {
    "autoencoder_kl": (AutoencoderKL, AutoencoderKLConfig),
    "ddpm": (DDPM, DDPMConfig),
    "edm": (EDM, EDMConfig),
    "gan": (GAN, GANConfig),
    "rectified_flow": (RectifiedFlow, RectifiedFlowConfig),
    "nice": (NICE, NICEConfig),
    "glow": (Glow, GlowConfig),
    "vqgan": (VQGAN, VQGANConfig),
    "ar_prior": (ArPrior, ArPriorConfig),
    "ldm": (LDM, LDMConfig),
    "consistency": (Consistency, ConsistencyConfig),
    "meanflow": (MeanFlow, MeanFlowConfig),
}
