"""VQGAN tokenizer: the quantizer's straight-through estimator, losses, EMA codebook and dead-code
restart against hand computations; the adaptive GAN weight; two parameter groups; offline LPIPS;
a short run lowers the reconstruction error; `genkit eval recon`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from step_handles import RecordingHandle
from torch import nn

import genkit
from genkit.cli import main
from genkit.errors import ConfigError, GenkitError, SamplerError
from genkit.families.vqgan import VQGAN, QuantizerConfig, VQGANConfig, adaptive_weight, hinge_d_loss
from genkit.io import load_tensors
from genkit.nn.vq import VectorQuantizer, code_stats

TINY_VQGAN = [  # digits at 8 px, f = 2: 4x4 codes of K = 16
    "data.image_size=8", "data.batch_size=32", "model.f=2", "model.channels=[8,16]", "model.norm_groups=4",
    "model.quantizer.num_codes=16", "model.quantizer.dim=8", "model.disc_channels=8", "model.disc_layers=1",
    "model.disc_start=10", "train.log_every=5", "train.sample_every=0", "train.checkpoint_every=1000",
    "sample.n=8",
]


def tiny_config(**model) -> VQGANConfig:
    """f = 2, two levels of 8 and 16 channels, K = 16 codes of dimension 8, a one-layer PatchGAN."""
    return VQGANConfig(**{"f": 2, "channels": [8, 16], "norm_groups": 4, "disc_channels": 8, "disc_layers": 1,
                          "quantizer": QuantizerConfig(num_codes=16, dim=8), **model})


def tiny_vqgan(**q) -> VQGAN:
    cfg = tiny_config(quantizer=QuantizerConfig(num_codes=16, dim=8, **q))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return VQGAN(cfg, shape=(1, 8, 8))


def quantizer(codes: list[list[float]], **kw) -> VectorQuantizer:
    vq = VectorQuantizer(len(codes), len(codes[0]), **kw)
    with torch.no_grad():
        vq.embedding.copy_(torch.tensor(codes))
    return vq


def update(vq: VectorQuantizer, z: torch.Tensor, k: torch.Tensor, draw=None) -> int:
    """One optimizer step of one micro-batch: accumulate its statistics, then update."""
    vq.accumulate(z, k)
    return vq.update(draw)


def as_map(rows: torch.Tensor) -> torch.Tensor:
    """(N, d) vectors -> (1, d, 1, N) map, so that flat() gives the rows back in order."""
    return rows.t().unsqueeze(0).unsqueeze(2).contiguous()


# ---------------------------------------------------------------- quantizer


def test_straight_through_gradient_is_the_gradient_at_the_quantized_point():
    vq = quantizer([[0.0, 0.0], [1.0, 1.0], [-2.0, 1.0]])
    z = as_map(torch.tensor([[0.1, -0.2], [0.8, 1.3], [-1.5, 0.7], [0.9, 0.6]])).requires_grad_(True)
    z_st, k, _ = vq(z)
    assert k.flatten().tolist() == [0, 1, 2, 1]
    torch.testing.assert_close(z_st, as_map(vq.embedding[k.flatten()].detach()))  # the value is z_q
    (z_st ** 3).sum().backward()                                                 # f(z) = sum z^3
    torch.testing.assert_close(z.grad, 3 * z_st.detach() ** 2)                    # f'(z_q), passed to z_e
    assert z.grad.abs().sum() > 0


def test_commitment_and_codebook_losses_and_where_their_gradients_go():
    vq = quantizer([[0.0, 0.0], [1.0, 1.0]], beta=0.3)
    rows = torch.tensor([[0.2, -0.1], [0.7, 1.4], [1.2, 0.9]])
    z = as_map(rows).requires_grad_(True)
    _, k, out = vq(z)
    z_q = vq.embedding.detach()[k.flatten()]
    mse = ((rows - z_q) ** 2).mean()
    torch.testing.assert_close(out["commitment"], mse)
    torch.testing.assert_close(out["codebook"], mse)
    torch.testing.assert_close(out["loss"], mse + 0.3 * mse)
    out["loss"].backward()
    # d/dz of beta ||z - sg[e]||^2 only; d/de of ||sg[z] - e||^2 only
    torch.testing.assert_close(z.grad, as_map(0.3 * 2 * (rows - z_q) / rows.numel()))
    expected_e = torch.zeros(2, 2)
    expected_e.index_add_(0, k.flatten(), 2 * (z_q - rows) / rows.numel())
    torch.testing.assert_close(vq.embedding.grad, expected_e)


def test_ema_update_matches_a_hand_computation():
    """Two updates with gamma = 1/2: the zero-started EMAs divided by 1 - gamma^t weigh the batches
    1/3 and 2/3; code 2, unused at first, keeps its vector, then moves to its first vector's mean."""
    gamma, eps = 0.5, 1e-5
    vq = quantizer([[0.0, 0.0], [4.0, 4.0], [9.0, -9.0]], ema=True, decay=gamma, eps=eps)

    def smoothed(N):
        return (N + eps) / (N.sum() + 3 * eps) * N.sum()

    z = as_map(torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 3.0], [3.0, 3.0], [4.0, 6.0]]))
    _, k, out = vq(z)
    assert k.flatten().tolist() == [0, 0, 1, 1, 1] and out["codebook"] == 0
    update(vq, z, k)
    N1, s1 = torch.tensor([2.0, 3.0, 0.0]), torch.tensor([[1.0, 1.0], [12.0, 12.0], [0.0, 0.0]])
    torch.testing.assert_close(vq.embedding[:2], s1[:2] / smoothed(N1)[:2, None])
    assert vq.embedding[2].tolist() == [9.0, -9.0]  # never assigned: kept (was 0.99 * e / ~1e-5 before)
    z = as_map(torch.tensor([[0.0, 0.0], [1.0, 1.0], [8.0, -8.0], [5.0, 5.0]]))
    _, k, _ = vq(z)
    assert k.flatten().tolist() == [0, 0, 2, 1]
    update(vq, z, k)
    n2, s2 = torch.tensor([2.0, 1.0, 1.0]), torch.tensor([[1.0, 1.0], [5.0, 5.0], [8.0, -8.0]])
    N, m = N1 / 3 + 2 * n2 / 3, s1 / 3 + 2 * s2 / 3  # (1-g) g^(t-s) / (1 - g^t): 1/3, 2/3
    torch.testing.assert_close(N, torch.tensor([2.0, 5 / 3, 2 / 3]))
    torch.testing.assert_close(vq.cluster_size / (1 - gamma**2), N)
    torch.testing.assert_close(vq.embed_sum / (1 - gamma**2), m)
    torch.testing.assert_close(vq.embedding, m / smoothed(N)[:, None])
    torch.testing.assert_close(vq.embedding[2], torch.tensor([8.0, -8.0]), rtol=1e-4, atol=0)
    assert int(vq.updates) == 2


def sonnet_ema_codebook(init, decay, eps, batches):
    """Sonnet's VectorQuantizerEMA update written out (sonnet/src/nets/vqvae.py with
    moving_averages.ExponentialMovingAverage): hidden_0 = 0, counter += 1,
    hidden -= (hidden - value) (1 - decay), average = hidden / (1 - decay^counter)."""
    K = init.shape[0]
    hidden_n, hidden_dw, embeddings = torch.zeros(K, dtype=torch.float64), torch.zeros_like(init), init.clone()
    for counter, (flat_inputs, indices) in enumerate(batches, start=1):
        encodings = torch.nn.functional.one_hot(indices, K).to(torch.float64)
        hidden_n -= (hidden_n - encodings.sum(0)) * (1 - decay)
        hidden_dw -= (hidden_dw - encodings.t() @ flat_inputs) * (1 - decay)
        cluster_size, dw = hidden_n / (1 - decay**counter), hidden_dw / (1 - decay**counter)
        n = cluster_size.sum()
        cluster_size = (cluster_size + eps) / (n + K * eps) * n
        embeddings = dw / cluster_size[:, None]
    return embeddings


def test_ema_codebook_equals_sonnets_formula_except_that_unused_codes_keep_their_vector():
    K, d, decay, eps = 6, 3, 0.9, 1e-2  # a large eps: the smoothing sees whether N is debiased
    g = torch.Generator().manual_seed(0)
    vq = VectorQuantizer(K, d, ema=True, decay=decay, eps=eps)
    init = vq.embedding.clone()
    batches = []
    for t in range(5):  # code 5 is never assigned; code 4 only from the third update on
        rows = torch.randn(7, d, generator=g)
        k = torch.randint(0, 4 if t < 2 else 5, (7,), generator=g)
        batches.append((rows.double(), k))
        update(vq, as_map(rows), k.view(1, 1, 7))
    sonnet = sonnet_ema_codebook(init.double(), decay, eps, batches)  # in float64
    torch.testing.assert_close(vq.embedding[:5].double(), sonnet[:5], rtol=1e-5, atol=1e-6)
    assert torch.equal(vq.embedding[5], init[5]) and torch.equal(sonnet[5], torch.zeros(d, dtype=torch.float64))


def test_unused_codes_keep_their_initial_norm_and_used_codes_track_their_means():
    """The issue's case: K = 128 taming-initialised codes, N(0, 1) encoder outputs. Codes unused in
    the first update keep their vector (they reached norm ~2246 against ~3.8 before the fix), so
    they stay near the data and are chosen later."""
    K, d, decay = 128, 32, 0.99
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vq = VectorQuantizer(K, d, ema=True, decay=decay)
    init, chosen = vq.embedding.clone(), torch.zeros(K, dtype=torch.bool)
    for t in range(4):
        z = torch.randn(64, d, 4, 4, generator=g)
        _, k, _ = vq(z)
        chosen[k.flatten()] = True
        update(vq, z, k)
        if t == 0:
            assert 0 < int((~chosen).sum()) < K
            unused = ~chosen
            torch.testing.assert_close(vq.embedding[unused].norm(dim=1), init[unused].norm(dim=1), rtol=1e-6, atol=0)
    assert vq.embedding.norm(dim=1).max() < 10 and chosen[unused].any()
    # assignments fixed by hand (codes 100.. never): each used code is the EMA-weighted mean of its vectors
    vq, sums, counts = VectorQuantizer(K, d, ema=True, decay=decay), 0.0, 0.0
    init = vq.embedding.clone()
    for t in range(1, 6):
        rows = torch.randn(500, d, generator=g)
        k = torch.randint(0, 100, (500,), generator=g)
        onehot = torch.nn.functional.one_hot(k, K).float()
        sums, counts = decay * sums + onehot.t() @ rows, decay * counts + onehot.sum(0)
        update(vq, as_map(rows), k.view(1, 1, -1))
    torch.testing.assert_close(vq.embedding[:100], sums[:100] / counts[:100, None], rtol=1e-4, atol=1e-5)
    assert torch.equal(vq.embedding[100:], init[100:])


def test_ema_with_no_memory_moves_codes_to_their_cluster_means():
    vq = quantizer([[0.0, 0.0], [5.0, 5.0]], ema=True, decay=0.0, eps=1e-9)
    rows = torch.randn(200, 2, generator=torch.Generator().manual_seed(0)) + torch.tensor([[0.0], [5.0]]).repeat(100, 1)
    z = as_map(rows)
    _, k, _ = vq(z)
    update(vq, z, k)
    for i in range(2):
        torch.testing.assert_close(vq.embedding[i], rows[k.flatten() == i].mean(0), rtol=1e-5, atol=1e-6)


def test_dead_code_restart_revives_unused_codes():
    vq = quantizer([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0]], restart_threshold=0.5, usage_decay=0.5)
    rows = torch.tensor([[0.1, 0.0], [0.9, 1.1], [0.2, 0.1], [1.0, 0.8]])
    z = as_map(rows)
    draws = []

    def draw(high, n):
        draws.append((high, n))
        return torch.arange(n) % high

    restarted = []
    for _ in range(2):  # code 2 is never chosen: its usage 1/3 halves each update, below 0.5/3 at the 2nd
        _, k, _ = vq(z)
        assert 2 not in k.flatten().tolist()
        restarted.append(update(vq, z, k, draw))
    assert restarted == [0, 1]
    assert draws == [(4, 3)]  # one fixed-size draw (K indices), taken only when a code was dead
    torch.testing.assert_close(vq.embedding[2], rows[2])  # draw index for code 2 is 2 % 4
    assert vq.usage[2].item() == pytest.approx(1 / 3)  # a revived code starts at the uniform share 1/K
    _, k, _ = vq(z)
    assert 2 in k.flatten().tolist()  # the revived code is used again
    live = VectorQuantizer(3, 2, restart_threshold=0.0)
    assert update(live, z, torch.zeros(1, 1, 4, dtype=torch.long), draw) == 0  # restart off: nothing moves


def test_a_restarted_ema_code_counts_as_one_vector_of_its_restart():
    """Restarted at update 1 (debiased count 1, sum e), then given v at update 2 with gamma = 1/2:
    e = (gamma (1-gamma) e + (1-gamma) v) / (gamma (1-gamma) + (1-gamma)) = e/3 + 2v/3."""
    vq = quantizer([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0]], ema=True, decay=0.5, restart_threshold=0.9,
                   usage_decay=0.5)
    rows = torch.tensor([[0.1, 0.0], [0.9, 1.1], [0.2, 0.1], [1.0, 0.8]])
    assert update(vq, as_map(rows), torch.tensor([0, 1, 0, 1]).view(1, 1, 4), lambda high, n: torch.arange(n) % high) == 1
    fresh = rows[2]  # draw index 2 for code 2
    torch.testing.assert_close(vq.embedding[2], fresh)
    rows = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0]])
    assert update(vq, as_map(rows), torch.tensor([0, 1, 2]).view(1, 1, 3), lambda high, n: torch.arange(n) % high) == 0
    torch.testing.assert_close(vq.embedding[2], fresh / 3 + 2 * rows[2] / 3, rtol=1e-4, atol=1e-5)


def test_accumulated_micro_batches_update_like_their_concatenation():
    """EMA, usage and restart from two accumulated halves equal one update from the whole batch."""
    rows = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([0, 1] * 6)  # code 2 unused: its usage (1/3 + 0) / 2 falls below 0.9 / 3
    codes, kw = [[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], {"ema": True, "decay": 0.9, "restart_threshold": 0.9, "usage_decay": 0.5}
    halves, whole = quantizer(codes, **kw), quantizer(codes, **kw)

    def draw(high, n):
        return torch.arange(n) * 5 % high
    halves.accumulate(as_map(rows[:5]), k[:5].view(1, 1, 5))
    halves.accumulate(as_map(rows[5:]), k[5:].view(1, 1, 7))
    assert halves.update(draw) == update(whole, as_map(rows), k.view(1, 1, 12), draw) == 1
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(halves.state_dict()[name], value, rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(halves.embedding[2], rows[10])  # draw index for code 2 is 10
    assert int(halves.updates) == 1
    with pytest.raises(RuntimeError, match="nothing accumulated"):
        halves.update(draw)  # the statistics were used once


def test_cosine_codes_quantize_to_unit_vectors_by_angle():
    vq = quantizer([[1.0, 0.0], [0.0, 3.0]], cosine=True)
    z = as_map(torch.tensor([[10.0, 1.0], [0.1, 0.2], [-1.0, 5.0]]))
    z_st, k, _ = vq(z)
    assert k.flatten().tolist() == [0, 1, 1]  # by angle, not by distance to the raw codes
    torch.testing.assert_close(z_st[0, :, 0].t().norm(dim=1), torch.ones(3))


def test_code_stats_perplexity_and_usage():
    s = code_stats(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 8)
    assert s["perplexity"].item() == pytest.approx(4.0) and s["usage"].item() == 0.5
    s = code_stats(torch.zeros(10, dtype=torch.long), 8)
    assert s["perplexity"].item() == pytest.approx(1.0) and s["usage"].item() == 1 / 8


# ---------------------------------------------------------------- adaptive weight, two groups


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    torch.manual_seed(0)
    last = nn.Linear(4, 3)
    h = torch.randn(5, 4)
    out = last(h)
    rec = (out - 1).abs().mean()
    gan = -(out * torch.randn(5, 3)).mean()
    lam = adaptive_weight(rec, gan, last.weight, max_value=1e4, delta=1e-4)
    g_rec = torch.autograd.grad(rec, last.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, last.weight, retain_graph=True)[0]
    assert lam.item() == pytest.approx((g_rec.norm() / (g_gan.norm() + 1e-4)).item(), rel=1e-6)
    assert not lam.requires_grad
    assert adaptive_weight((out * 0).sum() + rec, 1e-12 * gan, last.weight, max_value=7.0).item() == 7.0


def test_hinge_discriminator_loss():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))


def test_two_groups_and_the_delayed_discriminator():
    family = tiny_vqgan()
    groups = family.param_groups()
    assert set(groups) == {"ae", "disc"}
    ae, disc = set(map(id, groups["ae"])), set(map(id, groups["disc"]))
    assert not ae & disc and len(ae) + len(disc) == sum(1 for _ in family.nets.parameters())
    batch = {"image": torch.rand(4, 1, 8, 8) * 2 - 1}
    h = RecordingHandle()
    logs = family.train_step(batch, 9, h)  # disc_start = 0 in the default config: GAN on
    assert [g for g, _ in h.steps] == ["ae", "disc"] and "adaptive_weight" in logs
    family.cfg.disc_start = 10
    h = RecordingHandle()
    logs = family.train_step(batch, 9, h)
    assert [g for g, _ in h.steps] == ["ae"] and "d_loss" not in logs and {"perplexity", "usage"} <= set(logs)


class AccumulatingHandle(RecordingHandle):
    """Steps the optimizers only on the last of `accum` micro-batches, or never (`skip`)."""

    def __init__(self, accum: int, skip: bool = False):
        super().__init__()
        self.accum, self.skip, self.micro = accum, skip, 0

    def step(self, group, loss):
        super().step(group, loss)
        return not self.skip and self.micro == self.accum - 1


class FakePerceptual(nn.Module):
    """A stand-in for LPIPS: an asymmetric per-sample distance, so the test can recompute the loss."""

    def forward(self, x, y):
        return (x - 2 * y).abs().flatten(1).mean(1)


@pytest.mark.parametrize("adaptive_max", [1e4, 1e-3])
def test_train_step_steps_the_taming_objective_on_both_groups(adaptive_max):
    """"ae": L1 + w_p P(x, x_rec) + L_VQ + d_weight lambda (-mean D(x_rec)), lambda the gradient-norm ratio at the
    decoder's last layer clamped to model.adaptive_max; "disc": the hinge loss; GAN terms from step disc_start on."""
    family = tiny_vqgan()
    family.cfg.perceptual_weight, family.cfg.disc_weight, family.cfg.adaptive_max = 0.5, 0.8, adaptive_max
    family.cfg.disc_start = 3
    family.perceptual = FakePerceptual()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ae, disc = family.nets["autoencoder"], family.nets["disc"]
    x_rec, _, _, vq = ae(x)
    l1, p = (x - x_rec).abs().mean(), FakePerceptual()(x, x_rec).mean()
    rec = l1 + 0.5 * p
    g_loss = -disc(x_rec).mean()
    g_rec = torch.autograd.grad(rec, ae.decoder.conv_out.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, ae.decoder.conv_out.weight, retain_graph=True)[0]
    lam = min(float(g_rec.norm() / (g_gan.norm() + 1e-4)), adaptive_max)
    want_ae = rec + vq["loss"] + 0.8 * lam * g_loss
    want_disc = 0.5 * (torch.relu(1 - disc(x)).mean() + torch.relu(1 + disc(x_rec)).mean())
    h = RecordingHandle()
    logs = family.train_step({"image": x}, 3, h)
    [(g1, ae_loss), (g2, d_loss)] = h.steps
    assert (g1, g2) == ("ae", "disc") and lam > 0 and float(p.detach()) > 0
    torch.testing.assert_close(ae_loss, want_ae)
    torch.testing.assert_close(d_loss, want_disc)
    assert set(logs) == {"loss", "l1", "lpips", "g_loss", "adaptive_weight", "d_loss", "commitment", "codebook",
                         "perplexity", "usage", "restarted"}
    for key, want in (("loss", want_ae), ("l1", l1), ("lpips", p), ("g_loss", g_loss), ("d_loss", want_disc),
                      ("adaptive_weight", torch.tensor(lam)), ("commitment", vq["commitment"]),
                      ("codebook", vq["codebook"]), ("restarted", torch.tensor(0.0))):
        torch.testing.assert_close(logs[key].detach().float(), want.detach().float(), msg=key)


def test_dead_codes_restart_from_the_steps_draws_only_when_the_optimizer_stepped():
    """With a restart threshold above every code's usage, the update after an optimizer step restarts codes from
    encoder outputs picked by the handle's randint (logged as "restarted"); a skipped step updates nothing."""
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    family = tiny_vqgan(restart_threshold=1.0)
    family.cfg.disc_start = 100
    skipped = AccumulatingHandle(1, skip=True)
    assert float(family.train_step({"image": x}, 0, skipped)["restarted"]) == 0 and not skipped.draws
    h = RecordingHandle()
    restarted = float(family.train_step({"image": x}, 1, h)["restarted"])
    [draw] = h.draws  # a candidate for each of the K = 16 codes among the 4 x 16 encoder outputs
    assert 0 < restarted <= 16 and draw.shape == (16,) and 0 <= int(draw.min()) <= int(draw.max()) < 64


def test_attention_option_adds_self_attention_to_encoder_and_decoder():
    from genkit.nn.vqgan_nets import AttnBlock

    for attention in (True, False):
        ae = VQGAN(tiny_config(attention=attention), shape=(1, 8, 8)).nets["autoencoder"]
        for net in (ae.encoder, ae.decoder):
            assert sum(isinstance(m, AttnBlock) for m in net.modules()) == int(attention)


def test_the_codebook_updates_once_per_optimizer_step_from_all_its_micro_batches():
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    family, reference = tiny_vqgan(ema=True, decay=0.9), tiny_vqgan(ema=True, decay=0.9)
    q, ref = family.nets["autoencoder"].quantizer, reference.nets["autoencoder"].quantizer
    skipped = AccumulatingHandle(2, skip=True)  # step 20 does not step (non-finite gradients, on_nan=skip)
    for skipped.micro in range(2):
        family.train_step({"image": x.flip(0)[4 * skipped.micro:][:4]}, 20, skipped)
    h = AccumulatingHandle(2)
    for h.micro in range(2):
        family.train_step({"image": x[4 * h.micro:][:4]}, 21, h)
        assert int(q.updates) == h.micro  # no update before the optimizer steps
    reference.train_step({"image": x}, 21, RecordingHandle())  # one micro-batch of 8
    assert int(q.updates) == int(ref.updates) == 1
    for name in ("embedding", "cluster_size", "embed_sum", "usage"):
        torch.testing.assert_close(getattr(q, name), getattr(ref, name), rtol=1e-5, atol=1e-6, msg=name)


def test_ema_codebook_is_not_a_trained_parameter():
    family = tiny_vqgan(ema=True)
    vq = family.nets["autoencoder"].quantizer
    assert all(p is not vq.embedding for p in family.param_groups()["ae"])
    assert "autoencoder.quantizer.embedding" in family.nets.state_dict()  # saved with the weights


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="model.f: must be a power of two, got 3"):
        VQGAN(VQGANConfig(f=3), shape=(1, 16, 16))
    with pytest.raises(ConfigError, match="model.channels has 3 levels"):
        VQGAN(VQGANConfig(f=8), shape=(1, 16, 16))
    with pytest.raises(ConfigError, match="data.image_size=12"):
        VQGAN(VQGANConfig(f=8, channels=[8, 8, 8, 8], norm_groups=4), shape=(1, 12, 12))
    with pytest.raises(ConfigError, match="model.disc_layers=2"):
        VQGAN(VQGANConfig(f=2, channels=[8, 8], norm_groups=4, disc_layers=2), shape=(1, 8, 8))
    with pytest.raises(ConfigError, match=r"^model.channels has 2 levels, model.f=8 needs 4$"):
        VQGAN(VQGANConfig(f=8, channels=[8, 8], norm_groups=4), shape=(1, 16, 16))
    for shape in ((1, 16, 12), (1, 12, 16)):  # H and W both checked
        with pytest.raises(ConfigError, match="^data.image_size=12 is not divisible by model.f=8$"):
            VQGAN(VQGANConfig(f=8, channels=[8, 8, 8, 8], norm_groups=4, disc_layers=2), shape=shape)
    small = dict(channels=[8], norm_groups=4, disc_channels=8, disc_layers=2)
    assert VQGAN(VQGANConfig(f=1, **small), shape=(1, 12, 12)).token_shape == (12, 12)  # f = 1 = 2^0; 12 // 4 = 3 px
    with pytest.raises(ConfigError, match=r"^model.disc_layers=2 down-samples data.image_size=11 below 3 px: use at "
                                          r"most 1 layers$"):
        VQGAN(VQGANConfig(f=1, **small), shape=(1, 11, 11))
    for size, layers, most in ((5, 1, 0), (12, 3, 2)):
        with pytest.raises(ConfigError, match=rf"below 3 px: use at most {most} layers$"):
            VQGAN(VQGANConfig(f=1, **{**small, "disc_layers": layers}), shape=(1, size, size))
    with pytest.raises(ConfigError, match="^model.quantizer.num_codes: must be >= 2, got 1$"):
        VQGAN(VQGANConfig(f=1, quantizer=QuantizerConfig(num_codes=1, dim=4), **small), shape=(1, 12, 12))
    for decay in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=rf"^model.quantizer.decay: must be in \[0, 1\), got {decay}$"):
            VQGAN(VQGANConfig(f=1, quantizer=QuantizerConfig(num_codes=4, dim=4, decay=decay), **small),
                  shape=(1, 12, 12))
    for q in (QuantizerConfig(num_codes=2, dim=4), QuantizerConfig(num_codes=4, dim=4, decay=0.0)):  # the edges
        assert VQGAN(VQGANConfig(f=1, quantizer=q, **small), shape=(1, 12, 12)).num_codes == q.num_codes


def test_quantizer_and_perceptual_follow_the_config():
    from genkit.nn.perceptual import LPIPS, MIN_SIZE

    q = QuantizerConfig(num_codes=16, dim=8, beta=0.5, ema=True, decay=0.8, cosine=True, restart_threshold=0.3,
                        usage_decay=0.7)
    vq = VQGAN(tiny_config(quantizer=q), shape=(1, 8, 8)).nets["autoencoder"].quantizer
    assert (vq.num_codes, vq.dim, vq.beta, vq.ema, vq.decay, vq.cosine, vq.restart_threshold, vq.usage_decay) == \
        (16, 8, 0.5, True, 0.8, True, 0.3, 0.7)
    size = MIN_SIZE["vgg"]
    cfg = tiny_config(perceptual="lpips_random", perceptual_net="vgg")
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        family = VQGAN(cfg, shape=(3, size, size))
    assert isinstance(family.perceptual, LPIPS) and "random" in family.perceptual.backbone
    with pytest.raises(ConfigError, match=rf"^model.perceptual=lpips_random with vgg needs data.image_size >= {size}, "
                                          rf"got {size - 2}$"):
        VQGAN(cfg, shape=(3, size, size - 2))
    with pytest.raises(ConfigError, match=rf"needs data.image_size >= {size}, got {size - 2}$"):
        VQGAN(cfg, shape=(3, size - 2, size))


def test_tokenizer_round_trip_shapes_and_refused_sampling():
    family = tiny_vqgan()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    k = family.encode(x)
    assert k.shape == (3, 4, 4) and k.dtype == torch.long and int(k.max()) < 16
    torch.testing.assert_close(family.decode(k), family.reconstruct(x))
    with pytest.raises(SamplerError, match="ar_prior"):
        genkit.sample(family, 2)


# ---------------------------------------------------------------- LPIPS offline


def test_lpips_without_backbone_weights_names_the_file(tmp_path, monkeypatch):
    from genkit.nn.perceptual import LPIPS

    monkeypatch.setenv("GENKIT_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(GenkitError, match=r"vgg16-397923af\.pth.*GENKIT_WEIGHTS_DIR"):
        LPIPS("vgg")
    with pytest.raises(GenkitError, match=r"alexnet-owt-7be5be79\.pth"):
        LPIPS("alex")


def test_lpips_backbone_loads_torchvision_features_and_checks_the_hash(tmp_path):
    import torchvision

    from genkit.nn.perceptual import LPIPS, load_backbone

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}
    lp = LPIPS("alex", random_backbone=True)
    assert "random" in lp.backbone
    load_backbone(lp.model.net, state, "test")
    torch.testing.assert_close(lp.model.net.slice1._modules["0"].weight, state["features.0.weight"])
    torch.testing.assert_close(lp.model.net.slice5._modules["10"].weight, state["features.10.weight"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lp(x, x).abs().max() < 1e-6 and (lp(x, x.flip(-1)) > 0).all()
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)  # right name, wrong content: refused before loading
    with pytest.raises(GenkitError, match="wrong or corrupted"):
        LPIPS("alex", weights=str(path))
    with pytest.raises(GenkitError, match="at least 32 px"):
        lp(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))


def test_vqgan_perceptual_loss_is_built_from_its_config_offline(tmp_path, monkeypatch):
    """model.perceptual: lpips finds model.perceptual_net's backbone at model.perceptual_weights (hash-checked)
    and names that key when it is missing; lpips_random builds a random backbone, with a warning."""
    from genkit.families.vqgan import VQGANConfig, build_perceptual

    for var in ("GENKIT_WEIGHTS_DIR", "XDG_CACHE_HOME", "TORCH_HOME"):
        monkeypatch.setenv(var, str(tmp_path))
    with pytest.warns(UserWarning, match="^model.perceptual=lpips_random: LPIPS with a RANDOMLY INITIALISED backbone$"):
        lp = build_perceptual(VQGANConfig(perceptual="lpips_random", perceptual_net="alex"))
    assert "random" in lp.backbone and type(lp.model.net).__name__ == "alexnet"
    with pytest.raises(GenkitError, match=r"alexnet-owt-7be5be79\.pth.* or pass model\.perceptual_weights=PATH$"):
        build_perceptual(VQGANConfig(perceptual="lpips", perceptual_net="alex"))
    bad = tmp_path / "elsewhere" / "alexnet-owt-7be5be79.pth"  # off the search path: found only by the key
    bad.parent.mkdir()
    torch.save({}, bad)
    with pytest.raises(GenkitError, match="wrong or corrupted"):
        build_perceptual(VQGANConfig(perceptual="lpips", perceptual_net="alex", perceptual_weights=str(bad)))


# ---------------------------------------------------------------- training and evaluation


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq") / "run"
    genkit.train("vqgan_digits", overrides=[*TINY_VQGAN, "train.steps=40", "optim.ae.lr=2e-3"], out=out)
    return out


def test_grad_accum_updates_the_codebook_like_a_batch_twice_as_large(tmp_path):
    """grad_accum = 2 at batch 16 equals grad_accum = 1 at batch 32 for the EMA codebook too, and the
    codebook updates once per optimizer step (before disc_start, whose adaptive weight is per micro-batch)."""
    from genkit.io import load_torch
    from genkit.runs import latest_checkpoint

    common = [*TINY_VQGAN, "model.quantizer.ema=true", "model.quantizer.decay=0.9",
              "model.quantizer.restart_threshold=0", "train.steps=4", "train.log_every=1"]
    runs = {accum: genkit.train("vqgan_digits", out=tmp_path / f"accum{accum}",
                                overrides=[*common, f"data.batch_size={32 // accum}", f"train.grad_accum={accum}"])
            for accum in (1, 2)}
    codebooks = {}
    for accum, run in runs.items():
        weights = load_tensors(run / "model" / "weights.safetensors")
        codebooks[accum] = {k: v for k, v in weights.items() if k.startswith("autoencoder.quantizer.")}
        optim = load_torch(latest_checkpoint(run / "checkpoints") / "optim-ae.pt")["state"]
        assert {int(s["step"]) for s in optim.values()} == {4}
        assert int(codebooks[accum]["autoencoder.quantizer.updates"]) == 4  # one update per optimizer step
    assert set(codebooks[1]) == set(codebooks[2]) >= {"autoencoder.quantizer.embedding", "autoencoder.quantizer.embed_sum"}
    for name, value in codebooks[1].items():
        torch.testing.assert_close(codebooks[2][name], value, rtol=1e-4, atol=1e-5, msg=name)


def _l1(family, x):
    return float((family.reconstruct(x) - x).abs().mean())


def test_short_run_lowers_reconstruction_error(vq_run):
    from genkit.data import build_dataset
    from genkit.runs import run_recipe

    family = genkit.load(vq_run)
    x = torch.stack([build_dataset(run_recipe(vq_run).data, "test")[i]["image"] for i in range(64)])
    assert _l1(family, x) < 0.6 * _l1(tiny_vqgan(ema=True), x)
    logs = [json.loads(line) for line in (vq_run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logs if "l1" in r]
    assert logged[-1]["l1"] < logged[0]["l1"]
    assert "d_loss" in logged[-1] and "d_loss" not in logged[0]  # disc_start = 10
    assert all(0 < r["usage"] <= 1 and 1 <= r["perplexity"] <= 16 for r in logged)
    assert (vq_run / "samples" / "step-40.png").exists()  # reconstructions grid


def test_eval_recon_cli(vq_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GENKIT_WEIGHTS_DIR", str(tmp_path))
    out = tmp_path / "recon.json"
    assert main(["eval", "recon", str(vq_run), "--n", "100", "--out", str(out), "--json"]) == 0
    r = json.loads(out.read_text())
    assert r["n"] == 100 and r["data"].endswith("config.yaml:test")
    assert 10 < r["psnr"] < 60 and r["rfd_digits"] >= 0 and 0 < r["codebook_usage"] <= 1
    assert r["lpips"] is None and "16 px" in r["lpips_skipped"]  # 8 px images
    assert 1 <= r["codebook_perplexity"] <= 16 and r["protocol"]["features"] == "digits"


def test_psnr_of_uint8_images():
    from genkit.eval.recon import psnr_uint8

    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    y = x.clone()
    y[0] += 10  # MSE 100 -> 10 log10(255^2 / 100)
    y[1, 0, 0, 0] = 16  # MSE 16 / 16 = 16
    torch.testing.assert_close(psnr_uint8(x, y), torch.tensor([10 * math.log10(255 ** 2 / 100),
                                                              10 * math.log10(255 ** 2 / 16)], dtype=torch.float64))


# ---------------------------------------------------------------- recipes and the photos source


@pytest.mark.parametrize("name", ["vqgan_digits", "ar_prior_digits", "vqgan_photos", "ar_prior_photos",
                                  "vqgan_cifar", "ar_prior_cifar"])
def test_shipped_two_stage_recipes_load(name):
    from genkit.runs import load_recipe

    recipe = load_recipe(name)
    from genkit.families.vqgan import check_config

    assert recipe.model.family == ("vqgan" if name.startswith("vqgan") else "ar_prior")
    if recipe.model.family == "vqgan":
        check_config(recipe.model, recipe.data.image_size)  # f, levels, PatchGAN depth fit the image size


def test_photos_source_is_fixed_patches_with_a_held_out_photograph():
    from types import SimpleNamespace

    from genkit.data import build_dataset
    from genkit.data.photos import patches

    cfg = SimpleNamespace(source="photos", image_size=32, channels=None)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert train.channels == 3 and train.image_size == 32 and train.num_classes == 0
    assert len(test) == 187 and len(train) > 1000  # coffee: 200x300 after /2 -> 11 x 17 patches at stride 16
    again = build_dataset(cfg, "test")
    assert torch.equal(test.images, again.images)
    img = torch.arange(2 * 6 * 8, dtype=torch.float32).view(1, 2, 6, 8)
    p = patches(img, 4)  # stride 2: 2 x 3 patches
    assert p.shape == (6, 2, 4, 4) and torch.equal(p[4], img[0, :, 2:6, 2:6])
