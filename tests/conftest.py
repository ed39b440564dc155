import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def toy_family(monkeypatch):
    """Register the toy family under model.family=toy for one test."""
    from toy_family import Toy, ToyConfig

    from genkit.families import FAMILIES

    monkeypatch.setitem(FAMILIES, "toy", (Toy, ToyConfig))
    return Toy


TINY_UNET = [
    "model.unet.channels=[8,16]", "model.unet.attention=[false,true]",
    "model.unet.layers_per_block=1", "model.unet.norm_groups=4",
]
