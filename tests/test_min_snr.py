"""Min-SNR-gamma loss weighting (Hang et al. 2023) for DDPM and latent diffusion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genkit.errors import ConfigError, DataError, SamplerError
from genkit.families.base import Autoencoder, StepHandle
from genkit.families.ddpm import DDPM, DDPMConfig, NoiseSchedule, make_betas, min_snr_weight
from genkit.families.ldm import LDM, LDMConfig
from genkit.nn.cond_unet import CondUNetConfig
from genkit.nn.text import TextConfig
from genkit.nn.unet import UNetConfig
from genkit.samplers.adapters import TO_X0, training_target

TINY = UNetConfig(channels=[8, 16], attention=[False, False], layers_per_block=1, norm_groups=4)


@pytest.mark.parametrize("snr, gamma, want", [
    (10.0, 5.0, {"epsilon": 0.5, "x0": 5.0, "v": 5 / 11}),   # SNR above gamma: clipped
    (1.0, 5.0, {"epsilon": 1.0, "x0": 1.0, "v": 0.5}),       # below: eps weight 1, v weight SNR / (SNR + 1)
    (0.25, 1.0, {"epsilon": 1.0, "x0": 0.25, "v": 0.2}),
])
def test_weights_equal_the_closed_form(snr, gamma, want):
    for prediction, w in want.items():
        assert float(min_snr_weight(torch.tensor([snr], dtype=torch.float64), prediction, gamma)) == pytest.approx(w)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_weighted_loss_of_every_prediction_is_min_snr_times_the_x0_error(prediction):
    """The paper's point: w_pred ||pred_hat - pred||^2 = min(SNR, gamma) ||x0_hat - x0||^2 for each type."""
    schedule = NoiseSchedule(make_betas("linear", 1000))
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 50, 300, 999])
    x0, eps = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, 2, generator=g,
                                                                                    dtype=torch.float64)
    ab = schedule.alpha_bar[t].view(-1, 1, 1, 1)
    alpha, s = ab.sqrt(), (1 - ab).sqrt()
    z = alpha * x0 + s * eps
    target = training_target(prediction, x0, eps, alpha, s)
    out = target + 0.1 * torch.randn(target.shape, generator=g, dtype=torch.float64)  # an imperfect network
    x0_hat = TO_X0[prediction](z, out, alpha, s)
    snr = schedule.snr(t)
    assert torch.allclose(snr, ab.flatten() / (1 - ab.flatten()))
    lhs = min_snr_weight(snr, prediction, 5.0) * ((out - target) ** 2).flatten(1).mean(1)
    rhs = snr.clamp(max=5.0) * ((x0_hat - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_ddpm_loss_uses_the_weights(prediction, monkeypatch):
    torch.manual_seed(0)
    family = DDPM(DDPMConfig(prediction=prediction, loss_weighting="min-snr", snr_gamma=5.0, unet=TINY), (1, 8, 8))
    x0, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([1, 20, 400, 990])
    out = torch.randn(4, 1, 8, 8)
    monkeypatch.setattr(family, "unet", lambda xt, t_in, label=None: out)
    _, target = family.schedule.noised(x0, t, eps, prediction)
    per_sample = ((out - target) ** 2).flatten(1).mean(1)
    want = (min_snr_weight(family.schedule.snr(t), prediction, 5.0).float() * per_sample).mean()
    torch.testing.assert_close(family.loss(x0, t, eps), want)
    plain = DDPM(DDPMConfig(prediction=prediction, unet=TINY), (1, 8, 8))
    monkeypatch.setattr(plain, "unet", lambda xt, t_in, label=None: out)
    torch.testing.assert_close(plain.loss(x0, t, eps), per_sample.mean())
    assert abs(float(plain.loss(x0, t, eps)) - float(want)) > 1e-3  # the weighting changes the loss


def test_snr_gamma_must_be_positive():
    with pytest.raises(ConfigError, match="model.snr_gamma"):
        DDPM(DDPMConfig(loss_weighting="min-snr", snr_gamma=0.0, unet=TINY), (1, 8, 8))


class Identity(Autoencoder):
    """A first stage whose latents are the images (for a loss test without training an autoencoder)."""

    name = "identity"

    def __init__(self):
        self.nets = nn.ModuleDict({"p": nn.Linear(1, 1)})

    def encode(self, x):
        return x

    def decode(self, z):
        return z


class Draws(StepHandle):
    device = torch.device("cpu")

    def __init__(self, t, eps):
        self.t, self.eps, self.loss = t, eps, None

    def step(self, group, loss):
        self.loss = loss
        return True

    def rand(self, n):
        return torch.ones(n)  # no caption dropout

    def randint(self, high, n):
        return self.t

    def randn(self, n, *shape):
        return self.eps


def tiny_ldm(num_classes: int = 0, first_stage: Autoencoder | None = None, **cfg) -> LDM:
    """An LDM on (1, 8, 8) images (latents: the images themselves unless another first stage is given)."""
    torch.manual_seed(0)
    cfg = {"scale_factor": 1.0, "unet": CondUNetConfig(channels=[16, 32], cross_attention=[False, True], head_dim=16),
           "text": TextConfig(width=16, heads=2, layers=1, context_length=8), **cfg}
    return LDM(LDMConfig(**cfg), shape=(1, 8, 8), first_stage=first_stage or Identity(), num_classes=num_classes)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ldm_loss_uses_the_weights(prediction, monkeypatch):
    family = tiny_ldm(prediction=prediction, loss_weighting="min-snr", snr_gamma=2.0)
    x0, eps, out = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([3, 100, 500, 900])
    monkeypatch.setattr(family, "unet", lambda z, t_in, text, label=None: out)
    opt = Draws(t, eps)
    family.train_step({"image": x0, "caption": ["a"] * 4, "label": torch.zeros(4, dtype=torch.long)}, 0, opt)
    _, target = family.schedule.noised(x0, t, eps, prediction)
    per_sample = ((out - target) ** 2).flatten(1).mean(1)
    want = (min_snr_weight(family.schedule.snr(t), prediction, 2.0).float() * per_sample).mean()
    torch.testing.assert_close(opt.loss, want)


def test_ldm_scale_factor_reads_images_evenly_spread_over_a_large_training_split():
    """Up to SCALE_IMAGES images, every (len // SCALE_IMAGES)-th: 1 / their latents' std."""
    from genkit.families.ldm import SCALE_IMAGES, data_scale_factor

    n = 2 * SCALE_IMAGES + 3
    scale = torch.arange(n, dtype=torch.float32) / n   # image i is constant, its value i / n

    class Ramp:
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"image": torch.full((1, 2, 2), float(scale[i]))}

    want = 1 / float(scale[::2][:SCALE_IMAGES].double().repeat_interleave(4).std())
    assert data_scale_factor(Identity(), Ramp()) == pytest.approx(want, rel=1e-6)


def test_ldm_noise_schedule_spans_the_same_sigmas_as_ddpm():
    """LDM's discrete schedule is DDPM's: the same sigma table, span (t = 0 to T - 1) and step grids."""
    ldm = tiny_ldm(schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012, timesteps=200)
    ddpm = DDPM(DDPMConfig(schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012, timesteps=200, unet=TINY),
                (1, 8, 8))
    table = ddpm.schedule.sigma_table
    assert ldm.sigma_range() == ddpm.sigma_range() == (float(table[0]), float(table[-1]))
    torch.testing.assert_close(ldm.sigmas(7), ddpm.sigmas(7))


def test_gradient_checkpointing_reaches_each_familys_networks():
    """train.gradient_checkpointing: the UNet of the UNet families, the autoencoder of autoencoder_kl, and
    LDM's conditional UNet switch it on."""
    from genkit.families.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

    ddpm = DDPM(DDPMConfig(unet=TINY), (1, 8, 8))
    ae = AutoencoderKL(AutoencoderKLConfig(channels=[8, 8], norm_groups=8, latent_channels=2), (1, 8, 8))
    ldm = tiny_ldm()
    for family, net in ((ddpm, "unet"), (ae, "vae"), (ldm, "unet")):
        assert not family.nets[net].is_gradient_checkpointing
        family.enable_gradient_checkpointing()
        assert family.nets[net].is_gradient_checkpointing, type(family).__name__


def test_lora_model_loads_a_plain_runs_weights_under_its_adapters_and_refuses_mismatches(tmp_path):
    """x.weight -> x.base_layer.weight; a LoRA run's own keys load too; a missing or reshaped tensor is a
    one-line error naming it."""
    from genkit.families.ldm import LoRAConfig

    plain = tiny_ldm().nets.state_dict()
    lora = tiny_ldm(lora=LoRAConfig(rank=2))
    lora.init_from_weights(plain, tmp_path)
    own = {k: v.clone() for k, v in lora.nets.state_dict().items()}
    renamed = [k for k in own if ".base_layer." in k]
    assert {v.shape[0] for k, v in own.items() if ".lora_A." in k} == {2}   # adapters of rank 2
    assert renamed and all(torch.equal(own[k], plain[k.replace(".base_layer.", ".")]) for k in renamed)
    lora.init_from_weights({k: v + 1 for k, v in own.items()}, tmp_path)   # a LoRA run's weights
    assert torch.equal(lora.nets.state_dict()[renamed[0]], own[renamed[0]] + 1)
    key = renamed[0].replace(".base_layer.", ".")
    with pytest.raises(ConfigError, match=f"^model.init_from: '{tmp_path}' lacks {renamed[0]}: use the model "
                                          "config of that run$"):
        lora.init_from_weights({k: v for k, v in plain.items() if k != key}, tmp_path)
    shape = tuple(plain[key].shape)
    with pytest.raises(ConfigError, match=rf"^model.init_from: '{tmp_path}' has {renamed[0]} of shape \(3,\), "
                                          rf"this model \({', '.join(map(str, shape))},?\): use the model config"):
        lora.init_from_weights({**plain, key: torch.zeros(3)}, tmp_path)
    with pytest.raises(ConfigError, match="^model.lora.rank must be >= 0, got -1$"):
        tiny_ldm(lora=LoRAConfig(rank=-1))


def test_lora_adapters_follow_the_config_and_start_as_the_identity():
    """rank r, scale alpha / r (alpha defaults to r), dropout p on the targets; A ~ N(0, 1/r^2) (peft's
    "gaussian", as diffusers' LoRA scripts), B = 0 so the adapted UNet starts as the base one."""
    from genkit.families.ldm import LoRAConfig

    for cfg, scale in [(LoRAConfig(rank=4), 1.0), (LoRAConfig(rank=4, alpha=2.0, dropout=0.25), 0.5)]:
        unet = tiny_ldm(lora=cfg).nets["unet"]
        adapted = [m for m in unet.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
        names = [n for n, m in unet.named_modules() if m in adapted]
        assert {t for n in names for t in cfg.targets if n.endswith("." + t)} == set(cfg.targets)
        for m in adapted:
            assert m.r["default"] == 4 and m.scaling["default"] == pytest.approx(scale)
            drop = m.lora_dropout["default"]
            assert (drop.p if cfg.dropout else 0.0) == cfg.dropout and isinstance(drop, nn.Dropout) == bool(cfg.dropout)
            assert not m.lora_B["default"].weight.any()
        a = torch.cat([m.lora_A["default"].weight.detach().flatten() for m in adapted])
        assert a.numel() > 500 and float(a.std()) == pytest.approx(1 / 4, rel=0.15)  # kaiming-uniform: ~0.1


def test_ldm_refuses_uncaptioned_batches_naming_the_data_it_needs():
    with pytest.raises(DataError, match=r"^model.family=ldm trains on captioned data: data.source=digits, or a "
                                        r"folder with metadata.jsonl \(file_name, text\)$"):
        tiny_ldm().train_step({"image": torch.zeros(2, 1, 8, 8), "label": torch.zeros(2, dtype=torch.long)}, 0,
                              Draws(torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 8, 8)))


def test_lora_refuses_unknown_targets_in_one_line():
    from genkit.families.ldm import LoRAConfig

    with pytest.raises(ConfigError, match=r"^model.lora.targets \['to_nowhere'\]: Target modules \{'to_nowhere'\} "
                                          r"not found in the base model\. [^\n]*$"):
        tiny_ldm(lora=LoRAConfig(rank=2, targets=["to_nowhere"]))


def test_class_conditional_ldm_trains_on_dropped_labels_after_the_caption_draw(monkeypatch):
    """Draw order: caption dropout, label dropout (null label C where u < cond_dropout or unlabelled), t, eps."""
    from step_handles import RecordingHandle

    family = tiny_ldm(num_classes=3, class_cond=True, cond_dropout=0.5)
    seen = {}

    def unet(zt, t_in, text, label=None):
        seen["label"] = label
        return torch.zeros_like(zt, requires_grad=True)

    monkeypatch.setattr(family, "unet", unet)
    label = torch.tensor([0, 1, 2, -1, 1, 2])
    opt = RecordingHandle(seed=3)
    family.train_step({"image": torch.zeros(6, 1, 8, 8), "caption": ["a"] * 6, "label": label}, 0, opt)
    _, keep, t, eps = opt.draws
    assert keep.shape == t.shape == (6,) and eps.shape == (6, *family.latent_shape)
    want = torch.where((keep < 0.5) | (label < 0), 3, label)
    assert 0 < int((want == 3).sum()) < 6 and torch.equal(seen["label"], want)


def test_class_conditional_ldm_unet_reads_the_null_label_by_default_and_denoise_passes_labels():
    """Without labels a class-conditional UNet sees the null label C; an unconditional LDM refuses labels."""
    family = tiny_ldm(num_classes=3, class_cond=True)
    torch.nn.init.normal_(family.nets["unet"].class_embedding.weight)
    z, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 500.0])
    text = family.embed(["a", "b"])
    seen = []
    family.nets["unet"].register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"]), with_kwargs=True)
    with torch.no_grad():
        null = family.unet(z, t, text)
        assert torch.equal(seen[0], torch.tensor([3, 3]))  # one null label per sample
        torch.testing.assert_close(null, family.unet(z, t, text, torch.tensor([3, 3])))
        assert not torch.allclose(null, family.unet(z, t, text, torch.tensor([0, 0])))
        sigma = torch.tensor([0.5, 2.0])
        assert not torch.allclose(family.denoise(z, sigma, text, torch.tensor([0, 1])),
                                  family.denoise(z, sigma, text, torch.tensor([2, 2])))
    with pytest.raises(SamplerError, match=r"^family 'ldm' is not class-conditional \(model.class_cond: false\); "
                                           r"it takes prompts$"):
        tiny_ldm().unet(z, t, text, torch.tensor([0, 1]))


def test_ldm_conditions_cycle_prompts_and_refuse_what_it_cannot_condition_on():
    family = tiny_ldm()
    with torch.no_grad():
        cond, uncond = family.conditions(3, prompts="a seven")
        torch.testing.assert_close(cond["text"], family.embed(["a seven"] * 3))
        torch.testing.assert_close(uncond["text"], family.embed([""] * 3))
        cond, _ = family.conditions(2)  # no model.sample_prompts: the empty caption
        torch.testing.assert_close(cond["text"], family.embed(["", ""]))
        family.cfg.sample_prompts = ["one", "two"]
        cond, _ = family.conditions(3)
        torch.testing.assert_close(cond["text"], family.embed(["one", "two", "one"]))
    with pytest.raises(SamplerError, match="^prompts: empty list; give at least one prompt$"):
        family.conditions(2, prompts=[])
    with pytest.raises(SamplerError, match=r"^family 'ldm' is not class-conditional \(model.class_cond: false\); "
                                           r"give prompts$"):
        family.conditions(2, labels=[1, 2])
    _, uncond = tiny_ldm(num_classes=3, class_cond=True).conditions(2, labels=[0, 1])
    assert torch.equal(uncond["label"], torch.tensor([3, 3]))


def test_ldm_sigma_grid_follows_the_configured_spacing():
    for spacing in ("leading", "trailing", "linspace"):
        family = tiny_ldm(spacing=spacing)
        assert torch.equal(family.sigmas(7), family.schedule.sigmas(7, spacing))
    assert not torch.equal(tiny_ldm(spacing="trailing").sigmas(7), tiny_ldm().sigmas(7))


def test_ldm_is_built_from_its_config_and_refuses_bad_values_naming_the_key():
    class Halving(Identity):  # latents of 2 channels at half the size: (1, 8, 8) images -> (2, 4, 4)
        def encode(self, x):
            return torch.cat([x, -x], 1)[..., ::2, ::2]

    def build(num_classes=0, **cfg):
        return tiny_ldm(num_classes, Halving(), **cfg)

    sf = r"^model.scale_factor must be > 0 \(set by `genkit train` from the data\), got "
    for kw, msg in (({"scale_factor": None}, sf + "None$"), ({"scale_factor": 0.0}, sf + "0.0$"),
                    ({"scale_factor": -1.0}, sf + "-1.0$"),
                    ({"caption_dropout": -0.1}, r"^model.caption_dropout: must be in \[0, 1\), got -0.1$"),
                    ({"caption_dropout": 1.0}, r"^model.caption_dropout: must be in \[0, 1\), got 1.0$"),
                    ({"cond_dropout": 1.0}, r"^model.cond_dropout: must be in \[0, 1\), got 1.0$"),
                    ({"snr_gamma": 0.0}, r"^model.snr_gamma: must be > 0, got 0.0$")):
        with pytest.raises(ConfigError, match=msg):
            build(**kw)
    with pytest.raises(ConfigError, match=r"^model.class_cond: the dataset has 1 classes; class conditioning needs "
                                          r"labelled data$"):
        build(num_classes=1, class_cond=True)
    assert build(num_classes=2, class_cond=True).nets["unet"].class_embedding.num_embeddings == 3  # two classes do
    family = build(num_classes=3, caption_dropout=0.0, cond_dropout=0.0, timesteps=50, beta_start=1e-3,
                   beta_end=0.05, schedule="linear")
    assert family.num_classes == 0 and family.nets["unet"].class_embedding is None  # labels without class_cond
    torch.testing.assert_close(family.schedule.betas, make_betas("linear", 50, 1e-3, 0.05))
    unet = family.nets["unet"]
    assert (unet.config.in_channels, unet.config.sample_size, unet.config.cross_attention_dim) == (2, 4, 16)
    assert family.frozen_text is None and set(family.nets) == {"unet", "text"} and family.latent_shape == (2, 4, 4)
    assert family.sample_shape == (1, 8, 8) and family.cfg.timesteps == 50
    cond = build(num_classes=3, class_cond=True, schedule="cosine")
    assert cond.num_classes == 3 and cond.nets["unet"].class_embedding.num_embeddings == 4  # + the null label
    torch.testing.assert_close(cond.schedule.betas, make_betas("cosine", 1000, 1e-4, 0.02))


def test_ldm_with_a_pretrained_text_tower_keeps_it_frozen_outside_the_nets(tmp_path):
    """text.encoder=local-dir: the open_clip tower is used, frozen, and neither saved in nets nor optimised."""
    from test_ldm import local_clip

    _, folder = local_clip(tmp_path / "clip")
    family = tiny_ldm(text=TextConfig(encoder=f"local-dir:{folder}"))
    assert family.frozen_text is not None and family.text_encoder() is family.frozen_text
    assert set(family.nets) == {"unet"} and family.nets["unet"].config.cross_attention_dim == 32
    assert not any(p.requires_grad for p in family.frozen_text.parameters())
    assert {id(p) for p in family.param_groups()["model"]} == {id(p) for p in family.nets["unet"].parameters()}
