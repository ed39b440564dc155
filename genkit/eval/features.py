"""Feature extractors for FD, KID, IS and PRDC: uint8 images in, (B, dim) float32 features out.

    FEATURES = {"inception": ..., "clip": ..., "dinov2": ..., "digits": ...}
    extractor = build_features("inception", protocol="tf")   # weights resolved offline

Every extractor takes uint8 images (B, C, H, W), C in {1, 3} (grey repeated to RGB for RGB
networks), any H and W, and records what produced its features (`protocol_dict()`): name,
protocol, dim, the weights' SHA-256 and the resize method. Weights never download: they resolve
from `--weights`, $GENKIT_WEIGHTS_DIR, the torch hub cache or ~/.cache/genkit
(`genkit.weights`), and the Inception files are checked by the SHA-256 prefix in their names.

- inception / tf (default): torch-fidelity's TF-ported InceptionV3 (TF1 bilinear resize to 299,
  (x - 128) / 128), pool3 2048-d; `logits` = 'logits_unbiased' (1008) for IS.
- inception / pytorch-fid: pytorch-fid's InceptionV3 (F.interpolate bilinear to 299, x / 255).
- clip: an open_clip image tower; features are the UN-normalised image embeddings
  (`encode_image(normalize=False)`), the FD-CLIP convention of Kynkaanniemi et al. 2023.
- dinov2: timm's port of DINOv2 (Oquab et al. 2023) with the official weights, CLS token at 224 px.
- digits: genkit's small CNN on scikit-learn's digits (`digits_classifier`), shipped in
  genkit/assets: FD, IS and class accuracy on the embedded default with nothing to download.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch
from torch import Tensor, nn

from genkit.errors import GenkitError
from genkit.eval.digits_classifier import METADATA_KEY, DigitsClassifier
from genkit.io import load_tensors, sha256_file
from genkit.weights import load_state_dict, locate_weights

INCEPTION_SHA256_PREFIX = "6726825d"  # tests patch this to accept a random state dict
INCEPTION_FILES = {"tf": "weights-inception-2015-12-05-6726825d.pth",
                   "pytorch-fid": "pt_inception-2015-12-05-6726825d.pth"}
INCEPTION_URLS = {
    "tf": "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILES["tf"],
    "pytorch-fid": "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + INCEPTION_FILES["pytorch-fid"],
}
DINOV2 = {"vits14": "vit_small_patch14_dinov2", "vitb14": "vit_base_patch14_dinov2",
          "vitl14": "vit_large_patch14_dinov2", "vitg14": "vit_giant_patch14_dinov2"}
DINOV2_SIZE = 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DIGITS_JSON = "digits_classifier.json"


class FeatureExtractor(nn.Module):
    """uint8 images (B, C, H, W) -> features (B, dim) float32; frozen, in eval mode."""

    name: str
    protocol: str
    dim: int
    weights_sha256: str | None
    resize: str
    has_logits: bool = False  # a classifier head: `logits` (Inception Score, class accuracy)

    def protocol_dict(self) -> dict[str, Any]:
        """What produced the features; two feature sets compare only when these agree."""
        return {"features": self.name, "protocol": self.protocol, "dim": int(self.dim),
                "weights_sha256": self.weights_sha256, "resize": self.resize}

    def logits(self, images: Tensor) -> Tensor:
        """Class logits of uint8 images; only extractors with `has_logits` have a classifier head."""
        raise GenkitError(f"--features {self.name} has no classifier head: IS needs inception or digits")

    def freeze(self) -> "FeatureExtractor":
        """Eval mode, no gradients."""
        self.requires_grad_(False)
        return self.eval()


def check_images(images: Tensor, rgb: bool = True) -> Tensor:
    """Refuse anything but uint8 (B, 1|3, H, W); repeat grey to 3 channels when `rgb`."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise GenkitError(f"feature extractors take uint8 images (B, 1|3, H, W), got {images.dtype} "
                          f"{tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if rgb and images.shape[1] == 1 else images


def _check_protocol(name: str, protocol: str | None, known: list[str]) -> str:
    """The protocol asked for (default: the first known one), refused unless known."""
    protocol = protocol or known[0]
    if protocol not in known:
        raise GenkitError(f"--features {name}: unknown protocol {protocol!r}; known: {', '.join(known)}")
    return protocol


def _locate(filename: str, weights: str | Path | None, prefix: str | None = None,
            url: str | None = None) -> tuple[Path, str]:
    """`weights` as a path (file or folder), or as a bare file name searched like `filename`.

    A file the user names is only hashed: no hash is expected from its name unless `prefix` is given.
    """
    if weights is not None and not Path(weights).expanduser().exists() and Path(weights).name == str(weights):
        filename, weights = str(weights), None  # a bare name: search $GENKIT_WEIGHTS_DIR and the caches
        prefix = "" if prefix is None else prefix
    return locate_weights(filename, weights, prefix, url)


def _inception_state(protocol: str, weights: str | Path | None) -> tuple[dict[str, Tensor], str]:
    """The protocol's Inception state dict, hash-checked then loaded with weights_only, and its SHA-256."""
    path, sha = _locate(INCEPTION_FILES[protocol], weights, INCEPTION_SHA256_PREFIX, INCEPTION_URLS[protocol])
    return load_state_dict(path), sha


class InceptionTF(FeatureExtractor):
    """torch-fidelity's InceptionV3 ('inception-v3-compat'): TF1 resize and weights, bit-exact pool3."""

    name, protocol, dim = "inception", "tf", 2048
    has_logits = True
    resize = "bilinear (TF1-compatible, torch-fidelity) to 299x299"

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        from torch_fidelity import feature_extractor_inceptionv3 as tfi

        state, self.weights_sha256 = _inception_state("tf", weights)
        # torch-fidelity torch.loads a given path with weights_only=False; hand it the dict we loaded
        # safely, in place of its downloader.
        with mock.patch.object(tfi, "load_state_dict_from_url", lambda *args, **kwargs: state):
            self.net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
        self.freeze()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features (B, dim) of uint8 images (B, C, H, W)."""
        return self.net(check_images(images))[0]  # (B, 2048) pool3

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """Logits without the fc bias ('logits_unbiased', 1008 classes), as torch-fidelity's IS uses."""
        return self.net(check_images(images))[1]  # (B, 1008)


class InceptionPytorchFID(FeatureExtractor):
    """pytorch-fid's FID InceptionV3: images / 255, F.interpolate bilinear to 299, pool3."""

    name, protocol, dim = "inception", "pytorch-fid", 2048
    resize = "bilinear (pytorch F.interpolate, align_corners=False) to 299x299"

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        from pytorch_fid import inception as pfi

        state, self.weights_sha256 = _inception_state("pytorch-fid", weights)
        with mock.patch.object(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state):
            self.net = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
        self.freeze()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features (B, dim) of uint8 images (B, C, H, W)."""
        x = check_images(images).float() / 255  # pytorch-fid's input range [0, 1]
        return self.net(x)[0].flatten(1)  # (B, 2048, 1, 1) -> (B, 2048)


def build_inception(protocol: str | None = None, weights: str | Path | None = None) -> FeatureExtractor:
    """InceptionV3 pool3 features under the 'tf' (torch-fidelity, default) or 'pytorch-fid' protocol."""
    protocol = _check_protocol("inception", protocol, ["tf", "pytorch-fid"])
    return InceptionTF(weights) if protocol == "tf" else InceptionPytorchFID(weights)


def _resize_crop(x: Tensor, size: int, mode: str, crop: bool) -> Tensor:
    """Float images in [0, 1] -> (size, size): antialiased resize (shortest side + centre crop, or squash)."""
    from torchvision.transforms.v2 import functional as TF

    interpolation = TF.InterpolationMode.BICUBIC if mode == "bicubic" else TF.InterpolationMode.BILINEAR
    x = TF.resize(x, size if crop else [size, size], interpolation=interpolation, antialias=True)
    return TF.center_crop(x, [size, size]).clamp(0, 1) if crop else x.clamp(0, 1)


class ClipFeatures(FeatureExtractor):
    """open_clip image tower: CLIP preprocessing on tensors, un-normalised image embeddings."""

    name = "clip"

    def __init__(self, model: nn.Module, protocol: str, sha256: str, dim: int):
        super().__init__()
        cfg = model.visual.preprocess_cfg  # size, mean, std, interpolation, resize_mode
        height, width = (cfg["size"],) * 2 if isinstance(cfg["size"], int) else cfg["size"]
        if cfg["resize_mode"] not in ("shortest", "squash") or height != width:
            raise GenkitError(f"--features clip: unsupported preprocessing {cfg['resize_mode']!r} at {cfg['size']}")
        size = height
        self.model, self.protocol, self.weights_sha256, self.dim = model, protocol, sha256, dim
        self.size, self.mode, self.crop = size, cfg["interpolation"], cfg["resize_mode"] == "shortest"
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        how = "shortest side + centre crop" if self.crop else "squash"
        self.resize = f"{self.mode} (torchvision tensor resize, antialias) to {size}x{size}, {how}"
        self.freeze()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features (B, dim) of uint8 images (B, C, H, W)."""
        x = _resize_crop(check_images(images).float() / 255, self.size, self.mode, self.crop)
        return self.model.encode_image((x - self.mean) / self.std, normalize=False).float()  # (B, dim)


def _clip_config(weights: str, protocol: str | None) -> tuple[str, dict[str, Any], Path | None]:
    """(open_clip model name, model config, folder for 'local-dir:') of a --weights value."""
    import open_clip

    if weights.startswith("local-dir:"):
        folder = Path(weights[len("local-dir:"):]).expanduser()
        config = folder / "open_clip_config.json"
        if not config.is_file():
            raise GenkitError(f"--features clip: '{config}' not found (local-dir: needs open_clip_config.json)")
        model_cfg = json.loads(config.read_text()).get("model_cfg")
        if not isinstance(model_cfg, dict):
            raise GenkitError(f"--features clip: '{config}' has no 'model_cfg' object")
        return f"local-dir:{folder}", model_cfg, folder
    if not protocol:
        raise GenkitError("--features clip with a weights file needs --protocol MODEL (an open_clip name, "
                          "e.g. ViT-B-32)")
    cfg = open_clip.get_model_config(protocol)
    if cfg is None:
        raise GenkitError(f"--features clip: unknown open_clip model {protocol!r} (see open_clip.list_models())")
    return protocol, cfg, None


def build_clip(protocol: str | None = None, weights: str | Path | None = None) -> FeatureExtractor:
    """open_clip image features from local weights: 'local-dir:FOLDER', or a FILE with protocol=MODEL.

    MODEL must be the config the weights were trained with (OpenAI's: 'ViT-B-32-quickgelu').
    """
    import open_clip
    from open_clip.factory import _find_checkpoint_in_dir

    if weights is None:
        raise GenkitError("--features clip needs --weights: local-dir:FOLDER (open_clip_config.json + weights) "
                          "or a weights FILE with --protocol MODEL, e.g. ViT-B-32")
    model_name, cfg, folder = _clip_config(str(weights), protocol)
    if "hf_model_name" in cfg.get("text_cfg", {}):
        raise GenkitError(f"--features clip: {model_name} has a Hugging Face text tower, which would be "
                          f"fetched from the network; use an open_clip model with a built-in text tower")
    if folder is not None:
        found = _find_checkpoint_in_dir(folder)
        if found is None:
            raise GenkitError(f"--features clip: no weights file (.safetensors, .bin, .pth) in '{folder}'")
        path, sha = locate_weights(Path(found).name, found, sha256_prefix="")
        protocol = protocol or folder.name
    else:
        path, sha = _locate(Path(str(weights)).name, weights, prefix="")
    # A file path as `pretrained` (or local-dir:) loads locally with weights_only=True; no tag, no download.
    model = open_clip.create_model(model_name, pretrained=None if folder else str(path.resolve()),
                                   pretrained_image=False, pretrained_text=False, require_pretrained=True)
    return ClipFeatures(model, protocol, sha, int(cfg["embed_dim"]))


class DinoV2Features(FeatureExtractor):
    """DINOv2 CLS token (after the final norm) at 224 px, ImageNet normalisation."""

    name = "dinov2"
    resize = f"bicubic (torchvision tensor resize, antialias) to {DINOV2_SIZE}x{DINOV2_SIZE}, squash"

    def __init__(self, model: nn.Module, protocol: str, sha256: str | None):
        super().__init__()
        self.model, self.protocol, self.weights_sha256 = model, protocol, sha256
        self.dim = int(model.num_features)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features (B, dim) of uint8 images (B, C, H, W)."""
        x = _resize_crop(check_images(images).float() / 255, DINOV2_SIZE, "bicubic", crop=False)
        return self.model.forward_features((x - self.mean) / self.std)[:, 0].float()  # (B, dim) CLS


def load_dinov2_weights(model: nn.Module, state: dict[str, Tensor], source: str = "state dict") -> None:
    """Load an official DINOv2 checkpoint into timm's ViT (timm's filter: drops mask_token, resamples pos_embed)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if "mask_token" not in state:
        raise GenkitError(f"--features dinov2: {source} is not an official DINOv2 checkpoint (no 'mask_token')")
    try:
        model.load_state_dict(checkpoint_filter_fn(dict(state), model), strict=True)
    except RuntimeError as e:
        raise GenkitError(f"--features dinov2: {source} does not fit {type(model).__name__}: "
                          f"{str(e).splitlines()[0]}") from None


def build_dinov2(protocol: str | None = None, weights: str | Path | None = None) -> FeatureExtractor:
    """DINOv2 through timm (built with pretrained=False: no code or weights fetched), official weights file."""
    import timm

    protocol = _check_protocol("dinov2", protocol, ["vitb14", "vits14", "vitl14", "vitg14"])
    filename = f"dinov2_{protocol}_pretrain.pth"
    url = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{protocol}/{filename}"
    path, sha = _locate(filename, weights, url=url)
    model = timm.create_model(DINOV2[protocol], pretrained=False, img_size=DINOV2_SIZE, num_classes=0)
    load_dinov2_weights(model, load_state_dict(path), f"'{path}'")
    return DinoV2Features(model, protocol, sha)


class DigitsFeatures(FeatureExtractor):
    """genkit's digits CNN: 64-d penultimate features, 10-class logits (IS, accuracy)."""

    name, protocol = "digits", "genkit"
    has_logits = True
    resize = "bilinear (F.interpolate, antialias) to 16x16; RGB averaged to grey"

    def __init__(self, net: nn.Module, sha256: str):
        super().__init__()
        self.net, self.weights_sha256, self.dim = net, sha256, int(net.dim)
        self.freeze()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features (B, dim) of uint8 images (B, C, H, W)."""
        return self.net.features(check_images(images, rgb=False))

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """Class logits (B, 10) of the digits classifier."""
        return self.net.logits(check_images(images, rgb=False))


def shipped_digits_weights(assets: Path = ASSETS) -> tuple[Path, str]:
    """The shipped digits weights and their SHA-256, verified against digits_classifier.json."""
    record = json.loads((assets / DIGITS_JSON).read_text())
    path = assets / record["file"]
    if not path.is_file():
        raise GenkitError(f"digits classifier weights '{path}' are missing: reinstall genkit or rebuild them "
                          f"with `{record['command']}`")
    actual = sha256_file(path)
    if actual != record["sha256"]:
        raise GenkitError(f"digits classifier weights '{path}' have SHA-256 {actual}, expected {record['sha256']}")
    return path, actual


def build_digits(protocol: str | None = None, weights: str | Path | None = None) -> FeatureExtractor:
    """The digits classifier's features: the shipped weights, or a safetensors file of your own."""
    from safetensors import safe_open

    _check_protocol("digits", protocol, ["genkit"])
    path, sha = shipped_digits_weights() if weights is None else _locate(Path(str(weights)).name, weights, "")
    with safe_open(str(path), "pt") as f:
        meta = (f.metadata() or {}).get(METADATA_KEY)
    if meta is None:
        raise GenkitError(f"'{path}' is not a genkit digits classifier (no '{METADATA_KEY}' metadata)")
    arch = json.loads(meta)["architecture"]
    net = DigitsClassifier(tuple(arch["channels"]), arch["features"], arch["classes"])
    net.load_state_dict(load_tensors(path))
    return DigitsFeatures(net, sha)


FEATURES: dict[str, Callable[..., FeatureExtractor]] = {
    "inception": build_inception,
    "clip": build_clip,
    "dinov2": build_dinov2,
    "digits": build_digits,
}


def build_features(name: str, *, protocol: str | None = None, weights: str | Path | None = None,
                   device: str | torch.device = "cpu") -> FeatureExtractor:
    """Build the extractor `name` from local weights, frozen, on `device`.

    Args:
        name: a key of FEATURES (inception, clip, dinov2, digits).
        protocol: inception: 'tf' (default) or 'pytorch-fid'; clip: an open_clip model name;
            dinov2: vitb14 (default), vits14, vitl14, vitg14; digits: 'genkit'.
        weights: a weights file, a folder holding the canonical file, a bare file name searched in
            $GENKIT_WEIGHTS_DIR and the caches, or 'local-dir:FOLDER' (clip); None: the default file.
        device: where the network runs.
    """
    if name not in FEATURES:
        close = difflib.get_close_matches(str(name), list(FEATURES), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise GenkitError(f"--features: unknown extractor {name!r}{hint}; known: {', '.join(FEATURES)}")
    return FEATURES[name](protocol=protocol, weights=weights).to(device).freeze()
