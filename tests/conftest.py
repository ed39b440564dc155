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


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread, and one thread is immune to OpenMP spin-waits
    when another process (a subprocess test, a parallel job) shares the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
