"""Feature extractors: protocol parity with torch-fidelity and pytorch-fid, offline weights, digits CNN."""

from __future__ import annotations

import hashlib
import json
import math
import socket
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import run_cli
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


def clean_fid_reference_extractor(state: dict[str, torch.Tensor]):
    """clean-fid's own "clean" feature extractor (its InceptionV3W wrapper and normalisation) with its TorchScript
    file, which cannot be fetched here, replaced by the TF Inception network on the same state dict."""
    from cleanfid import features as cf
    from cleanfid import inception_torchscript as cts
    from pytorch_fid import inception as pfi

    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state):
        net = pfi.InceptionV3([3], resize_input=False, normalize_input=False, use_fid_inception=True)
    scripted = nn.Module()
    scripted.layers = nn.Sequential(*net.blocks)  # what InceptionV3W calls on (x - 128) / 128 at 299 px
    with mock.patch.object(cts, "check_download_inception", lambda fpath: None), \
            mock.patch.object(cts.torch.jit, "load", lambda path: scripted):
        return cf.build_feature_extractor("clean", device=torch.device("cpu"), use_dataparallel=False)


def test_clean_fid_protocol_equals_clean_fid(random_inception, tmp_path):
    pytest.importorskip("cleanfid")
    from cleanfid import fid
    from PIL import Image

    _, state, sha = random_inception
    ours = ft.build_features("inception", protocol="clean-fid")
    images = torch.randint(0, 256, (3, 3, 20, 28), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    (tmp_path / "imgs").mkdir()
    for i, image in enumerate(images):  # PNG is lossless: clean-fid reads back these exact uint8 values
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "imgs" / f"{i}.png")
    expected = fid.get_folder_features(str(tmp_path / "imgs"), clean_fid_reference_extractor(state), num_workers=0,
                                       batch_size=3, device=torch.device("cpu"), mode="clean", verbose=False)
    got = ours(images)
    assert got.shape == (3, 2048) and ours.weights_sha256 == sha and not ours.has_logits
    assert ours.protocol_dict()["protocol"] == "clean-fid" and "PIL" in ours.protocol_dict()["resize"]
    assert got.std() > 1e-3
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
    assert (ours(images) - ft.build_features("inception", protocol="tf")(images)).abs().max() > 1e-3 * got.abs().max()
    assert torch.equal(ours(images[:, :1]), ours(images[:, :1].expand(-1, 3, -1, -1)))


def test_clean_fid_runs_the_tf_protocols_network(random_inception):
    """At 299 px both resizes are identities: what remains, the network, is the `tf` protocol's, bit for bit."""
    pytest.importorskip("cleanfid")
    images = uint8_images(2, size=299, seed=6)
    clean, tf = (ft.build_features("inception", protocol=p) for p in ("clean-fid", "tf"))
    assert torch.equal(clean(images), tf(images))


def test_clean_fid_statistics_files_are_compared_under_the_clean_fid_protocol(random_inception, tmp_path):
    """A `clean-fid:` statistics file (mu, sigma only) meets the clean-fid extractor, and only it."""
    pytest.importorskip("cleanfid")
    from genkit.eval import engine

    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    s = engine.EvalSettings(protocol="clean-fid")
    clean = ft.build_features("inception", protocol="clean-fid")
    stats = engine.reference_stats(f"clean-fid:{tmp_path / 'ref.npz'}", clean, s)
    assert stats.protocol["protocol"] == "clean-fid" and stats.mu.shape == (2048,)
    with pytest.raises(GenkitError, match="different protocols: protocol 'clean-fid' vs 'tf'"):
        engine.reference_stats(f"clean-fid:{tmp_path / 'ref.npz'}", ft.build_features("inception"), s)


def test_clean_fid_without_the_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanfid", None)  # an import of cleanfid now fails
    monkeypatch.setitem(sys.modules, "cleanfid.resize", None)
    with pytest.raises(GenkitError, match=r"needs the clean-fid package \(pip install clean-fid\)"):
        ft.build_features("inception", protocol="clean-fid")


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
    with pytest.raises(GenkitError, match="known: inception, clip, dinov2, digits, cmmd"):
        ft.build_features("incepton")
    with pytest.raises(GenkitError, match="known: tf, pytorch-fid, clean-fid"):
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
    torch.save(official_dinov2_state(source), tmp_path / "dinov2_vitl14_pretrain.pth")
    monkeypatch.setenv("GENKIT_WEIGHTS_DIR", str(tmp_path))
    extractor = ft.build_features("dinov2")  # FD-DINOv2's ViT-L/14 by default
    images = uint8_images(2, size=30, seed=4)
    feats = extractor(images)
    assert feats.shape == (2, 32) and extractor.protocol_dict()["protocol"] == "vitl14"
    assert torch.equal(extractor.model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert extractor.model.pos_embed.shape == (1, 1 + 16 * 16, 32)


# --- FD-DINOv2: dgm-eval's preprocessing and the official position-embedding interpolation -------

def random_vit(img_size: int, seed: int = 2) -> nn.Module:
    """tiny_vit with every parameter drawn at O(1) scale: layer scale and position embeddings included,
    so that the CLS token depends on the image and on how the position grid is interpolated."""
    model = tiny_vit(img_size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def official_pos_embed_at_224(pos_embed: torch.Tensor) -> torch.Tensor:
    """facebookresearch/dinov2's `interpolate_pos_encoding` for a 224 x 224 input, written out."""
    n = pos_embed.shape[1] - 1
    side, dim = int(math.sqrt(n)), pos_embed.shape[2]
    w0 = h0 = 224 // 14 + 0.1
    patch = torch.nn.functional.interpolate(
        pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / side, h0 / side), mode="bicubic", antialias=False)
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def dgm_eval_transform(image: torch.Tensor) -> torch.Tensor:
    """dgm-eval's DINOv2Encoder.transform (clean_resize=False) on the PIL image a uint8 (3, H, W) tensor makes."""
    from PIL import Image
    from torchvision import transforms as T

    transform = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize(np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))])
    return transform(Image.fromarray(image.permute(1, 2, 0).numpy()).convert("RGB")).float()


@pytest.fixture
def random_dinov2(tmp_path, monkeypatch):
    """A random ViT saved as an official vitl14 checkpoint (518 px grid); timm builds tiny_vit in its place."""
    import timm

    monkeypatch.setattr(timm, "create_model", lambda name, pretrained, img_size, num_classes: tiny_vit(img_size))
    source = random_vit(img_size=518)
    torch.save(official_dinov2_state(source), tmp_path / "dinov2_vitl14_pretrain.pth")
    return source, tmp_path


def test_fd_dinov2_features_equal_dgm_eval_on_timm(random_dinov2):
    source, folder = random_dinov2
    extractor = ft.build_features("dinov2", protocol=ft.FD_DINOV2_PROTOCOL, weights=folder)
    images = torch.randint(0, 256, (3, 3, 30, 50), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    reference = tiny_vit(img_size=224)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["pos_embed"] = official_pos_embed_at_224(source.pos_embed.detach())
    reference.load_state_dict(state)
    with torch.no_grad():
        expected = reference.forward_features(torch.stack([dgm_eval_transform(im) for im in images]))[:, 0]
    got = extractor(images)
    assert got.shape == (3, 32) and (got[0] - got[1]).abs().max() > 1e-2  # the features depend on the image
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grey = images[:, :1]
    assert torch.equal(extractor(grey), extractor(grey.expand(-1, 3, -1, -1)))


def test_dinov2_position_grid_is_interpolated_as_the_official_model_does(random_dinov2):
    """timm's own resampling (by size, antialiased) is not DINOv2's: the two grids differ."""
    from timm.layers import resample_abs_pos_embed

    source, folder = random_dinov2
    extractor = ft.build_features("dinov2", protocol="vitl14", weights=folder)
    official = official_pos_embed_at_224(source.pos_embed.detach())
    torch.testing.assert_close(extractor.model.pos_embed.detach(), official, rtol=0, atol=1e-6)
    timm_grid = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(16, 16), num_prefix_tokens=1)
    assert (timm_grid - official).abs().max() > 1e-2


def test_fd_dinov2_protocol_records_the_preprocessing(random_dinov2):
    _, folder = random_dinov2
    record = ft.build_features("dinov2", protocol=ft.FD_DINOV2_PROTOCOL, weights=folder).protocol_dict()
    assert record["features"] == "dinov2" and record["protocol"] == "vitl14" and record["dim"] == 32
    assert "bicubic (PIL" in record["resize"] and "224x224" in record["resize"]
    assert "ImageNet mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)" in record["normalize"]
    assert record["output"] == "CLS token after the final norm" and "no antialias" in record["pos_embed"]


def test_fd_dinov2_through_the_engine(random_dinov2, tmp_path):
    from genkit.eval import engine

    _, folder = random_dinov2
    real, fake = (tmp_path / "real.npz", tmp_path / "fake.npz")
    np.savez(real, images=uint8_images(40, size=16, seed=8).numpy())
    np.savez(fake, images=uint8_images(40, size=16, seed=9).numpy())
    s = engine.EvalSettings(features="dinov2", protocol=ft.FD_DINOV2_PROTOCOL, weights=str(folder), batch_size=4)
    out = engine.compute_fid(str(real), str(fake), s)
    assert out["fd_dinov2"] == out["value"] > 0 and out["protocol"]["protocol"] == "vitl14"
    assert out["protocol"]["output"] == "CLS token after the final norm"
    assert engine.compute_fid(str(real), str(real), s)["value"] == pytest.approx(0, abs=1e-6)


# --- CMMD: google-research/cmmd's preprocessing on a tiny open_clip model -----------------------

def test_cmmd_features_equal_the_reference_preprocessing(tiny_clip):
    from PIL import Image

    model, path = tiny_clip
    extractor = ft.build_features("cmmd", protocol="genkit-tiny", weights=path)
    images = torch.randint(0, 256, (3, 3, 40, 56), generator=torch.Generator().manual_seed(10), dtype=torch.uint8)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # scenic's CLIP IMAGE_MEAN, _STD
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    prepared = []
    for image in images:  # io_util._center_crop_and_resize: the centred 40 x 40 square, PIL bicubic to 32
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        pil = pil.crop((8, 0, 48, 40)).resize((32, 32), resample=Image.BICUBIC)
        prepared.append(torch.from_numpy(np.asarray(pil).astype(np.float32)).permute(2, 0, 1) / 255.0)
    with torch.no_grad():
        embedding = model.encode_image((torch.stack(prepared) - mean) / std)
    expected = embedding / embedding.norm(dim=-1, keepdim=True)
    got = extractor(images)
    assert got.shape == (3, 16) and extractor.weights_sha256 == sha256_file(path)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))


def test_cmmd_protocol_records_the_preprocessing(tiny_clip):
    _, path = tiny_clip
    record = ft.build_features("cmmd", protocol="genkit-tiny", weights=path).protocol_dict()
    assert record["features"] == "cmmd" and record["protocol"] == "genkit-tiny" and record["dim"] == 16
    assert record["resize"].startswith("centre crop to a square, then bicubic (PIL") and "32x32" in record["resize"]
    assert "CLIP mean (0.48145466, 0.4578275, 0.40821073)" in record["normalize"]
    assert record["output"] == "image embedding, L2-normalised"


def test_cmmd_features_need_local_weights_and_default_to_the_papers_model(tmp_path):
    with pytest.raises(GenkitError, match="--features cmmd needs --weights: local-dir:FOLDER") as err:
        ft.build_features("cmmd")
    assert ft.CMMD_MODEL in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "clip.safetensors").write_bytes(b"")
    with mock.patch("open_clip.create_model", side_effect=AssertionError("stop")) as create, \
            pytest.raises(AssertionError, match="stop"):
        ft.build_features("cmmd", weights=tmp_path / "clip.safetensors")
    assert create.call_args.args[0] == "ViT-L-14-336-quickgelu"  # OpenAI's ViT-L/14@336px uses QuickGELU


# --- fd-dinov2 and cmmd as `genkit eval` commands ----------------------------------------------

def test_genkit_eval_fd_dinov2_defaults_to_vitl14(random_dinov2, tmp_path):
    from genkit.eval import engine

    _, folder = random_dinov2
    real, fake = (tmp_path / "real.npz", tmp_path / "fake.npz")
    np.savez(real, images=uint8_images(30, size=16, seed=8).numpy())
    np.savez(fake, images=uint8_images(30, size=16, seed=9).numpy())
    r = run_cli("eval", "fd-dinov2", "--real", str(real), "--fake", str(fake), "--weights", str(folder),
                "--batch-size", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["metric"] == "fd-dinov2" and out["protocol"]["features"] == "dinov2"
    assert out["protocol"]["protocol"] == "vitl14" and out["fd_dinov2"] == out["value"] > 0
    # the value of fid with the dinov2 extractor named; two statistics files need no weights
    s = engine.EvalSettings(features="dinov2", protocol="vitl14", weights=str(folder), batch_size=8)
    assert engine.compute_fid(str(real), str(fake), s)["fd_dinov2"] == pytest.approx(out["value"], rel=1e-12)
    for spec, name in ((real, "a"), (fake, "b")):
        r = run_cli("eval", "stats", str(spec), "--features", "dinov2", "--weights", str(folder), "--out",
                    str(tmp_path / f"{name}.npz"))
        assert r.returncode == 0, r.stderr
    r = run_cli("eval", "fd-dinov2", "--real", str(tmp_path / "a.npz"), "--fake", str(tmp_path / "b.npz"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["value"] == pytest.approx(out["value"], rel=1e-6)


def test_genkit_eval_fd_dinov2_refuses_other_features_and_statistics(tmp_path):
    from genkit.eval.stats import RefStats, save_stats

    r = run_cli("eval", "fd-dinov2", "--real", "recipe:ddpm_digits", "--fake", "recipe:ddpm_digits",
                "--features", "inception")
    assert r.returncode == 2 and "FD-DINOv2 is the Frechet distance on DINOv2 features" in r.stderr
    for name in ("a", "b"):
        save_stats(tmp_path / f"{name}.npz", RefStats(np.zeros(4), np.eye(4), 10, {"features": "digits", "dim": 4}))
    r = run_cli("eval", "fd-dinov2", "--real", str(tmp_path / "a.npz"), "--fake", str(tmp_path / "b.npz"))
    assert r.returncode == 2 and "hold digits statistics, FD-DINOv2 needs DINOv2 ones" in r.stderr


def test_genkit_eval_cmmd(tiny_clip, tmp_path):
    from genkit.eval.cmmd import cmmd

    _, path = tiny_clip
    real, fake = (tmp_path / "real.npz", tmp_path / "fake.npz")
    np.savez(real, images=uint8_images(12, size=20, seed=1).numpy())
    np.savez(fake, images=(uint8_images(10, size=20, seed=2) // 2).numpy())
    r = run_cli("eval", "cmmd", "--real", str(real), "--fake", str(fake), "--protocol", "genkit-tiny", "--weights",
                str(path), "--batch-size", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    extractor = ft.build_features("cmmd", protocol="genkit-tiny", weights=path)
    with np.load(real) as a, np.load(fake) as b:
        want = cmmd(extractor(torch.from_numpy(a["images"])), extractor(torch.from_numpy(b["images"])))
    assert out["metric"] == "cmmd" and out["protocol"]["features"] == "cmmd"
    assert out["cmmd"] == pytest.approx(want, rel=1e-9) and want > 0
