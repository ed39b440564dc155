"""The family registry: a plain dict from `model.family` to (class, config dataclass)."""

from genkit.families.ddpm import DDPM, DDPMConfig
from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig

FAMILIES = {
    "ddpm": (DDPM, DDPMConfig),
    "rectified_flow": (RectifiedFlow, RectifiedFlowConfig),
}
