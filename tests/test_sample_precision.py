"""`genkit.samplers.sample(precision=...)`: the networks run under autocast, the sampler stays float32."""

import pytest
import torch

from genkit.errors import SamplerError
from genkit.families.ddpm import DDPM, DDPMConfig
from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from genkit.families.sampling import sample
from genkit.nn.unet import UNetConfig

TINY_UNET = UNetConfig(channels=[8, 16], attention=[False, True], layers_per_block=1, norm_groups=4)


def _ddpm() -> DDPM:
    torch.manual_seed(0)
    return DDPM(DDPMConfig(schedule="cosine", unet=TINY_UNET), shape=(1, 8, 8))


def _flow() -> RectifiedFlow:
    torch.manual_seed(0)
    return RectifiedFlow(RectifiedFlowConfig(unet=TINY_UNET), shape=(1, 8, 8))


def _images(family, **kw) -> torch.Tensor:
    return sample(family, 4, sampler="ddim", steps=3, generator=torch.Generator().manual_seed(1), **kw).images


@pytest.mark.parametrize("make", [_ddpm, _flow])
def test_bf16_runs_the_network_in_bf16_and_stays_close_to_fp32(make):
    family = make()
    seen = []
    hook = family.nets["unet"].conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    fp32 = _images(family)
    assert set(seen) == {torch.float32}
    seen.clear()
    bf16 = _images(family, precision="bf16")
    hook.remove()
    assert set(seen) == {torch.bfloat16}     # the convolutions really ran in bf16 ...
    assert bf16.dtype == torch.float32       # ... and the images come back in float32
    diff = (bf16 - fp32).abs().max().item()
    assert 0 < diff < 0.1                    # bf16 keeps ~3 significant digits: close, not identical


def test_precision_no_is_the_default_bit_for_bit():
    family = _ddpm()
    assert torch.equal(_images(family), _images(family, precision="no"))


def test_unknown_precision_is_refused_naming_it():
    with pytest.raises(SamplerError, match="precision must be one of no, bf16, fp16, got 'int8'"):
        _images(_ddpm(), precision="int8")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_runs_matmuls_in_the_named_dtype(precision):
    """fp16 too: CPU autocast defaults to bf16, so the dtype must be passed on."""
    from genkit.samplers import PRECISIONS, autocast

    a = torch.randn(4, 4)
    with autocast(torch.device("cpu"), precision):
        assert (a @ a).dtype == PRECISIONS[precision]
    with autocast(torch.device("cpu"), "no"):
        assert (a @ a).dtype == torch.float32
