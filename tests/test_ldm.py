"""Latent diffusion: first stage, text conditioning, guidance, captions, LoRA, prompts end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from step_handles import RecordingHandle
from torch import nn

import genkit
from genkit.data import build_dataset
from genkit.data.captions import DIGIT_WORDS, digit_prompt
from genkit.errors import DataError, SamplerError
from genkit.eval.conditional import prompt_accuracy
from genkit.families.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from genkit.families.base import StepHandle
from genkit.families.first_stage import latent_scale_factor
from genkit.families.ldm import LDM, LDMConfig
from genkit.families.sampling import resolve_grid, sample, sigma_grid
from genkit.io import to_uint8
from genkit.nn.cond_unet import CondUNetConfig
from genkit.nn.text import TextConfig, TextEncoder
from genkit.runs import load_recipe, load_stage, run_recipe
from genkit.samplers import SAMPLERS
from genkit.samplers.guidance import guided


def load_first_stage(spec: str):
    """The frozen first stage an LDM recipe's model.first_stage names, as the run loader resolves it."""
    return load_stage(spec, LDM.stages[0])

AE_OVERRIDES = ["data.image_size=8", "data.batch_size=32", "model.channels=[16,32]", "model.norm_groups=8",
                "model.latent_channels=2", "train.steps=200", "train.log_every=50", "train.warmup=10",
                "optim.model.lr=3e-3"]
TINY_LDM = ["data.image_size=8", "data.batch_size=16", "model.unet.channels=[16,32]",
            "model.unet.cross_attention=[false,true]", "model.unet.head_dim=16",
            "model.text.width=16", "model.text.heads=2", "model.text.layers=1", "model.text.context_length=8",
            "train.sample_every=0", "train.checkpoint_every=100", "train.log_every=100", "sample.n=4",
            "sample.steps=2", "train.ema_decay=null"]


def images(data_cfg, split: str) -> torch.Tensor:
    data = build_dataset(data_cfg, split)
    return torch.stack([data[i]["image"] for i in range(len(data))])


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    """A KL autoencoder trained briefly on the 8x8 digits through the trainer (shared by the module)."""
    out = tmp_path_factory.mktemp("ae") / "run"
    return genkit.train(load_recipe("autoencoder_kl_digits", AE_OVERRIDES), out=out)


@pytest.fixture(scope="module")
def ldm_run(ae_run, tmp_path_factory):
    """A tiny LDM trained 3 steps on that first stage (scale factor computed by the trainer hook)."""
    out = tmp_path_factory.mktemp("ldm") / "run"
    return genkit.train(load_recipe("ldm_digits_text", [*TINY_LDM, f"model.first_stage={ae_run}", "train.steps=3"]),
                        out=out)


def test_latent_round_trip_keeps_images_close_and_the_scale_gives_unit_variance(ae_run):
    stage = load_first_stage(str(ae_run))
    cfg = load_recipe("autoencoder_kl_digits", AE_OVERRIDES).data
    test, train = images(cfg, "test"), images(cfg, "train")  # held out, trained on
    with torch.no_grad():
        rec = stage.decode(stage.encode(test)).clamp(-1, 1)
    err = (rec - test).abs().mean()
    baseline = (test - train.mean(0)).abs().mean()  # the best constant image
    assert err < 0.35 * baseline, (float(err), float(baseline))
    scale = latent_scale_factor(stage, train)
    with torch.no_grad():
        z_test = stage.encode(test) * scale
    assert 0.85 < float(z_test.std()) < 1.15  # unit variance carries over to held-out images
    assert abs(float((stage.encode(train) * scale).std()) - 1) < 1e-4


def test_the_run_stores_the_scale_factor_of_its_data(ae_run, ldm_run):
    family = genkit.load(ldm_run, device="cpu")
    expected = latent_scale_factor(load_first_stage(str(ae_run)), images(run_recipe(ldm_run).data, "train"))
    assert family.cfg.scale_factor == pytest.approx(expected, rel=1e-6)
    assert family.cfg.first_stage == str(ae_run.resolve())
    assert not any(p is q for p in family.first_stage.nets.parameters() for q in family.nets.parameters())
    assert all(not p.requires_grad for p in family.first_stage.nets.parameters())


def tiny_ldm(ae_run, **cfg) -> LDM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        family = LDM(LDMConfig(scale_factor=1.3, unet=CondUNetConfig(channels=[16, 32], cross_attention=[False, True],
                                                                      head_dim=16),
                               text=TextConfig(width=16, heads=2, layers=1, context_length=8), **cfg),
                     shape=(1, 8, 8), num_classes=10, first_stage=load_first_stage(str(ae_run)))
    return family


def test_guidance_one_is_conditional_and_zero_unconditional_through_the_ldm_denoiser(ae_run):
    family = tiny_ldm(ae_run)
    family.nets.eval()
    z = torch.randn(4, *family.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((4,), 1.5)
    cond, uncond = family.conditions(4, prompts=["a handwritten digit seven"])
    with torch.no_grad():
        x_c = family.denoise(z, sigma, **cond)
        x_u = family.denoise(z, sigma)  # no text: the empty caption
        assert (x_c - x_u).abs().max() > 1e-4  # the prompt matters, so the checks below can fail
        torch.testing.assert_close(guided(family.denoise, cond, uncond, 1.0)(z, sigma), x_c, rtol=0, atol=0)
        torch.testing.assert_close(guided(family.denoise, cond, uncond, 0.0)(z, sigma), x_u, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(guided(family.denoise, cond, uncond, 4.0)(z, sigma), x_u + 4 * (x_c - x_u),
                                   rtol=1e-4, atol=1e-5)


def test_conditions_cycle_prompts_and_refuse_labels_without_class_conditioning(ae_run):
    family = tiny_ldm(ae_run)
    cond, uncond = family.conditions(5, prompts=["a", "b"])
    a, b = family.embed(["a"]), family.embed(["b"])
    assert torch.equal(cond["text"][2:3], a) and torch.equal(cond["text"][3:4], b)
    assert torch.equal(uncond["text"][4:5], family.embed([""]))
    with pytest.raises(SamplerError, match="class-conditional"):
        family.conditions(2, labels=[3])
    labelled = tiny_ldm(ae_run, class_cond=True)
    cond, uncond = labelled.conditions(3, prompts=["x"], labels=[4])
    assert cond["label"].tolist() == [4, 4, 4] and uncond["label"].tolist() == [10, 10, 10]


class FixedDraws(StepHandle):
    """A StepHandle whose draws are given: rand -> caption dropout, randint -> t, randn -> eps."""

    device = torch.device("cpu")

    def __init__(self, u: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        self.u, self.t, self.eps, self.stepped = u, t, eps, []

    def step(self, group, loss):
        self.stepped.append((group, loss))
        return True

    def rand(self, n):
        return self.u[:n]

    def randint(self, high, n):
        assert high == 1000  # model.timesteps
        return self.t[:n]

    def randn(self, n, *shape):
        return self.eps[:n]


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_train_step_regresses_the_closed_form_target_and_drops_captions_where_u_is_below_the_rate(
        ae_run, monkeypatch, prediction):
    """z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps, z0 = scale_factor E(x); target eps, z0 or
    v = sqrt(ab_t) eps - sqrt(1 - ab_t) z0 (Salimans & Ho 2022); captions "" where u < caption_dropout
    (u = 0.1 keeps its caption)."""
    family = tiny_ldm(ae_run, prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    t, u = torch.tensor([0, 250, 600, 999]), torch.tensor([0.05, 0.5, 0.1, 0.101])  # caption_dropout 0.1
    eps = torch.randn(4, *family.latent_shape, generator=g)
    with torch.no_grad():
        z0 = 1.3 * family.first_stage.encode(x)  # tiny_ldm's scale_factor
    ab = torch.tensor([math.prod(1 - b for b in torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)[:k + 1].tolist())
                       for k in t.tolist()]).float().view(-1, 1, 1, 1)  # alpha_bar_t = prod_{s <= t} (1 - beta_s)
    target = {"epsilon": eps, "x0": z0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * z0}[prediction]
    seen = {}

    def unet(zt, t_in, text, label=None):
        seen.update(zt=zt, t=t_in, text=text, label=label)
        return target.clone().requires_grad_(True)  # predicting the target exactly: loss 0

    monkeypatch.setattr(family, "unet", unet)
    opt = FixedDraws(u, t, eps)
    captions = ["one", "two", "three", "four"]
    logs = family.train_step({"image": x, "caption": captions, "label": torch.zeros(4, dtype=torch.long)}, 0, opt)
    torch.testing.assert_close(seen["zt"], ab.sqrt() * z0 + (1 - ab).sqrt() * eps, rtol=1e-5, atol=1e-6)
    assert seen["t"].tolist() == t.float().tolist() and seen["label"] is None
    with torch.no_grad():
        torch.testing.assert_close(seen["text"], family.text_encoder()(["", "two", "three", "four"]))
    assert [group for group, _ in opt.stepped] == ["model"] and float(logs["loss"]) < 1e-10
    monkeypatch.setattr(family, "unet", lambda zt, t_in, text, label=None: torch.zeros_like(zt, requires_grad=True))
    logs = family.train_step({"image": x, "caption": captions, "label": torch.zeros(4, dtype=torch.long)}, 0, opt)
    assert float(logs["loss"]) == pytest.approx(float((target ** 2).mean()), rel=1e-5)  # the loss is the MSE


def test_caption_dropout_rate_over_many_draws(ae_run, monkeypatch):
    family = tiny_ldm(ae_run)
    n, p = 4000, family.cfg.caption_dropout
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    seen = []

    def encoder(captions):
        seen.extend(captions)
        return torch.zeros(len(captions), 8, 16)

    monkeypatch.setattr(family, "text_encoder", lambda: encoder)
    monkeypatch.setattr(family, "unet", lambda zt, t, text, label=None: torch.zeros_like(zt, requires_grad=True))
    opt = FixedDraws(u, torch.zeros(n, dtype=torch.long), torch.zeros(n, *family.latent_shape))
    family.train_step({"image": torch.zeros(n, 1, 8, 8), "caption": ["a digit"] * n,
                       "label": torch.zeros(n, dtype=torch.long)}, 0, opt)
    dropped = torch.tensor([c == "" for c in seen])
    assert torch.equal(dropped, u < p)
    assert abs(float(dropped.float().mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 standard errors


def test_samplers_run_on_latents_and_decode_to_images(ldm_run):
    family = genkit.load(ldm_run, device="cpu")
    for sampler in ("ddim", "dpmpp-2m", "ancestral"):
        out = genkit.api.sample_with_info(family, 3, sampler=sampler, steps=3, prompts="a handwritten digit two",
                                          guidance=4.0)
        assert out.images.shape == (3, *family.sample_shape) and out.nfe == 3
        cond, uncond = family.conditions(3, prompts=["a handwritten digit two"])
        g, fn = torch.Generator().manual_seed(0), SAMPLERS[sampler].fn  # seed 0: sample_with_info's default
        with torch.no_grad():  # the guided sampler on latents from the same draws, then the first stage's decoder
            latents = fn(guided(family.denoise, cond, uncond, 4.0), torch.randn((3, *family.latent_shape), generator=g),
                         sigma_grid(family, 3, resolve_grid(family, SAMPLERS[sampler], None)), generator=g)
            torch.testing.assert_close(out.images, family.decode_latents(latents).clamp(-1, 1), rtol=1e-5, atol=1e-5)
    noise = torch.randn(3, *family.latent_shape)
    z_final = sample(family, 3, sampler="ddim", steps=2, noise=noise).images
    assert z_final.shape == (3, 1, 8, 8)


def test_cli_prompt_and_prompts_file(ldm_run, tmp_path, capsys):
    from genkit.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit seven\n\nthe number 3\n")
    assert main(["sample", str(ldm_run), "--prompt", "a handwritten digit seven", "--guidance", "4",
                 "--sampler", "dpmpp-2m", "--steps", "3", "--n", "2", "--out", str(tmp_path / "a.png")]) == 0
    assert "NFE 3" in capsys.readouterr().out and (tmp_path / "a.png").exists()
    assert main(["sample", str(ldm_run), "--prompts", str(prompts), "--n", "4", "--steps", "2",
                 "--out", str(tmp_path / "b.png")]) == 0
    (tmp_path / "empty.txt").write_text("\n")
    capsys.readouterr()
    assert main(["sample", str(ldm_run), "--prompts", str(tmp_path / "empty.txt"), "--n", "2",
                 "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no prompts" in err[0]


def test_digit_captions_name_the_items_label():
    data = build_dataset(load_recipe("ldm_digits_text").data, "train")
    words = {w: i for i, w in enumerate(DIGIT_WORDS)}
    for i in range(0, 1500, 7):
        item = data[i]
        last = item["caption"].split()[-1]
        assert words.get(last, int(last) if last.isdigit() else -1) == int(item["label"]), item["caption"]
    assert digit_prompt(7) == "a handwritten digit seven"


def test_captioned_folder_reads_metadata_jsonl(tmp_path):
    from PIL import Image

    from genkit.config import DataConfig

    for k in range(3):
        Image.new("RGB", (10, 12), (40 * k, 0, 0)).save(tmp_path / f"{k}.png")
    rows = [{"file_name": f"{k}.png", "text": f"red {k}", "label": k % 2} for k in (2, 0, 1)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = build_dataset(DataConfig(source="folder", root=str(tmp_path), image_size=8), "train")
    assert len(data) == 3 and data.num_classes == 2
    assert [data[i]["caption"] for i in range(3)] == ["red 2", "red 0", "red 1"]
    assert [int(data[i]["label"]) for i in range(3)] == [0, 0, 1]
    assert data[0]["image"].shape == (3, 8, 8)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n{"file_name": "9.png", "text": "b"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:2: image .*9.png' not found"):
        build_dataset(DataConfig(source="folder", root=str(tmp_path), image_size=8), "train")


def test_lora_trains_only_the_adapters_and_keeps_the_base_weights(ldm_run, tmp_path):
    overrides = [*TINY_LDM, f"model.init_from={ldm_run}", "model.lora.rank=4", "train.steps=3",
                 "optim.model.lr=1e-2"]
    run = genkit.train(load_recipe("ldm_digits_text", overrides), out=tmp_path / "lora")
    base, tuned = genkit.load(ldm_run, device="cpu"), genkit.load(run, device="cpu")
    assert tuned.cfg.first_stage == base.cfg.first_stage and tuned.cfg.scale_factor == base.cfg.scale_factor
    assert all(".lora_" in n for n, p in tuned.nets.named_parameters() if p in set(tuned.param_groups()["model"]))
    base_weights, tuned_weights = base.nets.state_dict(), tuned.nets.state_dict()
    lora_b = [k for k in tuned_weights if ".lora_B." in k]
    assert lora_b and any(tuned_weights[k].abs().max() > 0 for k in lora_b)  # adapters trained (B starts at 0)
    for key, value in tuned_weights.items():
        if ".lora_" not in key:
            assert torch.equal(value, base_weights[key.replace(".base_layer.", ".")]), key
    z = torch.randn(2, *base.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, _ = base.conditions(2, prompts=["a handwritten digit one"])
        assert not torch.allclose(base.denoise(z, torch.full((2,), 1.0), **cond),
                                  tuned.denoise(z, torch.full((2,), 1.0), **cond))


def local_clip(folder):
    """A small random open_clip CLIP saved as a local-dir folder (the layout of a downloaded model)."""
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    clip = open_clip.CLIP(**cfg).eval()
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(clip.state_dict(), str(folder / "open_clip_model.safetensors"))
    return clip, folder


def test_clip_score_from_local_weights_and_a_clear_error_without(tmp_path):
    import torch.nn.functional as F

    from genkit.errors import GenkitError
    from genkit.eval.clip_score import clip_score

    images = torch.rand(4, 1, 8, 8) * 2 - 1
    prompts = ["a handwritten digit seven", "the number 3", "a cat", ""]
    with pytest.raises(GenkitError, match="local weights"):
        clip_score(images, prompts, weights=None)
    clip, folder = local_clip(tmp_path / "clip")
    result = clip_score(images, prompts, weights=f"local-dir:{folder}")
    from genkit.eval.features import build_clip

    extractor = build_clip(None, f"local-dir:{folder}")
    with torch.no_grad():
        img = F.normalize(extractor(to_uint8(images).expand(-1, 3, -1, -1)), dim=-1)
        txt = F.normalize(clip.encode_text(open_clip_tokens(prompts)), dim=-1)
    expected = float((100 * (img * txt).sum(-1).clamp_min(0)).mean())
    assert result["clip_score"] == pytest.approx(expected, rel=1e-5) and result["n"] == 4
    assert 0 <= result["clip_score"] <= 100


def open_clip_tokens(prompts):
    import open_clip

    return open_clip.tokenize(prompts, context_length=12)


def test_local_diffusers_autoencoder_and_local_open_clip_text_tower(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8,), norm_num_groups=8, latent_channels=2)
    vae.save_pretrained(tmp_path / "vae")
    stage = load_first_stage(f"local-dir:{tmp_path / 'vae'}")
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(stage.encode(x), vae.encode(x).latent_dist.mean)
        z = torch.randn(2, 2, 8, 8)
        torch.testing.assert_close(stage.decode(z), vae.decode(z).sample)
    clip, folder = local_clip(tmp_path / "clip")
    encoder = TextEncoder(TextConfig(encoder=f"local-dir:{folder}"))
    tokens = encoder(["a handwritten digit seven", ""])
    assert tokens.shape == (2, 12, 32) and not any(p.requires_grad for p in encoder.parameters())
    with torch.no_grad():  # the pooled end-of-text token through CLIP's own projection is encode_text
        pooled = tokens[0, encoder.tokenize(["a handwritten digit seven"]).argmax(-1)] @ clip.text_projection
        torch.testing.assert_close(pooled, clip.encode_text(encoder.tokenize(["a handwritten digit seven"])),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_short_run_on_captioned_digits_follows_prompts_and_guidance_helps(tmp_path):
    """A small LDM (first stage 150 steps, UNet [16, 32], 800 steps: about 2 minutes) measured 0.09 / 0.28 /
    0.42 at w = 0 / 1 / 3. Chance is 0.1; with n=300 its binomial sd is 0.017, so 0.2 is > 5 sd above chance,
    and a 0.05 rise with guidance is > 1.2 sd of the difference of two such estimates."""
    overrides = ["train.checkpoint_every=5000", "sample.n=20", "train.steps=800", "train.warmup=50",
                 "model.first_stage_overrides=[train.steps=150]", "model.unet.channels=[16,32]",
                 "model.unet.head_dim=16", "model.text.width=32", "model.text.layers=1", "optim.model.lr=2e-3"]
    run = genkit.train(load_recipe("ldm_digits_text", overrides), out=tmp_path / "run")
    family = genkit.load(run, device="cpu")
    acc = {w: prompt_accuracy(family, 300, guidance=w, steps=20)["accuracy"] for w in (0.0, 1.0, 3.0)}
    assert acc[0.0] < 0.2, acc     # unconditional: about chance
    assert acc[1.0] > 0.2, acc
    assert acc[3.0] > acc[1.0] + 0.05, acc


@pytest.mark.parametrize("lora", [False, True])
def test_export_writes_diffusers_component_folders_that_reproduce_the_model(ldm_run, tmp_path, lora):
    """unet/, vae/, scheduler/ load in diffusers and compute what the genkit model computes."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from genkit.interop import export_diffusers
    from genkit.io import load_tensors
    from genkit.nn.text import TextConfig, TextEncoder

    run = ldm_run
    if lora:  # adapters trained on top of the run: the export fuses them into the UNet
        run = genkit.train(load_recipe("ldm_digits_text", [*TINY_LDM, f"model.init_from={ldm_run}",
                                                           "model.lora.rank=4", "train.steps=2",
                                                           "optim.model.lr=1e-2"]), out=tmp_path / "lora")
    family = genkit.load(run, device="cpu")
    out = export_diffusers(run, tmp_path / "export")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, *family.latent_shape, generator=g)
    t = torch.tensor([10, 500])
    text = family.embed(["a handwritten digit three", ""])
    unet = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    with torch.no_grad():
        torch.testing.assert_close(unet(z, t, encoder_hidden_states=text).sample, family.unet(z, t, text),
                                   rtol=1e-4, atol=1e-5)
        vae = AutoencoderKL.from_pretrained(out / "vae").eval()
        torch.testing.assert_close(vae.decode(z / family.cfg.scale_factor).sample.clamp(-1, 1),
                                   family.decode_latents(z).clamp(-1, 1), rtol=1e-4, atol=1e-5)
    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    torch.testing.assert_close(sched.alphas_cumprod.double(), family.schedule.alpha_bar.double(), rtol=1e-6, atol=1e-7)
    info = json.loads((out / "genkit_ldm.json").read_text())
    assert info["scale_factor"] == family.cfg.scale_factor
    encoder = TextEncoder(TextConfig(**json.loads((out / "text_encoder" / "config.json").read_text())))
    encoder.load_state_dict(load_tensors(out / "text_encoder" / "model.safetensors"))
    torch.testing.assert_close(encoder.eval()(["a handwritten digit three"]), text[:1], rtol=1e-5, atol=1e-6)


class PixelL2(nn.Module):
    """A stand-in perceptual distance (LPIPS needs VGG weights): per-image mean squared difference."""

    def forward(self, a, b):
        return (a - b).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("perceptual", [False, True])
def test_autoencoder_kl_loss_is_l1_plus_weighted_kl_per_pixel_and_perceptual(perceptual):
    """L = |x - D(mu + sigma eps)|_1 + kl_weight KL(q || N(0, I)) / pixels (+ perceptual_weight P), with the KL
    of a diagonal Gaussian written out, and train_step's eps of the prior's shape from the global-batch stream."""
    torch.manual_seed(0)
    family = AutoencoderKL(AutoencoderKLConfig(channels=[8, 8], norm_groups=8, latent_channels=2, kl_weight=0.3,
                                               perceptual_weight=0.7), shape=(1, 8, 8))
    if perceptual:
        family.lpips = PixelL2()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    opt = RecordingHandle(seed=2)
    logs = family.train_step({"image": x}, 0, opt)
    [eps] = opt.draws
    assert eps.shape == (3, *family.prior_shape) == (3, 2, 4, 4)
    with torch.no_grad():
        q = family.nets["vae"].encode(x).latent_dist
        x_rec = family.nets["vae"].decode(q.mean + q.std * eps).sample
        kl = 0.5 * (q.mean**2 + q.var - 1 - q.logvar).sum((1, 2, 3)).mean() / 64
        rec = (x - x_rec).abs().mean()
        want = {"rec_l1": rec, "kl": kl, "loss": rec + 0.3 * kl}
        if perceptual:
            p = (x - x_rec).pow(2).mean()
            want.update(lpips=p, loss=rec + 0.3 * kl + 0.7 * p)
    assert set(logs) == set(want) and float(kl) > 0.01
    assert set(family.loss(x[:1], eps[:1])) == set(want)   # a batch of one (the KL's pixel count is per image)
    for key in want:
        torch.testing.assert_close(logs[key], want[key], rtol=1e-5, atol=1e-7)


def test_autoencoder_kl_latent_shape_and_perceptual_setting(tmp_path, monkeypatch):
    """z is (latent_channels, H / f, W / f); model.perceptual=lpips needs >= 16 px on both sides and finds its
    VGG weights offline, naming model.perceptual_weights when they are missing."""
    from genkit.errors import ConfigError, GenkitError

    cfg = AutoencoderKLConfig(channels=[8, 8, 8], norm_groups=8, latent_channels=3)
    assert AutoencoderKL(cfg, shape=(1, 8, 16)).prior_shape == (3, 2, 4)
    lpips = AutoencoderKLConfig(channels=[8, 8], norm_groups=8, perceptual="lpips")
    for shape in ((1, 12, 16), (1, 16, 12)):
        with pytest.raises(ConfigError, match="^model.perceptual=lpips needs images of at least 16 px, got 12$"):
            AutoencoderKL(lpips, shape=shape)
    for var in ("GENKIT_WEIGHTS_DIR", "XDG_CACHE_HOME", "TORCH_HOME"):
        monkeypatch.setenv(var, str(tmp_path))
    with pytest.raises(GenkitError, match=r"vgg16-397923af\.pth.* or pass model\.perceptual_weights=PATH$"):
        AutoencoderKL(lpips, shape=(1, 16, 16))
    bad = tmp_path / "elsewhere" / "vgg16-397923af.pth"  # off the search path: found only by the key
    bad.parent.mkdir()
    torch.save({}, bad)
    with pytest.raises(GenkitError, match="wrong or corrupted"):
        AutoencoderKL(dataclasses.replace(lpips, perceptual_weights=str(bad)), shape=(1, 16, 16))
    for kw in ({"kl_weight": -1.0}, {"perceptual_weight": -1.0}):
        with pytest.raises(ConfigError, match="^model.kl_weight and model.perceptual_weight must be >= 0$"):
            AutoencoderKL(dataclasses.replace(cfg, **kw), shape=(1, 8, 8))
    zero = AutoencoderKL(dataclasses.replace(cfg, kl_weight=0.0, perceptual_weight=0.0), shape=(1, 8, 8))
    assert zero.sample_shape == (1, 8, 8) and zero.lpips is None
    deep = AutoencoderKLConfig(channels=[8, 8, 8, 8], norm_groups=8, latent_channels=3)
    assert AutoencoderKL(deep, shape=(1, 32, 32)).prior_shape == (3, 4, 4)  # f = 2^3
