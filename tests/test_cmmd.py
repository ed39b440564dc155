"""CMMD (Jayasumana et al. 2024): the formula against an independent numpy reference, and its plumbing."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from genkit.errors import GenkitError
from genkit.eval import cmmd as cm
from genkit.eval import engine


def reference_cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """google-research/cmmd distance.mmd, from the paper: scale * (mean K_xx + mean K_yy - 2 mean K_xy), every mean
    over all pairs (diagonals included), K = exp(-||a - b||^2 / (2 sigma^2)); distances from explicit differences."""
    def mean_k(a: np.ndarray, b: np.ndarray) -> float:
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # (n, m)
        return float(np.exp(-d2 / (2 * sigma**2)).mean())

    return scale * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))


def unit_rows(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """n random L2-normalised embeddings (CLIP's are unit vectors), optionally pushed along the first axis."""
    x = np.random.default_rng(seed).normal(size=(n, d))
    x[:, 0] += shift
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n, m, shift", [(50, 70, 0.0), (64, 64, 3.0), (10, 200, 1.0)])
def test_cmmd_equals_the_reference_formula(n, m, shift):
    x, y = unit_rows(n, 32, 0), unit_rows(m, 32, 1, shift)
    want = reference_cmmd(x, y)
    assert want > 0
    assert cm.cmmd(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_cmmd_of_one_pair_is_the_closed_form():
    """With one embedding a side the biased estimator is 2 * scale * (1 - k(x, y)); the unbiased one is undefined."""
    x, y = torch.tensor([[0.6, 0.8]], dtype=torch.float64), torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    d2 = (0.6 - 1.0) ** 2 + 0.8**2
    assert cm.cmmd(x, y) == pytest.approx(2 * 1000 * (1 - np.exp(-d2 / 200)), rel=1e-12)


def test_cmmd_is_zero_for_identical_sets_and_grows_with_the_shift():
    x = torch.from_numpy(unit_rows(80, 16, 2))
    assert cm.cmmd(x, x) == 0.0
    assert cm.cmmd(x, x[torch.randperm(80, generator=torch.Generator().manual_seed(0))]) == pytest.approx(0, abs=1e-9)
    values = [cm.cmmd(x, torch.from_numpy(unit_rows(80, 16, 3, shift))) for shift in (0.0, 1.0, 3.0)]
    assert 0 < values[0] < values[1] < values[2]


def test_cmmd_blocks_do_not_change_the_value(monkeypatch):
    x, y = torch.from_numpy(unit_rows(37, 8, 4)), torch.from_numpy(unit_rows(23, 8, 5, 0.5))
    whole = cm.cmmd(x, y)
    monkeypatch.setattr(cm, "_BLOCK_ELEMENTS", 50)  # blocks of 1-2 rows
    assert cm.cmmd(x, y) == pytest.approx(whole, rel=1e-12)


def test_cmmd_refuses_mismatched_inputs_and_other_features():
    with pytest.raises(GenkitError, match="same d"):
        cm.cmmd(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(GenkitError, match="use --features cmmd"):
        cm.cmmd_values(torch.zeros(3, 4), torch.zeros(3, 4), engine.EvalSettings(features="inception"))
    out = cm.cmmd_values(torch.zeros(3, 4), torch.ones(2, 4), engine.EvalSettings(features="cmmd"))
    assert out["cmmd"] == out["value"] > 0 and (out["sigma"], out["scale"]) == (10.0, 1000.0)


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


def test_cmmd_as_a_feature_metric_of_the_engine(tmp_path, monkeypatch):
    """`cmmd_values` fits engine.FEATURE_METRICS: the engine's features of two SPECs, the protocol recorded."""
    import open_clip
    from open_clip import factory

    from genkit.eval.features import build_features

    monkeypatch.setitem(factory._MODEL_CONFIGS, "genkit-tiny", TINY_CLIP)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in open_clip.create_model("genkit-tiny").state_dict().items()},
              str(tmp_path / "tiny.safetensors"))
    rng = np.random.default_rng(0)
    real, fake = tmp_path / "real.npz", tmp_path / "fake.npz"
    np.savez(real, images=rng.integers(0, 256, (12, 3, 24, 40), dtype=np.uint8))
    np.savez(fake, images=rng.integers(0, 128, (9, 3, 24, 40), dtype=np.uint8))
    s = engine.EvalSettings(features="cmmd", protocol="genkit-tiny", weights=str(tmp_path / "tiny.safetensors"),
                            batch_size=5)
    with mock.patch.dict(engine.FEATURE_METRICS, {"cmmd": cm.cmmd_values}):
        out = engine.compute_metric("cmmd", str(real), str(fake), s)
        same = engine.compute_metric("cmmd", str(real), str(real), s)
    extractor = build_features("cmmd", protocol="genkit-tiny", weights=tmp_path / "tiny.safetensors")
    with np.load(real) as r, np.load(fake) as f:
        want = reference_cmmd(extractor(torch.from_numpy(r["images"])).double().numpy(),
                              extractor(torch.from_numpy(f["images"])).double().numpy())
    assert out["cmmd"] == pytest.approx(want, rel=1e-6) and out["n_real"] == 12 and out["n_fake"] == 9
    assert out["protocol"]["features"] == "cmmd" and out["protocol"]["output"] == "image embedding, L2-normalised"
    assert abs(same["cmmd"]) < 1e-9
