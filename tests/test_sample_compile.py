"""`sample(compile=True)`: compiled frozen copies of the networks, never stale weights.

These run torch.compile with Dynamo's cheap "eager" backend: the private copies and their
fingerprints, which this file tests, behave the same under any backend, and Inductor's C++
build would cost a minute. Real Inductor parity is tests/reliability/test_compile_families.py
(slow step).
"""

import pytest
import torch

from genkit.errors import SamplerError
from genkit.families.ddpm import DDPM, DDPMConfig
from genkit.families.sampling import sample
from genkit.nn.unet import UNetConfig
from genkit.samplers import compiled as compiled_module
from genkit.samplers.compiled import fingerprint


@pytest.fixture(autouse=True)
def eager_backend(monkeypatch):
    monkeypatch.setattr(compiled_module, "BACKEND", "eager")

TINY_UNET = UNetConfig(channels=[8, 16], attention=[False, True], layers_per_block=1, norm_groups=4)


def _images(family, **kw) -> torch.Tensor:
    return sample(family, 4, sampler="ddim", steps=3, generator=torch.Generator().manual_seed(1), **kw).images


def test_compiled_sampling_matches_eager_and_follows_weight_updates():
    torch.manual_seed(0)
    family = DDPM(DDPMConfig(schedule="cosine", unet=TINY_UNET), shape=(1, 8, 8))
    unet = family.nets["unet"]
    eager, compiled = _images(family), _images(family, compile=True)
    assert family.nets["unet"] is unet                      # the original comes back after sampling
    (_, first), = family.nets._genkit_compiled.values()
    assert first is not unet and isinstance(first, torch._dynamo.eval_frame.OptimizedModule)
    assert (compiled - eager).abs().max() < 1e-4            # same images up to float rounding

    _images(family, compile=True)                           # unchanged weights: the compiled copy is reused
    assert family.nets._genkit_compiled["unet", "default"][1] is first

    with torch.no_grad():                                   # an in-place update, as an optimizer step does
        unet.conv_in.weight.mul_(1.5)
    eager2, compiled2 = _images(family), _images(family, compile=True)
    assert (eager2 - eager).abs().max() > 1e-2              # the update changes the images ...
    assert (compiled2 - eager2).abs().max() < 1e-4          # ... and compiled sampling sees it (no frozen stale graph)
    assert family.nets._genkit_compiled["unet", "default"][1] is not first


def test_fingerprint_sees_in_place_writes_and_replaced_data():
    net = torch.nn.Linear(2, 2)
    before = fingerprint(net)
    assert fingerprint(net) == before
    with torch.no_grad():
        net.weight.add_(0)
    assert fingerprint(net) != before
    before = fingerprint(net)
    net.bias.data = torch.zeros(2)
    assert fingerprint(net) != before


def test_cli_compile_flag_reaches_sample_and_eval(monkeypatch, tmp_path):
    """`genkit sample --compile` and `genkit eval fid ... --compile` pass compile=True on."""
    import genkit.api
    import genkit.eval.engine
    from genkit import cli

    seen = {}

    class Out:
        images, sampler, steps, nfe, seconds = torch.zeros(1, 1, 4, 4), "ddim", 1, 1, 0.0

    monkeypatch.setattr(genkit.api, "load", lambda run, device=None: object())
    monkeypatch.setattr(genkit.api, "sample_with_info", lambda family, n, **kw: seen.update(sample=kw) or Out())
    cli.main(["sample", str(tmp_path), "--compile", "--out", str(tmp_path / "g.png")])
    assert seen["sample"]["compile"] is True
    def fid(real, fake, s):
        seen.update(eval=s.sample.options)
        raise KeyboardInterrupt  # stop before the printing (the CLI turns it into exit code 130)

    monkeypatch.setattr(genkit.eval.engine, "compute_fid", fid)
    assert cli.main(["eval", "fid", "--real", "recipe:ddpm_digits", "--fake", str(tmp_path), "--n", "4",
                     "--compile"]) == 130
    assert seen["eval"] == {"compile": True}
    cli.main(["sample", str(tmp_path), "--compile-mode", "max-autotune", "--out", str(tmp_path / "g.png")])
    assert seen["sample"]["compile"] == "max-autotune"


def test_unknown_compile_mode_is_refused_naming_it():
    family = DDPM(DDPMConfig(unet=TINY_UNET), shape=(1, 8, 8))
    with pytest.raises(SamplerError, match="compile must be true, false or one of default, .*; got 'fastest'"):
        _images(family, compile="fastest")


def test_a_failing_compile_is_one_line_naming_the_mode_and_leaves_the_family_intact(monkeypatch):
    family = DDPM(DDPMConfig(unet=TINY_UNET), shape=(1, 8, 8))
    unet = family.nets["unet"]

    class Broken(torch.nn.Module):  # holds the copy's weights, as torch.compile's wrapper does
        def __init__(self, module):
            super().__init__()
            self.inner = module

        def forward(self, *args, **kwargs):
            raise torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("no g++ found"), None)

    monkeypatch.setattr(torch, "compile", lambda module, **options: Broken(module))
    with pytest.raises(SamplerError, match=r"compile='default': torch.compile failed: .*no g\+\+ found") as e:
        _images(family, compile=True)
    assert "\n" not in str(e.value)
    assert family.nets["unet"] is unet and torch.equal(_images(family), _images(family))  # eager still works
