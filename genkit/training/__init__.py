"""The one trainer shared by every family."""

from genkit.training.trainer import Trainer, build_family, make_accelerator

__all__ = ["Trainer", "build_family", "make_accelerator"]
