"""AR prior: KV-cached decoding equals full recomputation, top-k / top-p filtering, inverse-CDF draws,
the `autoregressive` sampler and its options, the frozen tokenizer, and training lowers the token NLL
below log K; `genkit sample` on a prior run decodes through its tokenizer run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_vqgan import TINY_VQGAN, tiny_vqgan

import genkit
from genkit.cli import main
from genkit.errors import ConfigError, SamplerError
from genkit.families.ar_prior import ArPrior, ArPriorConfig, draw_tokens, filter_logits
from genkit.families.sampling import sample, samplers_for
from genkit.nn.gpt import GPT, GPTConfig
from genkit.runs import build_family, recipe_from_dict
from genkit.samplers import SAMPLERS

TINY_GPT = GPTConfig(layers=2, heads=2, dim=16)


def tiny_prior(conditional: bool = False, seed: int = 0) -> ArPrior:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = ArPriorConfig(tokenizer="unused", conditional=conditional, gpt=TINY_GPT)
        return ArPrior(cfg, (1, 8, 8), num_classes=10, tokenizer=tiny_vqgan())


# ---------------------------------------------------------------- transformer and KV cache


def test_kv_cache_forward_equals_full_recomputation():
    torch.manual_seed(0)
    gpt = GPT(TINY_GPT, vocab_in=20, vocab_out=16, max_len=12).eval()
    idx = torch.randint(0, 20, (3, 12))
    full = gpt(idx)
    cache = gpt.new_cache(3, torch.device("cpu"))
    pieces = [gpt(idx[:, :5], cache)] + [gpt(idx[:, i:i + 1], cache) for i in range(5, 12)]  # prompt, then 1 by 1
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 20
    torch.testing.assert_close(gpt(changed)[:, :-1], full[:, :-1])  # causal: the past ignores the future


@pytest.mark.parametrize("options", [{}, {"top_k": 5, "temperature": 0.8}, {"top_p": 0.7}])
def test_kv_cached_sampling_draws_exactly_the_same_tokens(options):
    prior = tiny_prior(conditional=True)
    prior.nets.eval()
    u = torch.rand(6, prior.T, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(6) % 10
    s_cache, l_cache = prior.sample_tokens(labels, u, kv_cache=True, **options)
    s_full, l_full = prior.sample_tokens(labels, u, kv_cache=False, **options)
    assert torch.equal(s_cache, s_full)
    torch.testing.assert_close(l_cache, l_full, rtol=1e-5, atol=1e-5)
    assert s_cache.shape == (6, 16) and int(s_cache.max()) < 16


# ---------------------------------------------------------------- filtering and drawing


def test_top_k_keeps_exactly_the_k_largest_logits():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    kept = filter_logits(logits, top_k=7).isfinite()
    assert (kept.sum(1) == 7).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter(1, logits.topk(7).indices, True))
    assert torch.equal(filter_logits(logits, top_k=50), logits)


def test_filters_work_on_the_last_axis_of_any_batch_shape_and_stop_at_exact_mass():
    """(B, T, V) logits filter as each row does; a set whose mass equals top_p exactly is kept whole, no more."""
    logits = torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(1))
    for options in ({"top_k": 4}, {"top_p": 0.6}, {"top_k": 6, "top_p": 0.5}):
        rows = torch.stack([filter_logits(row, **options) for row in logits])
        assert torch.equal(filter_logits(logits, **options), rows), options
    exact = torch.tensor([0.5, 0.25, 0.125, 0.125]).log().unsqueeze(0)
    assert filter_logits(exact, top_p=0.5).isfinite().tolist() == [[True, False, False, False]]
    assert filter_logits(exact, top_p=0.75).isfinite().tolist() == [[True, True, False, False]]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(0)) * 2
    p = logits.softmax(-1)
    for top_p in (0.1, 0.5, 0.9):
        kept = filter_logits(logits, top_p=top_p).isfinite()
        mass = (p * kept).sum(1)
        smallest_kept = torch.where(kept, p, torch.ones_like(p)).min(1).values
        assert (mass >= top_p - 1e-6).all()                       # reaches the mass
        assert (mass - smallest_kept < top_p).all()                # minimal: without its least likely, it does not
        assert kept.gather(1, p.argmax(1, keepdim=True)).all()     # the mode is always kept
        dropped_max = torch.where(kept, torch.zeros_like(p), p).max(1).values
        assert (dropped_max <= smallest_kept).all()                # a top set: nothing dropped beats anything kept


@pytest.mark.parametrize("logits", [[0.0, 1.0, -1.0, 2.0, float("-inf")], [float("-inf"), 0.0, 1.0, -1.0, 2.0]])
def test_inverse_cdf_draws_follow_the_probabilities(logits):
    logits = torch.tensor([logits])
    n = 10000
    u = (torch.arange(n) + 0.5) / n                              # stratified uniforms
    tokens = draw_tokens(logits.expand(n, -1), u)
    freq = torch.bincount(tokens, minlength=5).float() / n
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=2e-4, rtol=0)
    assert freq[logits[0].isinf()].sum() == 0                    # filtered tokens are never drawn
    # u = 0 and u just below 1 draw the first and the last token of positive probability
    kept = logits[0].isfinite().nonzero().flatten()
    edges = draw_tokens(logits.expand(2, -1), torch.tensor([0.0, 1 - 1e-7]))
    assert edges.tolist() == [int(kept[0]), int(kept[-1])]


def test_low_temperature_is_greedy():
    prior = tiny_prior()
    prior.nets.eval()
    u = torch.rand(3, prior.T, generator=torch.Generator().manual_seed(0))
    s, logits = prior.sample_tokens(None, u, temperature=1e-6)
    assert torch.equal(s, logits.argmax(-1))


# ---------------------------------------------------------------- sampler and family contract


def test_autoregressive_sampler_registered_and_its_options():
    assert SAMPLERS["autoregressive"].fn is None and SAMPLERS["autoregressive"].needs == "autoregressive"
    prior = tiny_prior(conditional=True)
    assert samplers_for(prior) == ["autoregressive"]
    out = sample(prior, 5, generator=torch.Generator().manual_seed(0), batch_size=2, top_k=4, temperature=0.9)
    assert out.images.shape == (5, 1, 8, 8) and out.nfe == 16 and out.sampler == "autoregressive"
    assert -1 <= out.images.min() and out.images.max() <= 1
    again = sample(prior, 5, generator=torch.Generator().manual_seed(0), batch_size=5, top_k=4, temperature=0.9)
    torch.testing.assert_close(out.images, again.images)  # batching does not change the images
    with pytest.raises(SamplerError, match="no option 'eta'"):
        sample(prior, 1, eta=0.5)
    for bad, match in [({"top_p": 0.0}, "top_p"), ({"top_k": 17}, r"top_k: must be in \[1, 16\]"),
                       ({"temperature": 0.0}, "temperature"), ({"labels": [10]}, "class label 10 out of range")]:
        with pytest.raises(SamplerError, match=match):
            sample(prior, 1, **bad)
    with pytest.raises(SamplerError, match="does not fit"):
        sample(prior, 1, sampler="ddim")


def test_class_prefix_changes_the_prediction():
    prior = tiny_prior(conditional=True)
    prior.nets.eval()
    s = torch.randint(0, 16, (2, prior.T))
    a = prior.token_nll(s, torch.tensor([0, 0]))
    b = prior.token_nll(s, torch.tensor([3, 3]))
    assert a != b
    with pytest.raises(SamplerError, match="needs labels"):
        prior.token_nll(s, None)


def test_tokenizer_is_frozen_and_outside_the_trainable_nets():
    prior = tiny_prior()
    tok_params = {id(p) for p in prior.tokenizer.nets.parameters()}
    assert list(prior.nets) == ["gpt"]
    assert not tok_params & {id(p) for group in prior.param_groups().values() for p in group}
    assert not any(p.requires_grad for p in prior.tokenizer.nets.parameters())
    before = {k: v.clone() for k, v in prior.tokenizer.nets.state_dict().items()}
    loss = prior.token_nll(prior.codes(torch.rand(4, 1, 8, 8) * 2 - 1), None)
    loss.backward()
    assert all(p.grad is None for p in prior.tokenizer.nets.parameters())
    assert all(torch.equal(before[k], v) for k, v in prior.tokenizer.nets.state_dict().items())


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.tokenizer: required"):
        build_family(recipe_from_dict({"name": "p", "model": {"family": "ar_prior"}}), (1, 8, 8), 0)
    with pytest.raises(ConfigError, match=f"model.tokenizer: '{tmp_path}' is not a genkit run folder"):
        build_family(recipe_from_dict({"name": "p", "model": {"family": "ar_prior", "tokenizer": str(tmp_path)}}), (1, 8, 8), 0)
    with pytest.raises(ConfigError, match=r"model.tokenizer works on images \(1, 8, 8\)"):
        ArPrior(ArPriorConfig(gpt=TINY_GPT), (1, 16, 16), tokenizer=tiny_vqgan())
    with pytest.raises(ConfigError, match="labelled dataset"):
        ArPrior(ArPriorConfig(conditional=True, gpt=TINY_GPT), (1, 8, 8), tokenizer=tiny_vqgan())


# ---------------------------------------------------------------- two-stage training


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar")
    vq = genkit.train("vqgan_digits", overrides=[*TINY_VQGAN, "train.steps=30", "optim.ae.lr=2e-3"],
                      out=root / "vq")
    prior = genkit.train("ar_prior_digits", out=root / "prior", overrides=[
        f"model.tokenizer={vq}", "data.image_size=8", "data.batch_size=32", "model.gpt.layers=2",
        "model.gpt.dim=32", "model.gpt.heads=2", "model.gpt.dropout=0.0", "train.steps=60",
        "train.warmup=0", "train.log_every=5", "train.sample_every=0", "sample.n=4", "train.ema_decay=null"])
    return vq, prior


def test_prior_nll_drops_below_log_k(runs):
    vq, prior_run = runs
    logs = [json.loads(line) for line in (prior_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    log_k = math.log(16)
    assert losses[0] > 0.9 * log_k                 # starts near a uniform guess
    assert losses[-1] < 0.85 * log_k and losses[-1] < losses[0]
    prior = genkit.load(prior_run)
    from genkit.data import build_dataset
    from genkit.runs import run_recipe

    batch = [build_dataset(run_recipe(prior_run).data, "test")[i] for i in range(64)]
    x, y = torch.stack([b["image"] for b in batch]), torch.stack([b["label"] for b in batch])
    held_out = float(prior.token_nll(prior.codes(x), y))
    assert held_out < log_k                        # the trained prior beats log K on held-out codes
    fresh = ArPrior(prior.cfg, (1, 8, 8), 10, tokenizer=prior.tokenizer)
    assert held_out < float(fresh.token_nll(fresh.codes(x), y))


def test_genkit_sample_cli_decodes_through_the_tokenizer_run(runs, tmp_path, capsys):
    _, prior_run = runs
    out = tmp_path / "grid.png"
    assert main(["sample", str(prior_run), "--n", "4", "--top-k", "8", "--top-p", "0.9",
                 "--temperature", "0.9", "--out", str(out), "--save-npz", str(tmp_path / "s.npz")]) == 0
    assert out.exists() and "sampler autoregressive" in capsys.readouterr().out
    import numpy as np

    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (4, 1, 8, 8) and images.dtype == np.uint8
    assert main(["sample", str(prior_run), "--n", "1", "--top-p", "1.5", "--out", str(out)]) == 2


def test_class_labels_reach_a_conditional_prior_through_sample(monkeypatch):
    """`sample(prior, n, labels=...)` (the CLI's --class) sets each image's class prefix, batch by batch;
    without labels the classes come in turn; an unconditional prior refuses them."""
    prior = tiny_prior(conditional=True)
    seen = []
    draw = prior.sample_tokens
    def recorded(labels, u, **kw):
        seen.append(labels.tolist())
        return draw(labels, u, **kw)

    monkeypatch.setattr(prior, "sample_tokens", recorded)
    sample(prior, 5, generator=torch.Generator().manual_seed(0), batch_size=2, labels=[3])
    assert seen == [[3, 3], [3, 3], [3]]
    seen.clear()
    sample(prior, 3, generator=torch.Generator().manual_seed(0), labels=[7, 1, 2])
    assert seen == [[7, 1, 2]]
    seen.clear()
    sample(prior, 3, generator=torch.Generator().manual_seed(0))
    assert seen == [[0, 1, 2]]
    with pytest.raises(SamplerError, match="is unconditional"):
        sample(tiny_prior(), 2, labels=[3])


def test_train_step_is_the_token_nll_of_the_tokenizers_codes_with_the_class_prefix():
    """Teacher forcing on the frozen tokenizer's codes of the batch, the class as the prefix token: the loss
    stepped on group "model", its bits per token logged beside it."""
    from step_handles import RecordingHandle

    prior = tiny_prior(conditional=True)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    label = torch.tensor([3, 1, 4, 1])
    opt = RecordingHandle()
    logs = prior.train_step({"image": x, "label": label}, 0, opt)
    codes = prior.codes(x)
    [(group, loss)] = opt.steps
    assert group == "model" and torch.equal(logs["loss"], loss.detach()) and opt.draws == []
    torch.testing.assert_close(loss, prior.token_nll(codes, label))
    torch.testing.assert_close(logs["bits_per_token"], loss.detach() / math.log(2))
    assert not torch.allclose(loss, prior.token_nll(codes, torch.tensor([0, 0, 0, 0])))


def test_sampling_options_accept_their_whole_range_and_refuse_the_rest():
    from genkit.families.ar_prior import check_sampling

    for ok in ({"top_k": 1}, {"top_k": 16}, {"top_p": 1.0}, {"top_p": 1e-6}, {"temperature": 1e-3}):
        check_sampling(**{"temperature": 1.0, "top_k": None, "top_p": None, **ok}, vocab=16)
    for bad, msg in (({"top_k": 0}, r"top_k: must be in \[1, 16\] \(the codebook size\), got 0"),
                     ({"top_k": 17}, r"top_k: must be in \[1, 16\] \(the codebook size\), got 17"),
                     ({"top_p": 0.0}, r"top_p: must be in \(0, 1\], got 0.0"),
                     ({"top_p": 1.5}, r"top_p: must be in \(0, 1\], got 1.5"),
                     ({"temperature": 0.0}, "temperature: must be > 0, got 0.0")):
        with pytest.raises(SamplerError, match=f"^{msg}$"):
            check_sampling(**{"temperature": 1.0, "top_k": None, "top_p": None, **bad}, vocab=16)


def test_autoregressive_passes_its_sampling_options_to_every_token():
    """top_k = 1, a tiny top_p and a tiny temperature are all greedy decoding (the same tokens from any seed);
    the default temperature is 1; an unconditional prior samples without labels."""
    prior = tiny_prior(conditional=True)

    def draw(seed, **options):
        return prior.autoregressive(3, generator=torch.Generator().manual_seed(seed), **options)[0]

    greedy = draw(0, top_k=1)
    for seed, options in ((1, {"top_k": 1}), (2, {"top_p": 1e-6}), (3, {"temperature": 1e-6})):
        assert torch.equal(draw(seed, **options), greedy), options
    default = draw(0)
    assert torch.equal(default, draw(0, temperature=1.0)) and not torch.equal(default, greedy)
    assert not torch.equal(default, draw(0, temperature=3.0))
    assert torch.equal(default, draw(0, kv_cache=False))   # the cache only saves work
    images, passes = tiny_prior().autoregressive(2, generator=torch.Generator().manual_seed(0), batch_size=1)
    assert images.shape == (2, 1, 8, 8) and passes == prior.T


def test_prefix_tokens_follow_the_codes_and_bad_settings_are_refused():
    """Inputs are codes 0..K-1, then one prefix token per class (K + c), or the start token K."""
    prior = tiny_prior(conditional=True)
    K = prior.K
    assert prior.prefix(torch.tensor([0, 3, 9]), 3, torch.device("cpu")).tolist() == [[K], [K + 3], [K + 9]]
    assert tiny_prior().prefix(None, 2, torch.device("cpu")).tolist() == [[K], [K]]
    assert prior.nets["gpt"].tok.num_embeddings == K + 10 and tiny_prior().nets["gpt"].tok.num_embeddings == K + 1
    assert prior.sample_shape == (1, 8, 8)
    with pytest.raises(SamplerError, match=r"^a conditional prior needs labels in \[0, num_classes\) for every image$"):
        prior.prefix(torch.tensor([1, -1]), 2, torch.device("cpu"))
    one_class = ArPrior(ArPriorConfig(tokenizer="unused", conditional=True, gpt=TINY_GPT), (1, 8, 8), num_classes=1,
                        tokenizer=tiny_vqgan())
    assert one_class.num_classes == 1
    with pytest.raises(ConfigError,
                       match=r"^model.conditional=true needs a labelled dataset \(this one has no classes\)$"):
        ArPrior(ArPriorConfig(tokenizer="unused", conditional=True, gpt=TINY_GPT), (1, 8, 8), tokenizer=tiny_vqgan())
    with pytest.raises(ConfigError, match="^model.gpt.dim=18 is not divisible by model.gpt.heads=4$"):
        ArPrior(ArPriorConfig(tokenizer="unused", gpt=GPTConfig(layers=1, heads=4, dim=18)), (1, 8, 8),
                tokenizer=tiny_vqgan())
