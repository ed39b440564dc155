"""genkit: generative models behind one trainer, one sampler interface and one evaluation suite."""

__version__ = "0.1.0"

from genkit.api import load, sample, save_grid, train  # noqa: E402

__all__ = ["__version__", "load", "sample", "save_grid", "train"]
