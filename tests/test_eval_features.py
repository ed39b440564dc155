"""Feature extractors: protocol parity with torch-fidelity and pytorch-fid, offline weights, digits CNN."""

from __future__ import annotations

import hashlib
import json
import math
import socket
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from genkit.errors import GenkitError
from genkit.eval import features as ft
from genkit.eval.digits_classifier import digits_split
from genkit.eval.frechet import frechet_distance
from genkit.weights import resolve_weights, sha256_file


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No socket may connect, and no real weights folder or cache is visible."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("GENKIT_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def uint8_images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


# --- Inception: parity with torch-fidelity and pytorch-fid on one random state dict --------------

def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """torch-fidelity's InceptionV3 (same keys as pytorch-fid's) with random He-scaled weights and BN."""
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    with mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None), \
            mock.patch.object(tfi, "load_state_dict_from_url", lambda *args, **kwargs: None):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("conv.weight") or key == "fc.weight":
            value = torch.randn(value.shape, generator=g) * math.sqrt(2 / value[0].numel())  # keeps O(1) scale
        elif key.endswith(("bn.weight", "bn.running_var")):
            value = 0.5 + torch.rand(value.shape, generator=g)
        elif key.endswith(("bn.bias", "bn.running_mean", "fc.bias")):
            value = 0.1 * torch.randn(value.shape, generator=g)
        state[key] = value.clone()
    return state


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
    """One random state dict saved under both canonical names; returns (folder, state, sha256)."""
    folder = tmp_path_factory.mktemp("weights")
    state = random_inception_state()
    torch.save(state, folder / ft.INCEPTION_FILES["tf"])
    (folder / ft.INCEPTION_FILES["pytorch-fid"]).write_bytes((folder / ft.INCEPTION_FILES["tf"]).read_bytes())
    return folder, state, sha256_file(folder / ft.INCEPTION_FILES["tf"])


@pytest.fixture
def random_inception(inception_dir, monkeypatch):
    folder, state, sha = inception_dir
    monkeypatch.setenv("GENKIT_WEIGHTS_DIR", str(folder))
    monkeypatch.setattr(ft, "INCEPTION_SHA256_PREFIX", sha[:8])  # the random file's own prefix
    return folder, state, sha


def test_tf_protocol_equals_torch_fidelity_exactly(random_inception):
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    folder, _, sha = random_inception
    ours = ft.build_features("inception", protocol="tf")
    ref = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(folder / ft.INCEPTION_FILES["tf"]))
    images = uint8_images(2)
    pool, logits = ref(images)
    assert ours.dim == 2048 and ours.weights_sha256 == sha and ours.protocol_dict()["protocol"] == "tf"
    assert pool.std() > 1e-3  # the random network does not collapse to constants
    assert torch.equal(ours(images), pool) and torch.equal(ours.logits(images), logits)
    grey = images[:, :1]
    assert torch.equal(ours(grey), ref(grey.expand(-1, 3, -1, -1))[0])


def test_pytorch_fid_protocol_equals_pytorch_fid(random_inception):
    from pytorch_fid import inception as pfi

    _, state, _ = random_inception
    ours = ft.build_features("inception", protocol="pytorch-fid")
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state):
        ref = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    images = uint8_images(2, size=24, seed=1)
    with torch.no_grad():
        expected = ref(images.float() / 255)[0].squeeze(-1).squeeze(-1)
    got = ours(images)
    assert got.shape == (2, 2048) and got.dtype == torch.float32 and not ours.has_logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    tf = ft.build_features("inception", protocol="tf")(images)
    assert (tf - got).abs().max() > 1e-3 * got.abs().max()  # the resize is part of the protocol


# --- weights: missing, wrong hash, search order -------------------------------------------------

def test_missing_inception_weights_name_file_hash_and_where_to_put_it():
    for protocol in ("tf", "pytorch-fid"):
        with pytest.raises(GenkitError) as err:
            ft.build_features("inception", protocol=protocol)
        message = str(err.value)
        assert ft.INCEPTION_FILES[protocol] in message and "6726825d" in message
        assert "GENKIT_WEIGHTS_DIR" in message and "--weights" in message and "\n" not in message


def test_wrong_hash_is_refused_before_torch_load(tmp_path, monkeypatch):
    (tmp_path / ft.INCEPTION_FILES["tf"]).write_bytes(b"not the inception weights")
    monkeypatch.setenv("GENKIT_WEIGHTS_DIR", str(tmp_path))

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load called on an unverified file")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(GenkitError, match="expected one starting with 6726825d") as err:
        ft.build_features("inception")
    assert sha256_file(tmp_path / ft.INCEPTION_FILES["tf"]) in str(err.value)


def test_resolve_order_explicit_then_env_then_hub_then_cache(tmp_path, monkeypatch):
    name = "w.pth"
    places = {key: tmp_path / key for key in ("explicit", "env", "hub/checkpoints", "xdg/genkit")}
    for folder in places.values():
        folder.mkdir(parents=True)
        (folder / name).write_bytes(folder.name.encode())
    monkeypatch.setenv("GENKIT_WEIGHTS_DIR", str(places["env"]))
    assert resolve_weights(name, places["explicit"]) == places["explicit"] / name  # a folder
    assert resolve_weights(name, places["explicit"] / name) == places["explicit"] / name  # a file
    assert resolve_weights(name) == places["env"] / name
    monkeypatch.delenv("GENKIT_WEIGHTS_DIR")
    assert resolve_weights(name) == places["hub/checkpoints"] / name
    (places["hub/checkpoints"] / name).unlink()
    assert resolve_weights(name) == places["xdg/genkit"] / name
    with pytest.raises(GenkitError, match="neither a file nor a folder"):
        resolve_weights(name, tmp_path / "nowhere")


def test_hash_prefix_in_the_name_is_checked(tmp_path):
    data = b"weights"
    good = tmp_path / f"w-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    good.write_bytes(data)
    assert resolve_weights(good.name, tmp_path) == good
    bad = tmp_path / "w-00000000.pth"
    bad.write_bytes(data)
    with pytest.raises(GenkitError, match="w-00000000.pth"):
        resolve_weights(bad.name, tmp_path)


def test_unknown_extractor_and_protocol_list_the_known_ones():
    with pytest.raises(GenkitError, match="known: inception, clip, dinov2, digits"):
        ft.build_features("incepton")
    with pytest.raises(GenkitError, match="known: tf, pytorch-fid"):
        ft.build_features("inception", protocol="clean")


def test_float_images_are_refused(digits):
    extractor, images, _ = digits
    with pytest.raises(GenkitError, match="uint8"):
        extractor(images.float() / 127.5 - 1)


# --- digits: the shipped classifier -------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    extractor = ft.build_features("digits")
    images, labels = digits_split("test")
    return extractor, images, labels


def test_shipped_digits_weights_match_their_json():
    record = json.loads((ft.ASSETS / ft.DIGITS_JSON).read_text())
    assert sha256_file(ft.ASSETS / record["file"]) == record["sha256"]
    assert record["file"] == f"digits_classifier-{record['sha256'][:8]}.safetensors"
    assert ft.build_features("digits").weights_sha256 == record["sha256"]


def test_tampered_digits_weights_are_refused(tmp_path):
    record = json.loads((ft.ASSETS / ft.DIGITS_JSON).read_text())
    (tmp_path / ft.DIGITS_JSON).write_text(json.dumps(record))
    data = bytearray((ft.ASSETS / record["file"]).read_bytes())
    data[-1] ^= 1
    (tmp_path / record["file"]).write_bytes(bytes(data))
    with pytest.raises(GenkitError, match="SHA-256"):
        ft.shipped_digits_weights(tmp_path)


def test_digits_accuracy_on_held_out_split_matches_json(digits):
    extractor, images, labels = digits
    accuracy = (extractor.logits(images).argmax(1) == labels).double().mean().item()
    record = json.loads((ft.ASSETS / ft.DIGITS_JSON).read_text())
    assert len(images) == record["test_images"] == 297
    assert accuracy >= record["test_accuracy"] - 0.005 and accuracy >= 0.97


def test_digits_features_dim_determinism_and_batch_invariance(digits):
    extractor, images, _ = digits
    whole = extractor(images)
    assert whole.shape == (len(images), extractor.dim) == (297, 64) and whole.dtype == torch.float32
    assert torch.equal(whole, extractor(images))
    pieces = torch.cat([extractor(images[i:i + 7]) for i in range(0, len(images), 7)])
    assert (pieces - whole).abs().max() < 1e-5
    delta = torch.minimum(images, 255 - images)  # RGB (g - d, g, g + d) averages to grey g
    rgb = torch.cat([images - delta, images, images + delta], 1)
    assert torch.allclose(extractor(rgb), whole, atol=1e-5)
    big = nn.functional.interpolate(images.float(), size=(40, 40), mode="nearest").to(torch.uint8)
    assert extractor(big).shape == whole.shape  # any size is resized to 16x16


def test_digits_features_separate_classes(digits):
    extractor, images, labels = digits
    feats = extractor(images).double()
    means = torch.stack([feats[labels == c].mean(0) for c in range(10)])  # (10, 64)
    spread = torch.stack([(feats[labels == c] - means[c]).pow(2).sum(1).mean().sqrt() for c in range(10)])
    gaps = torch.cdist(means, means)  # (10, 10)
    nearest = (gaps + torch.eye(10) * 1e9).min(1).values
    assert (nearest > 1.0 * spread).all(), (nearest, spread)  # every class mean is far from the others
    assert gaps[0, 1] > 2 * max(spread[0], spread[1])


def test_digits_fd_is_small_within_the_data_and_large_against_noise(digits):
    extractor, test_images, _ = digits
    train_images, _ = digits_split("train")
    noise = torch.randint(0, 256, (300, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)

    def gaussian(images):
        feats = extractor(images).double().numpy()
        return feats.mean(0), np.cov(feats, rowvar=False)

    train = gaussian(train_images)
    assert 10 * frechet_distance(*train, *gaussian(test_images)) < frechet_distance(*train, *gaussian(noise))


# --- CLIP: a tiny open_clip model from a local file and from local-dir: ------------------------

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


@pytest.fixture
def tiny_clip(tmp_path, monkeypatch):
    """A random tiny CLIP registered as 'genkit-tiny', its weights saved as safetensors."""
    import open_clip
    from open_clip import factory

    monkeypatch.setitem(factory._MODEL_CONFIGS, "genkit-tiny", TINY_CLIP)
    torch.manual_seed(0)
    model = open_clip.create_model("genkit-tiny").eval()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_clip_from_local_file_matches_open_clip(tiny_clip):
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    model, path = tiny_clip
    extractor = ft.build_features("clip", protocol="genkit-tiny", weights=path)
    images = uint8_images(3, size=32, seed=2)  # the model's size: resize and crop are identities
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    with torch.no_grad():
        expected = model.encode_image((images.float() / 255 - mean) / std)
    got = extractor(images)
    assert got.shape == (3, extractor.dim) == (3, 16) and extractor.weights_sha256 == sha256_file(path)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert extractor(uint8_images(2, channels=1, size=48)).shape == (2, 16)


def test_clip_from_local_dir_equals_file(tiny_clip, tmp_path):
    _, path = tiny_clip
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    (folder / "open_clip_model.safetensors").write_bytes(path.read_bytes())
    images = uint8_images(2, size=40, seed=3)
    from_dir = ft.build_features("clip", weights=f"local-dir:{folder}")
    from_file = ft.build_features("clip", protocol="genkit-tiny", weights=path)
    assert torch.equal(from_dir(images), from_file(images))
    with pytest.raises(GenkitError, match="--protocol MODEL"):
        ft.build_features("clip", weights=path)


# --- DINOv2: the official checkpoint format through timm ----------------------------------------

def tiny_vit(img_size: int = 224) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    return VisionTransformer(img_size=img_size, patch_size=14, embed_dim=32, depth=1, num_heads=2,
                             init_values=1e-5, num_classes=0).eval()


def official_dinov2_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm ViT's weights in the official DINOv2 format (518 px grid, with the unused mask_token)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    return state


def test_dinov2_official_keys_load_into_timm():
    source = tiny_vit(img_size=518)
    target = tiny_vit(img_size=518)
    nn.init.normal_(target.cls_token)  # make sure loading overwrites
    ft.load_dinov2_weights(target, official_dinov2_state(source))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(GenkitError, match="not an official DINOv2 checkpoint"):
        ft.load_dinov2_weights(target, source.state_dict())


def test_dinov2_builds_from_local_file_at_224(tmp_path, monkeypatch):
    import timm

    monkeypatch.setattr(timm, "create_model", lambda name, pretrained, img_size, num_classes: tiny_vit(img_size))
    source = tiny_vit(img_size=518)  # the official files are trained at 518 px: pos_embed is resampled
    torch.save(official_dinov2_state(source), tmp_path / "dinov2_vitb14_pretrain.pth")
    monkeypatch.setenv("GENKIT_WEIGHTS_DIR", str(tmp_path))
    extractor = ft.build_features("dinov2")
    images = uint8_images(2, size=30, seed=4)
    feats = extractor(images)
    assert feats.shape == (2, 32) and extractor.protocol_dict()["protocol"] == "vitb14"
    assert torch.equal(extractor.model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert extractor.model.pos_embed.shape == (1, 1 + 16 * 16, 32)
