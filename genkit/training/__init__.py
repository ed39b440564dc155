"""The one trainer shared by every family, and the multi-stage orchestration around it."""

from genkit.training.stages import train
from genkit.training.trainer import Trainer, make_accelerator

__all__ = ["Trainer", "make_accelerator", "train"]
