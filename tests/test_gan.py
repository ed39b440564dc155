"""GAN family: every loss's value and sign, the gradient penalty, weight clipping, the update order,
direct sampling, resume, DDP, FD."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import genkit
from genkit.errors import ConfigError, SamplerError
from genkit.families.gan import GAN, GANConfig, critic_loss, generator_loss, truncated_latents
from genkit.families.sampling import sample
from genkit.io import load_tensors
from genkit.nn.gan_nets import CriticConfig, GeneratorConfig
from genkit.nn.lipschitz import gradient_penalty, interpolate
from genkit.runs import latest_checkpoint, load_recipe

SHAPE = (1, 16, 16)
TINY = ["model.generator.channels=[16,8]", "model.critic.channels=[8,16]", "model.latent_dim=8",
        "data.batch_size=16", "train.sample_every=0", "sample.n=4", "train.log_every=1"]


def tiny_gan(seed: int = 0, **cfg) -> GAN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GAN(GANConfig(latent_dim=8, generator=GeneratorConfig(channels=[16, 8]),
                             critic=CriticConfig(channels=[8, 16]), **cfg), shape=SHAPE)


class Handle:
    """A stand-in for the trainer's handle: records each group's gradients and steps SGD if asked."""

    def __init__(self, family: GAN, lr: float = 0.0, stepping: bool = True, seed: int = 0):
        self.device, self.stepping, self.lr = torch.device("cpu"), stepping, lr
        self.params = family.param_groups()
        self.g = torch.Generator().manual_seed(seed)
        self.grads: dict[str, list[torch.Tensor]] = {}
        self.calls: list[str] = []

    def step(self, group: str, loss: torch.Tensor) -> bool:
        grads = torch.autograd.grad(loss, self.params[group])
        self.grads[group], self.calls = list(grads), [*self.calls, group]
        if self.stepping and self.lr:
            with torch.no_grad():
                for p, g in zip(self.params[group], grads):
                    p -= self.lr * g
        return self.stepping

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.g)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.g)


def batch(n: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"image": torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 2 - 1}


# ---------------------------------------------------------------- the losses: values and signs

LOSSES = ["non-saturating", "hinge", "wgan", "wgan-gp"]
F_REAL, F_FAKE = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.5])  # E f_real = 0.5, E f_fake = -0.5


def sp(x: float) -> float:
    """softplus(x) = log(1 + e^x) = -log sigmoid(-x)."""
    return math.log1p(math.exp(x))


CRITIC_LOSS = {  # L_D(F_REAL, F_FAKE) by hand
    "non-saturating": (sp(-2.0) + sp(-0.5) + sp(1.0)) / 3 + (sp(-3.0) + sp(0.0) + sp(1.5)) / 3,
    "hinge": (0.0 + 0.5 + 2.0) / 3 + (0.0 + 1.0 + 2.5) / 3,  # relu(1 - f_real), relu(1 + f_fake)
    "wgan": -0.5 - 0.5,                                       # E f_fake - E f_real = -W_hat
    "wgan-gp": -0.5 - 0.5,                                    # (the penalty is added in critic_step)
}
GENERATOR_LOSS = {  # L_G(F_FAKE) by hand
    "non-saturating": (sp(3.0) + sp(0.0) + sp(-1.5)) / 3,    # -log sigmoid f_fake
    "hinge": 0.5, "wgan": 0.5, "wgan-gp": 0.5,               # -E f_fake
}


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_has_its_closed_form_value(loss):
    assert critic_loss(loss, F_REAL, F_FAKE).item() == pytest.approx(CRITIC_LOSS[loss], rel=1e-6)
    assert generator_loss(loss, F_FAKE).item() == pytest.approx(GENERATOR_LOSS[loss], rel=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_has_its_closed_form_gradient_in_the_scores(loss):
    """Descending L_D raises real scores and lowers fake ones (where a hinge is active); descending
    L_G raises fake scores, and the non-saturating L_G keeps pushing where f rejects the fakes."""
    n, one = 3, torch.ones(3)
    want = {  # (dL_D/df_real, dL_D/df_fake, dL_G/df_fake)
        "non-saturating": (-torch.sigmoid(-F_REAL), torch.sigmoid(F_FAKE), -torch.sigmoid(-F_FAKE)),
        "hinge": (-(F_REAL < 1).float(), (F_FAKE > -1).float(), -one),
        "wgan": (-one, one, -one),
        "wgan-gp": (-one, one, -one),
    }[loss]
    f_real, f_fake = F_REAL.clone().requires_grad_(True), F_FAKE.clone().requires_grad_(True)
    got = torch.autograd.grad(critic_loss(loss, f_real, f_fake), (f_real, f_fake))
    got += torch.autograd.grad(generator_loss(loss, f_fake), f_fake)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w / n)
    f = torch.full((4,), -10.0, requires_grad=True)  # fakes confidently rejected
    (g,) = torch.autograd.grad(generator_loss(loss, f), f)
    assert (g < -0.99 / 4).all()  # not the saturating log(1 - sigmoid f), whose gradient is ~ -5e-5 / 4


def test_wgan_gp_critic_loss_adds_lambda_times_the_penalty_on_the_interpolates():
    """L_D = E f(G(z)) - E f(x) + lambda E (||grad f(x_hat)|| - 1)^2, recomputed from the handle's draws."""
    family = tiny_gan(loss="wgan-gp", gp_weight=10.0)
    x = batch()["image"]
    g = torch.Generator().manual_seed(0)  # Handle(seed=0)'s draws, in critic_step's order
    z, eps = torch.randn(8, 8, generator=g), torch.rand(8, generator=g)
    logs = family.critic_step(x, Handle(family))
    f = family.nets["D"]
    with torch.no_grad():
        fake = family.nets["G"](z)
    x_hat = (eps.view(-1, 1, 1, 1) * x + (1 - eps.view(-1, 1, 1, 1)) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x_hat).sum(), x_hat)
    penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    wasserstein = f(x).mean() - f(fake).mean()
    assert penalty > 0.01 and logs["wasserstein"].item() == pytest.approx(wasserstein.item(), rel=1e-5)
    assert logs["loss_D"].item() == pytest.approx((-wasserstein + 10 * penalty).item(), rel=1e-5)


def critic_objective(loss: str, f: nn.Module, x: torch.Tensor, fake: torch.Tensor) -> float:
    """What a critic step must raise: W_hat = E f(x) - E f(G(z)); for the non-saturating GAN the
    classifier's log-likelihood E log sigmoid f(x) + E log sigmoid(-f(G(z)))."""
    with torch.no_grad():
        f_real, f_fake = f(x), f(fake)
        if loss == "non-saturating":
            return float(F.logsigmoid(f_real).mean() + F.logsigmoid(-f_fake).mean())
        return float(f_real.mean() - f_fake.mean())


@pytest.mark.parametrize("loss", LOSSES)
def test_a_critic_step_raises_its_objective_and_a_generator_step_its_own(loss):
    """One small SGD step of each player on fixed images and latents, measured independently of the
    loss code: the critic raises W_hat (the hinge inside its margin is -W_hat + 2), the generator
    raises E f(G(z)), or E log sigmoid f(G(z)) for the non-saturating GAN."""
    family = tiny_gan(loss=loss, **({"gp_weight": 0.0} if loss == "wgan-gp" else {}))
    f, G = family.nets["D"], family.nets["G"]
    x = batch()["image"]
    with torch.no_grad():
        fake = G(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))  # the handle's first draw
        if loss == "hinge":
            assert f(x).abs().max() < 1 and f(fake).abs().max() < 1
    before = critic_objective(loss, f, x, fake)
    family.critic_step(x, Handle(family, lr=1e-2))
    assert critic_objective(loss, f, x, fake) > before

    z = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))  # the handle's draw below

    def generator_objective() -> float:
        with torch.no_grad():
            f_fake = f(G(z))
            return float(F.logsigmoid(f_fake).mean() if loss == "non-saturating" else f_fake.mean())

    before = generator_objective()
    family.generator_step(8, Handle(family, lr=1e-2, seed=1))
    assert generator_objective() > before


# ---------------------------------------------------------------- gradient penalty and clipping


def test_gradient_penalty_of_a_linear_critic_matches_its_closed_form():
    """f(x) = w.x: grad f = w everywhere, so GP = (|w| - 1)^2 and dGP/dw = 2 (|w| - 1) w / |w|;
    the second derivative exists only because the penalty keeps its graph (create_graph)."""
    torch.manual_seed(0)
    f = nn.Linear(5, 1, bias=False).double()
    x, y, eps = torch.randn(7, 5).double(), torch.randn(7, 5).double(), torch.rand(7).double()
    x_hat = interpolate(x, y, eps)
    torch.testing.assert_close(x_hat, eps[:, None] * x + (1 - eps[:, None]) * y)  # on the segments
    penalty, norms = gradient_penalty(f, x_hat)
    w = f.weight.detach()[0]
    torch.testing.assert_close(norms, w.norm().expand(7).float())
    torch.testing.assert_close(penalty, ((w.norm() - 1) ** 2).float())
    (grad_w,) = torch.autograd.grad(penalty, f.weight)
    torch.testing.assert_close(grad_w[0].double(), 2 * (w.norm() - 1) * w / w.norm(), rtol=1e-5, atol=1e-7)


def test_penalty_changes_the_critic_gradients_and_never_touches_the_generator():
    grads = {}
    for weight in (0.0, 10.0):
        family = tiny_gan(loss="wgan-gp", gp_weight=weight, n_critic=5)
        handle = Handle(family)
        logs = family.train_step(batch(), 0, handle)
        assert handle.calls == ["D"]  # step 0 of a 5-cycle: critic only
        grads[weight] = handle.grads["D"]
        assert 0 < float(logs["grad_norm"]) and torch.isfinite(logs["loss_D"])
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0.0], grads[10.0]))


def test_weight_clipping_keeps_every_critic_weight_in_range_after_each_step():
    c = 0.01
    family = tiny_gan(loss="wgan", clip_value=c, n_critic=2)
    assert all(p.abs().max() <= c for p in family.nets["D"].parameters())  # clipped from the start
    handle = Handle(family, lr=0.5)
    fractions = []
    for step in range(6):
        logs = family.train_step(batch(seed=step), step, handle)
        fractions.append(float(logs["clipped_fraction"]))
        assert all(float(p.detach().abs().max()) <= c for p in family.nets["D"].parameters())
    assert max(fractions) > 0.1  # a large lr pushes many weights out: clipping really acted
    # no clipping when the optimizer did not step (an accumulation micro-batch)
    logs = family.train_step(batch(), 0, Handle(family, stepping=False))
    assert "clipped_fraction" not in logs


def test_generator_steps_after_every_n_critic_critic_steps():
    family = tiny_gan(loss="hinge", n_critic=3)
    handle = Handle(family)
    order = []
    for step in range(9):
        handle.calls = []
        family.train_step(batch(), step, handle)
        order.append("".join(handle.calls))
    assert order == ["D", "D", "DG"] * 3
    assert tiny_gan(loss="wgan").n_critic == 5 and tiny_gan(loss="non-saturating").n_critic == 1


@pytest.mark.parametrize("loss", ["non-saturating", "hinge"])
def test_a_generator_step_draws_b_times_the_multiple_latents_and_scores_them_with_its_loss(loss):
    """The generator step's batch is the image batch times generator_batch_multiple, its latents (n, latent_dim),
    and its loss L_G of the critic's scores of G(z) for the configured loss."""
    family = tiny_gan(loss=loss, n_critic=1, generator_batch_multiple=2)
    handle, draws, losses = Handle(family), [], []
    randn = handle.randn
    handle.randn = lambda *shape: draws.append(shape) or randn(*shape)
    step = handle.step
    handle.step = lambda group, value: losses.append((group, float(value))) or step(group, value)
    family.train_step(batch(n=6), 0, handle)
    assert draws == [(6, 8), (12, 8)]  # the critic's fakes, then the generator's
    g = torch.Generator().manual_seed(0)
    torch.randn((6, 8), generator=g), torch.rand((6,), generator=g)  # the critic step's draws
    with torch.no_grad():
        z = torch.randn((12, 8), generator=g)
        scores = family.nets["D"](family.nets["G"](z)).float()
    assert losses[-1][0] == "G" and losses[-1][1] == pytest.approx(float(generator_loss(loss, scores)), rel=1e-5)


@pytest.mark.parametrize("loss", LOSSES)
def test_a_critic_step_scores_its_batch_with_its_loss_and_logs_the_generators(loss):
    family = tiny_gan(loss=loss, n_critic=5)
    handle, losses = Handle(family), []
    step = handle.step
    handle.step = lambda group, value: losses.append((group, float(value))) or step(group, value)
    x = batch(n=6)["image"]
    logs = family.train_step({"image": x}, 0, handle)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        fake = family.nets["G"](torch.randn((6, 8), generator=g))
        f_real, f_fake = family.nets["D"](x).float(), family.nets["D"](fake).float()
    want = float(critic_loss(loss, f_real, f_fake))
    if loss == "wgan-gp":  # plus lambda = 10 times the penalty on the interpolates of the step's draw
        penalty = float(gradient_penalty(family.nets["D"], interpolate(x, fake, torch.rand(6, generator=g)))[0])
        want, penalty = want + 10 * penalty, penalty
        assert penalty > 1e-3
    assert losses == [("D", pytest.approx(want, rel=1e-5))]
    assert float(logs["loss_G"]) == pytest.approx(float(generator_loss(loss, f_fake)), rel=1e-5)


def test_invalid_configs_are_refused_with_the_key_named():
    with pytest.raises(ConfigError, match="model.critic.norm"):
        GAN(GANConfig(loss="wgan-gp", critic=CriticConfig(norm="batch")), shape=SHAPE)
    with pytest.raises(ConfigError, match="model.generator.channels.*use 2 levels"):
        GAN(GANConfig(generator=GeneratorConfig(channels=[16, 8, 4])), shape=SHAPE)
    with pytest.raises(ConfigError, match="model.n_critic"):
        tiny_gan(n_critic=0)


@pytest.mark.parametrize("key,bad,edge", [("latent_dim", 0, 1), ("clip_value", 0.0, 1e-3), ("gp_weight", -1.0, 0.0),
                                          ("generator_batch_multiple", 0, 1), ("n_critic", 0, 1)])
def test_each_range_check_names_its_key_and_accepts_its_edge(key, bad, edge):
    with pytest.raises(ConfigError, match=rf"^model\.{key}: out of range, got {bad}$"):
        GAN._validate(GANConfig(**{key: bad}))
    GAN._validate(GANConfig(**{key: edge}))
    with pytest.raises(ConfigError, match=r"^model.critic.norm: batch norm couples the samples whose input "
                                          r"gradients the gradient penalty constrains \(WGAN-GP sec. 4\); use none "
                                          r"or layer$"):
        GAN._validate(GANConfig(loss="wgan-gp", critic=CriticConfig(norm="batch")))
    family = tiny_gan()
    assert family.sample_shape == SHAPE and family.num_classes == 0


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
@pytest.mark.parametrize("size", [16, 32])
def test_both_architectures_fit_16_and_32_pixels(arch, size):
    levels = size.bit_length() - 3
    g = GeneratorConfig(arch=arch, channels=[8] * (levels + (arch == "resnet")))
    d = CriticConfig(arch=arch, channels=[8, 8, 8], down=[True, True, False])
    family = GAN(GANConfig(latent_dim=4, generator=g, critic=d), shape=(3, size, size))
    x = family.direct(2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, size, size) and x.abs().max() <= 1
    assert family.nets["D"](x).shape == (2,)


# ---------------------------------------------------------------- direct sampling


def test_truncation_redraws_large_latents_and_direct_is_batch_size_invariant():
    z = truncated_latents((500, 8), torch.Generator().manual_seed(0), 0.5)
    assert z.abs().max() <= 0.5 and z.abs().max() > 0.45  # redrawn inside, not clamped to the edge
    assert (z.abs() == 0.5).sum() == 0
    family = tiny_gan()
    a = sample(family, 6, generator=torch.Generator().manual_seed(3), truncation=0.7)
    b = sample(family, 6, generator=torch.Generator().manual_seed(3), batch_size=4, truncation=0.7)
    torch.testing.assert_close(a.images, b.images)
    assert a.sampler == "direct" and a.nfe == 1
    c = sample(family, 6, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(a.images, c.images)
    with pytest.raises(SamplerError, match="truncation must be > 0"):
        sample(family, 2, truncation=0.0)
    with pytest.raises(SamplerError, match="no option 'eta'"):
        sample(family, 2, eta=0.5)


# ---------------------------------------------------------------- through the trainer


def gan_recipe(steps: int, *extra: str):
    return load_recipe("wgan_gp_digits", [*TINY, f"train.steps={steps}", "model.n_critic=2",
                                          "train.ema_decay=0.9", "train.checkpoint_every=100", *extra])


def test_resume_equals_uninterrupted_with_both_optimizers_and_the_critic_cycle(tmp_path):
    """Stopping at an odd step splits a critic cycle: the resumed run must continue it exactly."""
    straight = genkit.train(gan_recipe(5), out=tmp_path / "straight")
    genkit.train(gan_recipe(3), out=tmp_path / "stopped")
    resumed = genkit.train(gan_recipe(5), out=tmp_path / "stopped", resume=True)
    for name in ("nets", "ema"):
        a = load_tensors(latest_checkpoint(straight / "checkpoints") / f"{name}.safetensors")
        b = load_tensors(latest_checkpoint(resumed / "checkpoints") / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ema = load_tensors(latest_checkpoint(straight / "checkpoints") / "ema.safetensors")
    assert ema and all(k.startswith("G.") for k in ema)  # the EMA averages the generator only
    for group in ("G", "D"):
        a = torch.load(latest_checkpoint(straight / "checkpoints") / f"optim-{group}.pt")
        b = torch.load(latest_checkpoint(resumed / "checkpoints") / f"optim-{group}.pt")
        assert all(torch.equal(a["state"][i]["exp_avg_sq"], b["state"][i]["exp_avg_sq"]) for i in a["state"])
    metrics = (straight / "metrics.jsonl").read_text()
    assert '"wasserstein"' in metrics and '"grad_norm"' in metrics


@pytest.mark.slow  # ~50 s: process start-up of torchrun
def test_two_processes_at_batch_b_equal_one_process_at_2b(tmp_path):
    """torchrun DDP on CPU: the generator loss through the unwrapped critic leaves DDP consistent."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    common = [*TINY[:-2], "train.steps=5", "model.n_critic=2", "model.generator.norm=none"]
    base = [sys.executable, "-m", "genkit.cli", "train", "wgan_gp_digits"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *base[1:],
           "--out", str(tmp_path / "two"), *common, "data.batch_size=8"]
    one = [*base, "--out", str(tmp_path / "one"), *common, "data.batch_size=16"]
    for cmd in (two, one):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    a = load_tensors(tmp_path / "two" / "model" / "weights.safetensors")
    b = load_tensors(tmp_path / "one" / "model" / "weights.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_few_hundred_steps_on_digits_lower_the_fd(tmp_path):
    from genkit.eval.engine import EvalSettings, compute_fid

    s = EvalSettings(features="digits", n=500, batch_size=250, device="cpu")
    fd = {}
    for steps in (1, 300):
        run = genkit.train(load_recipe("dcgan_digits", [f"train.steps={steps}", "train.sample_every=0"]),
                           out=tmp_path / f"s{steps}")
        fd[steps] = compute_fid("recipe:dcgan_digits", str(run), s)["value"]
    assert fd[300] < 0.5 * fd[1], fd
