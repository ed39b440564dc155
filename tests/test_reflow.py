"""Reflow, pairs and distillation (Liu et al. 2023): genkit/reflow.py, genkit/data/pairs.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_UNET
from step_handles import RecordingHandle
from test_rectified_flow import Oracle, hand_loss, tiny_rf

import genkit
import genkit.reflow
from genkit.cli import main
from genkit.config import DataConfig
from genkit.data import build_dataset
from genkit.errors import ConfigError, DataError, RunError
from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from genkit.io import load_tensors
from genkit.nn.unet import UNetConfig
from genkit.reflow import generate_pairs, transport
from genkit.runs import init_from_run, load_recipe, run_weights

SHAPE = (1, 8, 8)

# ---------------------------------------------------------------- reflow on Gaussian data, exactly

M, S = 0.1, 0.2  # data N(M, S^2) per pixel: its transport map stays inside [-1, 1] (no clamping)


def independent_velocity(x_t, t):
    """The 1-RF field E[eps - x | x_t] of the independent coupling (jointly Gaussian: affine in x_t)."""
    var = (1 - t) ** 2 * S ** 2 + t ** 2
    dev = x_t - (1 - t) * M
    return (t / var) * dev - (M + ((1 - t) * S ** 2 / var) * dev)


def oracle_family(velocity) -> RectifiedFlow:
    family = tiny_rf()
    family.nets["unet"] = Oracle(velocity)
    return family


def fit_velocity(noise: torch.Tensor, images: torch.Tensor, degree: int = 6):
    """Flow matching on pairs with a linear model v = sum_j t^j (a_j x_t + b_j), by least squares."""
    g = torch.Generator().manual_seed(3)
    eps, x = noise.flatten(), images.flatten()
    t = torch.rand(eps.shape, generator=g, dtype=torch.float64)
    x_t = (1 - t) * x + t * eps

    def features(x_t, t):  # (..., 2 (degree + 1))
        return torch.stack([t ** j * x_t for j in range(degree + 1)] + [t ** j for j in range(degree + 1)], -1)

    coef = torch.linalg.lstsq(features(x_t, t), (eps - x).unsqueeze(-1)).solution.squeeze(-1)
    return lambda x_t, t: (features(x_t.double(), t.double().expand_as(x_t)) @ coef).to(x_t.dtype)


def test_reflow_on_gaussian_data_straightens_the_flow_and_fixes_one_step_sampling():
    """Pairs from the 1-RF's ODE, a 2-RF fitted on them: lower straightness and 1-step error."""
    rf1 = oracle_family(independent_velocity)
    noise = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    images = transport(rf1, noise, "rk45", rtol=1e-7, atol=1e-7).double()
    torch.testing.assert_close(images, M + S * noise, rtol=0, atol=2e-3)  # the 1-D monotone map
    rf2 = oracle_family(fit_velocity(noise, images))

    test_noise = torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = transport(rf1, test_noise, "rk45", rtol=1e-7, atol=1e-7).double()
    one_step = [(transport(f, test_noise, "ddim", steps=1).double() - target).pow(2).mean().sqrt().item()
                for f in (rf1, rf2)]
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    straight = [f.straightness(32, g(), steps=20) for f in (rf1, rf2)]
    assert one_step[0] > 0.15 and one_step[1] < 0.01, one_step   # 1-RF: one step collapses to E[x] = M
    assert straight[0] > 1e-2 and straight[1] < 1e-4, straight


class MLPVelocity(torch.nn.Module):
    """A small MLP velocity net for 2-D points stored as (B, 2, 1, 1) "images"; UNet call signature."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + 3, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, 2))

    def forward(self, x_t, timestep):
        t = (timestep.to(x_t.dtype) / 1000).view(-1, 1)
        h = torch.cat([x_t.flatten(1), t, torch.sin(torch.pi * t), torch.cos(torch.pi * t)], 1)
        return SimpleNamespace(sample=self.net(h).view_as(x_t))


def two_gaussians(n: int, generator: torch.Generator) -> torch.Tensor:
    """Points at (+-0.6, 0) + N(0, 0.08^2 I), equal weights, as (n, 2, 1, 1)."""
    side = torch.randint(0, 2, (n,), generator=generator).double() * 1.2 - 0.6
    x = torch.stack([side, torch.zeros(n, dtype=torch.float64)], 1) + 0.08 * torch.randn(n, 2, generator=generator,
                                                                                     dtype=torch.float64)
    return x.float().view(n, 2, 1, 1)


def fit(family: RectifiedFlow, data: torch.Tensor, noise: torch.Tensor | None, steps: int, seed: int) -> None:
    """Flow matching with the family's own loss: independent noise (1-RF) or the given pairs (reflow)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(family.nets.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (256,), generator=g)
        eps = torch.randn(256, 2, 1, 1, generator=g) if noise is None else noise[idx]
        loss = family.loss(data[idx], torch.rand(256, generator=g), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_reflow_of_a_trained_network_on_two_gaussians_straightens_paths_and_one_step_samples():
    """2-D toy, trained MLPs: 2-RF on the 1-RF's (eps, ODE(eps)) pairs has lower S(Z), 1-step error."""
    torch.manual_seed(0)
    rf1 = tiny_rf()
    rf1.sample_shape, rf1.nets["unet"] = (2, 1, 1), MLPVelocity()
    data = two_gaussians(4096, torch.Generator().manual_seed(0))
    fit(rf1, data, None, steps=1500, seed=1)
    noise = torch.randn(4096, 2, 1, 1, generator=torch.Generator().manual_seed(2))
    pairs = transport(rf1, noise, "rk45")
    rf2 = tiny_rf()
    rf2.sample_shape, rf2.nets["unet"] = (2, 1, 1), MLPVelocity()
    rf2.nets.load_state_dict(rf1.nets.state_dict())  # reflow starts from the 1-RF
    fit(rf2, pairs, noise, steps=1500, seed=3)

    test_noise = torch.randn(512, 2, 1, 1, generator=torch.Generator().manual_seed(4))
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    straight = [f.straightness(512, g(), steps=32) for f in (rf1, rf2)]
    # 1-step error against each model's own ODE solution (its coupling), and against the data:
    # the distance of a 1-step sample to the nearer mode centre (+-0.6, 0)
    ode_err, mode_dist = [], []
    for f in (rf1, rf2):
        one = transport(f, test_noise, "ddim", steps=1).flatten(1)
        ode_err.append((one - transport(f, test_noise, "rk45").flatten(1)).norm(dim=1).mean().item())
        mode_dist.append(torch.minimum((one - torch.tensor([0.6, 0])).norm(dim=1),
                                       (one - torch.tensor([-0.6, 0])).norm(dim=1)).mean().item())
    assert straight[1] < 0.25 * straight[0], straight
    assert ode_err[1] < 0.5 * ode_err[0], ode_err
    assert mode_dist[1] < 0.5 * mode_dist[0] and mode_dist[1] < 0.2, mode_dist  # 1-RF: one step blurs to the middle
    # the 2-RF keeps the data distribution: its many-step samples still sit on the two modes
    many = transport(rf2, test_noise, "ddim", steps=32).flatten(1)
    assert 0.35 < (many[:, 0] > 0).float().mean() < 0.65


def test_transport_starts_from_the_given_noise_and_refuses_unknown_options():
    family = oracle_family(lambda x_t, t: torch.zeros_like(x_t))  # v = 0: x stays at eps
    noise = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(transport(family, noise, "ddim", steps=3), noise, rtol=0, atol=1e-6)
    with pytest.raises(genkit.errors.SamplerError, match="no option 'bogus'"):
        transport(family, noise, "ddim", bogus=1)


# ---------------------------------------------------------------- distillation times


@pytest.mark.parametrize("k", [1, 4])
def test_grid_time_sampling_draws_the_k_step_grid_start_points(k):
    family = tiny_rf(time_sampling="grid", distill_steps=k)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(64, *SHAPE, generator=g) * 2 - 1
    noise = torch.randn(64, *SHAPE, generator=g)
    opt = RecordingHandle()
    logs = family.train_step({"image": x, "noise": noise}, 0, opt)
    [draw] = opt.draws
    t = 1 - draw.float() / k
    assert set(t.tolist()) == {1 - i / k for i in range(k)}
    if k == 1:
        assert (t == 1).all()
    assert float(logs["loss"]) == pytest.approx(hand_loss(family, x, t, noise), rel=1e-5)
    with pytest.raises(ConfigError, match="distill_steps"):
        tiny_rf(time_sampling="grid", distill_steps=0)


# ---------------------------------------------------------------- pairs from a tiny trained run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A rectified-flow run trained for 2 steps (seed 7, so its weights differ from a seed-0 init)."""
    recipe = load_recipe("rf_digits", overrides=[*TINY_UNET, "data.image_size=8", "data.batch_size=8",
                                                 "train.steps=2", "train.seed=7", "sample.n=4", "sample.steps=2"])
    return genkit.train(recipe, out=tmp_path_factory.mktemp("runs") / "rf")


PAIR_ARGS = dict(sampler="rk45", rtol=1e-3, atol=1e-3, batch_size=4, shard_size=4, device="cpu")


@pytest.fixture(scope="module")
def pairs(tiny_run, tmp_path_factory):
    return generate_pairs(tiny_run, tmp_path_factory.mktemp("pairs") / "p", 10, seed=3, **PAIR_ARGS)


def shard_files(folder):
    return sorted(folder.glob("shard-*.safetensors"))


def test_generate_pairs_writes_shards_and_a_manifest(pairs, tiny_run):
    files = shard_files(pairs)
    assert [f.name for f in files] == [f"shard-0000{k}.safetensors" for k in range(3)]
    manifest = json.loads((pairs / "manifest.json").read_text())
    assert manifest["n"] == 10 and manifest["sampler"] == "rk45" and manifest["steps"] is None
    assert manifest["seed"] == 3 and manifest["shard_size"] == 4 and manifest["sample_shape"] == [1, 8, 8]
    assert manifest["options"] == {"rtol": 1e-3, "atol": 1e-3} and "genkit_version" in manifest
    shards = [load_tensors(f) for f in files]
    assert [len(s["noise"]) for s in shards] == [4, 4, 2]
    family = genkit.load(tiny_run, device="cpu")
    for s in shards:
        assert s["noise"].dtype == s["image"].dtype == torch.float32 and s["image"].shape == s["noise"].shape
        assert s["image"].abs().max() <= 1 and (s["image"] * 127.5).frac().abs().max() > 0  # not quantized
        again = transport(family, s["noise"], "rk45", rtol=1e-3, atol=1e-3)  # same batch composition
        torch.testing.assert_close(again, s["image"], rtol=0, atol=1e-6)
    assert not torch.equal(shards[0]["noise"], shards[1]["noise"])


def test_resumed_generation_equals_an_uninterrupted_one(pairs, tiny_run, tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    for f in [pairs / "manifest.json", *shard_files(pairs)[:2]]:  # as if killed during the last shard
        (folder / f.name).write_bytes(f.read_bytes())
    generate_pairs(tiny_run, folder, 10, seed=3, **PAIR_ARGS)
    for a, b in zip(shard_files(pairs), shard_files(folder), strict=True):  # (header order varies: compare tensors)
        ta, tb = load_tensors(a), load_tensors(b)
        assert torch.equal(ta["noise"], tb["noise"]) and torch.equal(ta["image"], tb["image"])
    with pytest.raises(RunError, match="seed=3.*seed=4"):
        generate_pairs(tiny_run, folder, 10, seed=4, **PAIR_ARGS)
    with pytest.raises(RunError, match="n=10.*n=12"):
        generate_pairs(tiny_run, folder, 12, seed=3, **PAIR_ARGS)


def test_pairs_source_yields_noise_image_pairs_and_checks_the_folder(pairs, tmp_path):
    ds = build_dataset(DataConfig(source="pairs", root=str(pairs), image_size=8), "train")
    assert len(ds) == 10 and ds.channels == 1 and ds.image_size == 8 and ds.num_classes == 0
    item = ds[5]
    shard = load_tensors(pairs / "shard-00001.safetensors")
    assert torch.equal(item["image"], shard["image"][1]) and torch.equal(item["noise"], shard["noise"][1])
    assert int(item["label"]) == -1
    with pytest.raises(DataError, match="are 8x8, got data.image_size=16"):
        build_dataset(DataConfig(source="pairs", root=str(pairs), image_size=16), "train")
    with pytest.raises(DataError, match="no held-out 'test' split"):
        build_dataset(DataConfig(source="pairs", root=str(pairs), image_size=8), "test")
    with pytest.raises(DataError, match="data.hflip"):
        build_dataset(DataConfig(source="pairs", root=str(pairs), image_size=8, hflip=True), "train")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "manifest.json").write_bytes((pairs / "manifest.json").read_bytes())
    (partial / "shard-00000.safetensors").write_bytes((pairs / "shard-00000.safetensors").read_bytes())
    with pytest.raises(DataError, match="shard-00001.safetensors' is missing"):
        build_dataset(DataConfig(source="pairs", root=str(partial), image_size=8), "train")
    with pytest.raises(DataError, match="manifest.json' not found"):
        build_dataset(DataConfig(source="pairs", root=str(tmp_path), image_size=8), "train")


def flat_unet(weights):
    return torch.cat([v.flatten().float() for k, v in sorted(weights.items())])


def test_reflow_training_starts_from_the_initrun_weights(pairs, tiny_run, tmp_path):
    recipe = load_recipe("rf_digits_reflow", overrides=[
        *TINY_UNET, "data.image_size=8", "data.batch_size=4", f"data.root={pairs}",
        f"model.init_from={tiny_run}", "train.steps=2", "train.warmup=0", "optim.model.lr=1e-9",
        "sample.n=2"])
    run = genkit.train(recipe, out=tmp_path / "rf2")
    trained = flat_unet(load_tensors(run / "checkpoints" / "step-2" / "nets.safetensors"))
    init = flat_unet(run_weights(tiny_run)[0])
    fresh = tiny_rf(seed=0)  # the seed-0 random init the reflow run would have had without init_from
    random_init = flat_unet(fresh.nets.state_dict())
    assert (trained - init).abs().max() < 1e-6
    assert (random_init - init).abs().max() > 1e-2
    assert (trained != init).any()  # it trained
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_init_from_refuses_another_architecture(tiny_run, tmp_path):
    other = RectifiedFlow(RectifiedFlowConfig(unet=UNetConfig(channels=[8, 8], attention=[False, False],
                                                              layers_per_block=1, norm_groups=4)), SHAPE)
    with pytest.raises(ConfigError, match="model.init_from"):
        init_from_run(other, tiny_run)
    with pytest.raises(RunError, match="does not exist"):
        init_from_run(other, tmp_path / "nowhere")


# ---------------------------------------------------------------- CLI


def test_cli_reflow_and_eval_straightness(tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pairs"
    assert main(["reflow", str(tiny_run), "--pairs", "3", "--out", str(out), "--sampler", "ddim",
                 "--steps", "2", "--shard-size", "2", "--device", "cpu"]) == 0
    assert [f.name for f in shard_files(out)] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert json.loads((out / "manifest.json").read_text())["steps"] == 2
    capsys.readouterr()
    assert main(["eval", "straightness", str(tiny_run), "--n", "4", "--steps", "3", "--json",
                 "--device", "cpu", "--out", str(tmp_path / "s.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and result["steps"] == 3 and result["run"] == str(tiny_run)
    assert result["straightness"] > 0 and "genkit_version" in result
    assert json.loads((tmp_path / "s.json").read_text()) == result
    family = genkit.load(tiny_run, device="cpu")
    assert result["straightness"] == family.straightness(4, torch.Generator().manual_seed(0), steps=3)
    assert main(["reflow", str(tiny_run), "--pairs", "3", "--out", str(out), "--seed", "1",
                 "--sampler", "ddim", "--steps", "2", "--shard-size", "2", "--device", "cpu"]) == 2
    assert "seed" in capsys.readouterr().err
    monkeypatch.setattr(genkit.reflow, "load", lambda run, device=None: SimpleNamespace(name="ddpm"))
    assert main(["eval", "straightness", str(tiny_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "family 'ddpm' has no straightness" in err
