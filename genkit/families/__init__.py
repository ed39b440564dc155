"""The family registry: a plain dict from `model.family` to (class, config dataclass)."""

from genkit.families.ddpm import DDPM, DDPMConfig

FAMILIES = {
    "ddpm": (DDPM, DDPMConfig),
}
