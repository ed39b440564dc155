"""Normalizing flows (NICE, Glow): every layer and whole flow inverted exactly, log|det J| against
the autograd Jacobian, ActNorm's data init, bits/dim in the one convention (analytic case), the
temperature of `direct` sampling, the CLI, training, exact resume and the NaN stop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from step_handles import RecordingHandle
from torch.autograd.functional import jacobian

import genkit
from genkit.cli import main
from genkit.errors import GenkitError
from genkit.eval.engine import EvalSettings, compute_bpd
from genkit.eval.likelihood import family_bits_per_dim
from genkit.eval.specs import iter_images
from genkit.families import flow_family
from genkit.families.glow import Glow, GlowConfig
from genkit.families.nice import NICE, NICEConfig
from genkit.io import load_tensors
from genkit.nn import flow_layers as fl
from genkit.runs import list_checkpoints, load_recipe


def perturb(module: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its identity / zero initialisation, so tests see a generic map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def autograd_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det d fn / dx| per sample, from the dense autograd Jacobian (fn: (1, ...) -> (1, ...))."""
    out = []
    for xi in x:
        J = jacobian(lambda v: fn(v.view(1, *x.shape[1:])).flatten(), xi.flatten())
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out)


def split_layer():
    layer = fl.SplitPrior(4)

    def fwd(z):
        z1, eps, ld = layer(z)
        return torch.cat([z1, eps], 1), ld
    return layer, fwd, lambda y: layer.inverse(y[:, :2], y[:, 2:])


def plain(layer):
    return layer, layer, layer.inverse


SQUEEZE = (torch.nn.Identity(), lambda x: (fl.squeeze2d(x), x.new_zeros(len(x))), fl.unsqueeze2d)

LAYERS = {  # name: (build () -> (module, forward, inverse), input shape; H != W where it applies)
    "additive_coupling_even": (lambda: plain(fl.AdditiveCoupling(7, 8, 2, parity=0)), (3, 7)),
    "additive_coupling_odd": (lambda: plain(fl.AdditiveCoupling(7, 8, 2, parity=1)), (3, 7)),
    "diagonal_scaling": (lambda: plain(fl.DiagonalScaling(7)), (3, 7)),
    "actnorm": (lambda: plain(fl.ActNorm(3)), (2, 3, 4, 5)),
    "invconv_lu": (lambda: plain(fl.InvConv1x1(4, lu=True)), (2, 4, 3, 5)),
    "invconv_plain": (lambda: plain(fl.InvConv1x1(4, lu=False)), (2, 4, 3, 5)),
    "affine_coupling": (lambda: plain(fl.AffineCoupling(4, 8, affine=True)), (2, 4, 4, 4)),
    "additive_glow_coupling": (lambda: plain(fl.AffineCoupling(4, 8, affine=False)), (2, 4, 4, 4)),
    "flow_step": (lambda: plain(fl.FlowStep(4, 8)), (2, 4, 4, 6)),
    "split_prior": (split_layer, (2, 4, 4, 6)),
    "squeeze": (lambda: SQUEEZE, (2, 2, 4, 6)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_inverts_and_logdet_matches_autograd(name):
    torch.manual_seed(0)
    build, shape = LAYERS[name]
    module, fwd, inv = build()
    perturb(module)
    x = torch.randn(shape)
    y, logdet = fwd(x)
    assert logdet.shape == (shape[0],)
    torch.testing.assert_close(inv(y), x, rtol=0, atol=1e-5)  # float32
    module.double()
    xd = x.double()
    want = autograd_logdet(lambda v: fwd(v)[0], xd)
    torch.testing.assert_close(fwd(xd)[1].double(), want, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("mean,logs", [(0.0, 0.0), (0.5, 0.0), (0.0, -0.7), ("tensor", "tensor"), (0.0, "tensor"),
                                       ("tensor", 0.0)])
def test_gaussian_log_prob_is_the_normal_density(mean, logs):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    mean = torch.randn(3, 2, 4, generator=g, dtype=torch.float64) if mean == "tensor" else mean
    logs = 0.3 * torch.randn(3, 2, 4, generator=g, dtype=torch.float64) if logs == "tensor" else logs
    std = torch.exp(torch.as_tensor(logs, dtype=torch.float64))
    want = torch.distributions.Normal(torch.as_tensor(mean, dtype=torch.float64), std).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(fl.gaussian_log_prob(z, mean, logs), want, rtol=1e-12, atol=1e-12)


def test_split_prior_reads_mean_and_log_scale_interleaved_as_official_glow():
    """Glow's split2d takes (mean, logs) = h[:, 0::2], h[:, 1::2] of its Conv2dZeros ("cross"): checkpoints of
    the official layout load only with this convention."""
    layer = fl.SplitPrior(4)
    h = torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 2, 3)  # channel c holds the value c
    layer.conv.forward = lambda z1: h
    mean, logs = layer.prior(torch.zeros(1, 2, 2, 3))
    assert mean[0, :, 0, 0].tolist() == [0.0, 2.0] and logs[0, :, 0, 0].tolist() == [1.0, 3.0]
    z2 = layer.inverse(torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, 3), temperature=0.5)[:, 2:]
    torch.testing.assert_close(z2[0, :, 0, 0], torch.tensor([0 + 0.5 * math.e, 2 + 0.5 * math.e**3]))


def tiny_glow(**kw) -> Glow:
    cfg = GlowConfig(**{"levels": 2, "steps": 2, "hidden": 8, **kw})
    return Glow(cfg, (1, 8, 8))


def glow_maps(glow: Glow):
    """x -> all standardised latents (flat) and back, for the whole multi-scale flow."""
    net = glow.flow()
    shapes = net.latent_shapes

    def fwd(x):
        eps, logdet = net.encode(x)
        return torch.cat([e.flatten(1) for e in eps], 1), logdet

    def inv(y):
        sizes = [math.prod(s) for s in shapes]
        return net.decode([p.view(-1, *s) for p, s in zip(y.split(sizes, 1), shapes)])
    return fwd, inv


@pytest.mark.parametrize("kw", [{}, {"coupling": "additive", "lu": False, "learn_top": True}])
def test_whole_glow_inverts_and_logdet_matches_autograd(kw):
    torch.manual_seed(0)
    glow = tiny_glow(**kw)
    perturb(glow.nets, 0.05)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    fwd, inv = glow_maps(glow)
    y, logdet = fwd(x)
    torch.testing.assert_close(inv(y), x, rtol=0, atol=1e-5)
    # log p(x) = log N(eps; 0, I) + log|det d eps / dx|: the priors of every split are in the Jacobian
    torch.testing.assert_close(glow.log_prob(x), fl.gaussian_log_prob(y) + logdet)
    glow.nets.double()
    xd = x.double()
    torch.testing.assert_close(fwd(xd)[1].double(), autograd_logdet(lambda v: fwd(v)[0], xd),
                               rtol=1e-7, atol=1e-6)


@pytest.mark.parametrize("prior", ["logistic", "gaussian"])
def test_whole_nice_inverts_and_logdet_matches_autograd(prior):
    torch.manual_seed(0)
    nice = NICE(NICEConfig(hidden=16, hidden_layers=2, prior=prior), (1, 4, 4))
    perturb(nice.nets)
    net = nice.flow()
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    h, logdet = net.encode(x)
    torch.testing.assert_close(net.decode(h), x, rtol=0, atol=1e-5)
    net.double()
    xd = x.double()
    torch.testing.assert_close(net.encode(xd)[1].double(), autograd_logdet(lambda v: net.encode(v)[0], xd),
                               rtol=1e-7, atol=1e-7)


def test_actnorm_data_init_gives_zero_mean_unit_variance_per_channel():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 5, 5) * torch.tensor([0.1, 2.0, 7.0]).view(1, 3, 1, 1) + torch.tensor([3.0, -1.0, 0.5]).view(1, 3, 1, 1)
    norm = fl.ActNorm(3)
    fl.begin_data_init(norm)
    y, _ = norm(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.var((0, 2, 3), unbiased=False), torch.ones(3), rtol=0, atol=1e-4)
    assert not norm.pending_init and not torch.allclose(norm(x)[0], x)


def test_glow_initialize_normalises_every_actnorm_on_its_own_input():
    """Each ActNorm (flow steps and coupling networks) is initialised on what reaches it in the pass."""
    torch.manual_seed(0)
    glow = tiny_glow()
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o[0].detach()))
             for m in glow.nets.modules() if isinstance(m, fl.ActNorm)]
    images = torch.rand(32, 1, 8, 8) * 2 - 1
    glow.initialize({"image": images})
    for h in hooks:
        h.remove()
    assert len(outs) == 2 * 2 * 3  # levels x steps x (flow ActNorm + 2 in the coupling network)
    for y in outs:
        torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(y.shape[1]), rtol=0, atol=1e-4)
        torch.testing.assert_close(y.var((0, 2, 3), unbiased=False), torch.ones(y.shape[1]), rtol=0, atol=1e-3)


def uniform_images(n: int, shape, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("prior", ["gaussian", "logistic"])
def test_untrained_nice_on_uniform_data_scores_the_analytic_bits_per_dim(prior):
    """An untrained NICE is the identity (zero-init coupling outputs, s = 0): on uniform 8-bit
    data dequantized to x ~ U[-1, 1], bits/dim = E[-log p_prior(x)] / ln 2 - 1 + 8 per dimension."""
    nice = NICE(NICEConfig(hidden=16, hidden_layers=1, prior=prior), (1, 8, 8))
    out = family_bits_per_dim(nice, uniform_images(2048, (1, 8, 8)), batch_size=512,
                              generator=torch.Generator().manual_seed(1))
    if prior == "gaussian":
        nll = 0.5 * math.log(2 * math.pi) + 1 / 6  # E[x^2] = 1/3 on U[-1, 1]
    else:  # E[softplus(x) + softplus(-x)] over U[-1, 1], by the trapezoid rule
        t = torch.linspace(-1, 1, 200001, dtype=torch.float64)
        nll = float(torch.trapezoid(torch.nn.functional.softplus(t) * 2, t)) / 2
    assert out["bits_per_dim"] == pytest.approx(nll / math.log(2) - 1 + 8, abs=3e-3)
    assert out["method"].startswith("exact") and out["n_bits"] == 8 and out["dims"] == 64


def test_flow_bits_per_dim_reduces_to_the_flows_n_bits():
    """A 5-bit Glow scores 8-bit images reduced to 32 levels, in bits per 5-bit dimension."""
    torch.manual_seed(0)
    glow = tiny_glow(n_bits=5)
    perturb(glow.nets, 0.05)
    images = uniform_images(8, (1, 8, 8))
    got = family_bits_per_dim(glow, images, generator=torch.Generator().manual_seed(3))
    u = torch.rand(images.shape, generator=torch.Generator().manual_seed(3))
    x = 2 * ((images // 8).double() + u) / 32 - 1
    nll = -glow.log_prob(x.float()).detach().double()
    want = nll / (64 * math.log(2)) - 1 + 5
    assert got["bits_per_dim"] == pytest.approx(float(want.mean()), abs=1e-5) and got["n_bits"] == 5
    with pytest.raises(GenkitError, match="ODE option"):
        family_bits_per_dim(glow, images, rtol=1e-3)


@pytest.mark.parametrize("family", ["nice", "glow"])
def test_temperature_scales_the_prior_of_direct_samples(family):
    torch.manual_seed(0)
    flow = (NICE(NICEConfig(hidden=16, hidden_layers=1, prior="gaussian"), (1, 4, 4)) if family == "nice"
            else tiny_glow(levels=1, steps=2))
    perturb(flow.nets, 0.05)
    for t in (0.5, 1.0):
        x = flow.direct(1000, generator=torch.Generator().manual_seed(0), temperature=t)
        latent = (flow.flow().encode(x)[0] if family == "nice"
                  else torch.cat([e.flatten(1) for e in flow.flow().encode(x)[0]], 1))
        assert float(latent.std()) == pytest.approx(t, rel=0.03)
    a, b = (flow.direct(2, generator=torch.Generator().manual_seed(s), temperature=0.0) for s in (0, 1))
    torch.testing.assert_close(a, b)  # T = 0: the prior's mode, whatever the noise


def tiny_recipe(family: str, steps: int, **extra):
    model = (["model.hidden=16", "model.hidden_layers=1"] if family == "nice"
             else ["model.levels=2", "model.steps=2", "model.hidden=8"])
    overrides = [*model, "data.image_size=8", "data.batch_size=8", f"train.steps={steps}",
                 "train.checkpoint_every=2", "train.keep_last=10", "train.sample_every=0", "train.log_every=1",
                 "sample.n=4", *[f"{k}={v}" for k, v in extra.items()]]
    return load_recipe(f"{family}_digits", overrides)


def test_cli_samples_with_temperature_and_evaluates_exact_bpd(tmp_path, capsys):
    run = genkit.train(tiny_recipe("glow", 2), out=tmp_path / "glow")
    assert main(["sample", str(run), "--sampler", "direct", "--temperature", "0.7", "--n", "4",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").exists()
    capsys.readouterr()
    assert main(["eval", "bpd", str(run), "--n", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    family = genkit.load(run, device="cpu")
    images = torch.cat(list(iter_images(f"recipe:{run / 'config.yaml'}:test", 32, 16)))
    want = family_bits_per_dim(family, images, generator=torch.Generator().manual_seed(0))
    assert result["bits_per_dim"] == pytest.approx(want["bits_per_dim"], abs=1e-6)
    assert result["method"].startswith("exact") and "rtol" not in result


def test_training_nice_lowers_held_out_bits_per_dim(tmp_path):
    """300 steps of the digits default (model as shipped) against the untrained flow."""
    recipe = load_recipe("nice_digits", ["train.steps=300", "train.warmup=20", "train.sample_every=0",
                                         "train.checkpoint_every=300", "train.ema_decay=null"])
    run = genkit.train(recipe, out=tmp_path / "nice")
    s = EvalSettings(batch_size=100, seed=0)
    trained = compute_bpd(run, None, s)["bits_per_dim"]
    held_out = torch.cat(list(iter_images(f"recipe:{run / 'config.yaml'}:test", None, 100)))
    untrained = family_bits_per_dim(NICE(recipe.model, (1, 16, 16)), held_out,
                                    generator=torch.Generator().manual_seed(0))
    assert trained < untrained["bits_per_dim"] - 0.5, (trained, untrained["bits_per_dim"])


@pytest.mark.slow
def test_training_glow_lowers_held_out_bits_per_dim(tmp_path):
    first = genkit.train(load_recipe("glow_digits", ["train.steps=1", "train.sample_every=0"]), out=tmp_path / "a")
    run = genkit.train(load_recipe("glow_digits", ["train.steps=300", "train.sample_every=0",
                                                   "train.ema_decay=null"]), out=tmp_path / "b")
    s = EvalSettings(batch_size=100, seed=0)
    before, after = compute_bpd(first, None, s)["bits_per_dim"], compute_bpd(run, None, s)["bits_per_dim"]
    assert after < before - 0.5, (before, after)


def test_glow_resume_equals_uninterrupted(tmp_path):
    straight = genkit.train(tiny_recipe("glow", 4), out=tmp_path / "straight")
    genkit.train(tiny_recipe("glow", 2), out=tmp_path / "stopped")
    resumed = genkit.train(tiny_recipe("glow", 4), out=tmp_path / "stopped", resume=True)
    a = load_tensors(straight / "model" / "weights.safetensors")
    b = load_tensors(resumed / "model" / "weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the run really trained: the weights moved away from the data-initialised start
    first = load_tensors(straight / "checkpoints" / "step-2" / "nets.safetensors")
    assert any(not torch.equal(first[k], a[k]) for k in first)


@pytest.mark.parametrize("log_every", [1, 100])
def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, log_every):
    """The loss turns NaN at step 4; with log_every=100 no logging step sees it before the
    checkpoint of step 4 would be written: the trainer's finiteness check must refuse it."""
    real, calls = flow_family.bits_per_dim, {"n": 0}

    def nan_from_step_4(nll, dims, n_bits=8):
        calls["n"] += 1
        out = real(nll, dims, n_bits)
        return out * float("nan") if calls["n"] >= 4 else out

    monkeypatch.setattr(flow_family, "bits_per_dim", nan_from_step_4)
    run = tmp_path / "nan"
    with pytest.raises(GenkitError, match=r"(loss term 'bpd' is not finite \(nan/inf\)|parameter '.+' is not finite) at step 4"):
        genkit.train(tiny_recipe("nice", 6, **{"train.checkpoint_every": 1, "train.log_every": log_every}),
                     out=run)
    ckpts = list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["step-1", "step-2", "step-3"]
    assert all(torch.isfinite(v).all() for v in load_tensors(ckpts[-1] / "nets.safetensors").values())



@pytest.mark.parametrize("family", ["nice", "glow"])
def test_flow_train_step_is_the_bits_per_dim_of_its_dequantized_batch(family):
    """The batch quantized to n_bits levels, dequantized with U[0, 1) from the global-batch stream, and its
    bits/dim under the flow: the loss stepped on group "model" and logged as "bpd"."""
    from genkit.samplers.likelihood import bits_per_dim, dequantize_with

    torch.manual_seed(0)
    flow = (NICE(NICEConfig(hidden=16, hidden_layers=1), (1, 8, 8)) if family == "nice"
            else tiny_glow(n_bits=5))
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    opt = RecordingHandle(seed=2)
    logs = flow.train_step({"image": x}, 0, opt)
    [u] = opt.draws
    k = flow.levels(x)
    assert u.shape == k.shape == x.shape and int(k.max()) < 2 ** flow.n_bits
    with torch.no_grad():
        want = bits_per_dim(-flow.log_prob(dequantize_with(k, u, flow.n_bits)), 64, flow.n_bits).mean()
    [(group, loss)] = opt.steps
    assert group == "model" and set(logs) == {"bpd"} and torch.equal(logs["bpd"], loss.detach())
    torch.testing.assert_close(loss.detach(), want)



def test_glow_learned_top_prior_interleaves_mean_and_log_scale_and_samples_are_seeded():
    """learn_top: the top prior's channels alternate mean, log-scale (openai/glow's split_feature 'cross'),
    so N(mean, exp(logs)^2) has distinct learned parameters; direct sampling follows its generator."""
    glow = tiny_glow(learn_top=True)
    net = glow.flow()
    with torch.no_grad():
        net.top.copy_(torch.randn(net.top.shape, generator=torch.Generator().manual_seed(0)))
    mean, logs = net.top_prior(torch.zeros(2, *net.latent_shapes[-1]))
    torch.testing.assert_close(mean, net.top[:, 0::2])
    torch.testing.assert_close(logs, net.top[:, 1::2])
    assert not torch.allclose(mean, logs)
    one = glow.direct(3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(one, glow.direct(3, generator=torch.Generator().manual_seed(4)))
    assert not torch.equal(one, glow.direct(3, generator=torch.Generator().manual_seed(5)))
    # temperature scales every latent, the splits' too: at 0 every seed gives the priors' means
    torch.testing.assert_close(glow.direct(2, generator=torch.Generator().manual_seed(4), temperature=0.0),
                               glow.direct(2, generator=torch.Generator().manual_seed(5), temperature=0.0))


@pytest.mark.parametrize("levels,coupling,lu,learn_top", [(1, "additive", False, True), (3, "affine", True, False)])
def test_glow_is_built_as_configured(levels, coupling, lu, learn_top):
    """L levels of K steps (ActNorm, 1x1 conv LU or not, affine or additive coupling), L - 1 split priors, the
    latents' shapes, and a learned top prior only when asked."""
    net = tiny_glow(levels=levels, steps=3, coupling=coupling, lu=lu, learn_top=learn_top).flow()
    assert [len(steps) for steps in net.levels] == [3] * levels and len(net.splits) == levels - 1
    for steps in net.levels:
        for step in steps:
            _, conv, coupling_layer = step.layers
            assert conv.lu == lu and coupling_layer.affine == (coupling == "affine")
    c, size, shapes = 1, 8, []
    for i in range(levels):
        c, size = 4 * c, size // 2
        if i < levels - 1:
            shapes.append((c - c // 2, size, size))
            c = c // 2
    assert net.latent_shapes == [*shapes, (c, size, size)]
    assert (net.top is not None) == learn_top and (not learn_top or net.top.shape == (1, 2 * c, size, size))


def test_glow_refuses_bad_sizes_and_settings_naming_the_key():
    for kw, msg in (({"levels": 0}, "model.levels: must be >= 1, got 0"),
                    ({"steps": 0}, "model.steps: must be >= 1, got 0"),
                    ({"hidden": 0}, "model.hidden: must be >= 1, got 0"),
                    ({"n_bits": 0}, "model.n_bits: must be in 1..8, got 0"),
                    ({"n_bits": 9}, "model.n_bits: must be in 1..8, got 9")):
        with pytest.raises(GenkitError, match=f"^{msg}$"):
            Glow(GlowConfig(**{"levels": 2, "steps": 1, "hidden": 8, **kw}), (1, 8, 8))
    for bits in (1, 8):
        assert Glow(GlowConfig(levels=2, steps=1, hidden=8, n_bits=bits), (1, 8, 8)).n_bits == bits
    for shape, levels in (((1, 12, 12), 3), ((1, 8, 16), 2), ((1, 16, 8), 2)):
        with pytest.raises(GenkitError, match=f"data.image_size: {shape[1]} does not fit model.levels={levels}"):
            Glow(GlowConfig(levels=levels, steps=1, hidden=8), shape)
    assert Glow(GlowConfig(levels=2, steps=1, hidden=8), (1, 12, 12)).flow().latent_shapes[-1] == (8, 3, 3)


def test_nice_refuses_bad_sizes_naming_the_key_and_keeps_its_config():
    for kw, msg in (({"coupling_layers": 0}, "model.coupling_layers: must be >= 1, got 0"),
                    ({"hidden": 0}, "model.hidden: must be >= 1, got 0"),
                    ({"hidden_layers": 0}, "model.hidden_layers: must be >= 1, got 0"),
                    ({"n_bits": 0}, "model.n_bits: must be in 1..8, got 0"),
                    ({"n_bits": 9}, "model.n_bits: must be in 1..8, got 9")):
        with pytest.raises(GenkitError, match=f"^{msg}$"):
            NICE(NICEConfig(**{"hidden": 8, "hidden_layers": 1, **kw}), (1, 4, 4))
    for bits in (1, 5, 8):
        cfg = NICEConfig(hidden=8, hidden_layers=1, n_bits=bits)
        nice = NICE(cfg, (1, 4, 4))
        assert nice.n_bits == bits and nice.cfg is cfg


def test_nice_couplings_alternate_which_half_they_keep():
    """Coupling i passes x_I1 through unchanged, I1 = the indices of parity i % 2 (the paper's roles exchanged
    from layer to layer), and changes the other half."""
    torch.manual_seed(0)
    net = perturb(NICE(NICEConfig(coupling_layers=4, hidden=8, hidden_layers=1), (1, 4, 4)).nets).flow
    x = torch.randn(5, 16)
    for i, coupling in enumerate(net.couplings):
        y, _ = coupling(x)
        kept = torch.arange(16) % 2 == i % 2
        assert torch.equal(y[:, kept], x[:, kept]) and (y[:, ~kept] != x[:, ~kept]).all(), i


@pytest.mark.parametrize("prior", ["logistic", "gaussian"])
def test_nice_log_prob_is_the_prior_of_the_latent_plus_the_scaling_logdet(prior):
    """log p_X(x) = sum_d log p_H(h_d) + sum_d s_d (eq. 3), the prior in closed form; log-det summed in float32
    for a bf16 network."""
    torch.manual_seed(0)
    nice = NICE(NICEConfig(hidden=8, hidden_layers=1, prior=prior), (1, 4, 4))
    perturb(nice.nets)
    net = nice.flow()
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    with torch.no_grad():
        h, _ = net.encode(x)
        log_p_h = (-h - 2 * torch.nn.functional.softplus(-h) if prior == "logistic"
                   else -0.5 * h ** 2 - 0.5 * math.log(2 * math.pi)).sum(1)
        s = net.scaling.s.sum()
        assert abs(float(s)) > 0.1
        torch.testing.assert_close(nice.log_prob(x), log_p_h + s)
        net.bfloat16()
        assert net.encode(x.bfloat16())[1].dtype == torch.float32


def test_nice_samples_the_logistic_prior_through_its_logit_seeded():
    """Logistic prior: h0 = log u - log(1 - u), u ~ U(0, 1) clamped off {0, 1}, so the latents of direct samples
    have the logistic's quantiles (scaled by the temperature) and stay finite at the draw's ends."""
    torch.manual_seed(0)
    nice = NICE(NICEConfig(hidden=8, hidden_layers=1, prior="logistic"), (1, 4, 4))
    perturb(nice.nets, 0.05)
    for t in (0.5, 1.0):
        x = nice.direct(1000, generator=torch.Generator().manual_seed(0), temperature=t)
        h = nice.flow().encode(x)[0].flatten().double()
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
        torch.testing.assert_close(torch.quantile(h, q), t * torch.log(q / (1 - q)), rtol=0, atol=0.05 * t)
    one = nice.direct(3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(one, nice.direct(3, generator=torch.Generator().manual_seed(4)))
    assert not torch.equal(one, nice.direct(3, generator=torch.Generator().manual_seed(5)))
    for prior in ("logistic", "gaussian"):
        nice.flow().prior = prior
        torch.manual_seed(7)
        a = nice.direct(2, generator=torch.Generator().manual_seed(4))
        torch.manual_seed(8)
        assert torch.equal(a, nice.direct(2, generator=torch.Generator().manual_seed(4))), prior


def test_nice_logistic_draw_stays_finite_at_the_ends_of_the_uniform(monkeypatch):
    from genkit.families import nice as nice_module

    nice = NICE(NICEConfig(hidden=8, hidden_layers=1, prior="logistic"), (1, 2, 2))
    monkeypatch.setattr(nice_module, "rand", lambda shape, g, device: torch.tensor([[0.0, 1.0, 0.5, 1e-3]]))
    h = nice.direct(1, temperature=1.0).flatten()     # untrained NICE: x = h
    torch.testing.assert_close(h[:2].double(), torch.tensor([-1.0, 1.0], dtype=torch.float64) * math.log(1e6 - 1),
                               rtol=1e-3, atol=0)
    torch.testing.assert_close(h[2:].double(), torch.tensor([0.0, math.log(1e-3 / (1 - 1e-3))],
                                                            dtype=torch.float64), rtol=1e-5, atol=1e-6)
