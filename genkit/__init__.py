"""genkit: generative models behind one trainer, one sampler interface and one evaluation suite.

`import genkit` is cheap (no torch): the API (`genkit.train`, `genkit.load`, `genkit.sample`,
`genkit.save_grid`, `genkit.load_recipe`) is imported from `genkit.api` on first use.
"""

from __future__ import annotations

from typing import Any

from genkit.version import __version__

__all__ = ["__version__", "load", "load_recipe", "sample", "save_grid", "train"]


def __getattr__(name: str) -> Any:
    """The API's functions, imported lazily (PEP 562) so that the CLI starts without torch."""
    if name in __all__:
        from genkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'genkit' has no attribute {name!r}")
