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
- inception / clean-fid: clean-fid's "clean" mode (Parmar et al. 2022): PIL bicubic resize of each
  channel as float32 to 299 (clean-fid's own resizer; `pip install clean-fid`), (x - 128) / 128, and
  the same TF Inception graph and weights file as `tf`.
- clip: an open_clip image tower; features are the UN-normalised image embeddings
  (`encode_image(normalize=False)`), the FD-CLIP convention of Kynkaanniemi et al. 2023.
- dinov2: DINOv2 (Oquab et al. 2023) built with timm, official weights, as FD-DINOv2 (Stein et al.
  2023, dgm-eval) computes it: PIL bicubic to 224, ImageNet mean/std, CLS token after the final norm,
  position embeddings interpolated as the official model does. FD-DINOv2 uses protocol vitl14.
- cmmd: CMMD's CLIP embeddings (Jayasumana et al. 2024, google-research/cmmd): centre crop, PIL
  bicubic to 336, CLIP mean/std, OpenAI's ViT-L/14@336px, L2-normalised (`genkit.eval.cmmd`).
- digits: genkit's small CNN on scikit-learn's digits (`digits_classifier`), shipped in
  genkit/assets: FD, IS and class accuracy on the embedded default with nothing to download.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
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
DINOV2_POS_OFFSET = 0.1  # the official `interpolate_offset`: bicubic scale (grid + 0.1) / 37, no antialias
FD_DINOV2_PROTOCOL = "vitl14"  # Stein et al. 2023 (dgm-eval's default arch): FD-DINOv2 is FD on these features
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLEAN_FID_SIZE = 299
CMMD_MODEL = "ViT-L-14-336-quickgelu"  # OpenAI's CLIP ViT-L/14@336px (QuickGELU), the paper's embedding model
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI's
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


def _clean_fid_resizer() -> Callable[[np.ndarray], np.ndarray]:
    """clean-fid's own "clean" resize: (H, W, 3) uint8 -> (299, 299, 3) float32 in [0, 255], PIL bicubic per channel."""
    try:
        from cleanfid.resize import make_resizer
    except ImportError:
        raise GenkitError("--features inception --protocol clean-fid needs the clean-fid package "
                          "(pip install clean-fid)") from None
    return make_resizer("PIL", False, "bicubic", (CLEAN_FID_SIZE, CLEAN_FID_SIZE))  # = build_resizer("clean")


class InceptionCleanFID(FeatureExtractor):
    """clean-fid's "clean" mode: its float32 PIL bicubic resize, (x - 128) / 128, the TF Inception's pool3.

    clean-fid runs NVIDIA's TorchScript `inception-2015-12-05.pt`, an archive of code that only
    torch.jit.load opens (weights_only refuses it). It is the TF graph that torch-fidelity's and
    pytorch-fid's networks port (convolutions without bias, batch norm without scale and eps 1e-3,
    average pools that exclude the padding, a max pool in the last block, an 8x8 average pool), with
    weights converted from the same TF 2015-12-05 checkpoint; so this runs pytorch-fid's FID Inception,
    without its resize and normalisation, on the `tf` protocol's hash-checked file.
    """

    name, protocol, dim = "inception", "clean-fid", 2048
    resize = "bicubic (clean-fid 'clean': PIL, each channel as float32, not quantised) to 299x299"

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        from pytorch_fid import inception as pfi

        self.resizer = _clean_fid_resizer()
        state, self.weights_sha256 = _inception_state("tf", weights)  # the `tf` protocol's file
        with mock.patch.object(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state):
            self.net = pfi.InceptionV3([3], resize_input=False, normalize_input=False, use_fid_inception=True)
        self.freeze()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features (B, dim) of uint8 images (B, C, H, W)."""
        hwc = check_images(images).permute(0, 2, 3, 1).cpu().numpy()        # (B, H, W, 3) uint8
        x = torch.from_numpy(np.stack([self.resizer(im) for im in hwc]))    # (B, 299, 299, 3) float32 in [0, 255]
        x = x.permute(0, 3, 1, 2).contiguous().to(images.device)            # (B, 3, 299, 299), laid out as clean-fid's
        return self.net((x - 128) / 128)[0].flatten(1)  # clean-fid's InceptionV3W normalisation; (B, 2048)


def build_inception(protocol: str | None = None, weights: str | Path | None = None) -> FeatureExtractor:
    """InceptionV3 pool3 features under the 'tf' (torch-fidelity, default), 'pytorch-fid' or 'clean-fid' protocol."""
    protocol = _check_protocol("inception", protocol, ["tf", "pytorch-fid", "clean-fid"])
    return {"tf": InceptionTF, "pytorch-fid": InceptionPytorchFID, "clean-fid": InceptionCleanFID}[protocol](weights)


def _resize_crop(x: Tensor, size: int, mode: str, crop: bool) -> Tensor:
    """Float images in [0, 1] -> (size, size): antialiased resize (shortest side + centre crop, or squash)."""
    from torchvision.transforms.v2 import functional as TF

    interpolation = TF.InterpolationMode.BICUBIC if mode == "bicubic" else TF.InterpolationMode.BILINEAR
    x = TF.resize(x, size if crop else [size, size], interpolation=interpolation, antialias=True)
    return TF.center_crop(x, [size, size]).clamp(0, 1) if crop else x.clamp(0, 1)


def _pil_resize(images: Tensor, size: int, crop: bool) -> Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, size, size) through PIL's bicubic resize (antialiased, rounded to uint8).

    `crop`: first the centred square of side min(H, W), as google-research/cmmd's io_util crops.
    """
    out = []
    for hwc in images.permute(0, 2, 3, 1).cpu().numpy():                       # (H, W, 3) each
        image = Image.fromarray(np.ascontiguousarray(hwc))
        if crop:
            w, h = image.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            image = image.crop((left, top, left + side, top + side))
        out.append(np.asarray(image.resize((size, size), resample=Image.BICUBIC)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous().to(images.device)  # (B, 3, size, size)


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


def _open_clip_model(protocol: str | None, weights: str | Path,
                     feature: str = "clip") -> tuple[nn.Module, str, str, int]:
    """(model, protocol, weights SHA-256, embedding dim) of an open_clip model from local weights only."""
    import open_clip
    from open_clip.factory import _find_checkpoint_in_dir

    model_name, cfg, folder = _clip_config(str(weights), protocol)
    if "hf_model_name" in cfg.get("text_cfg", {}):
        raise GenkitError(f"--features {feature}: {model_name} has a Hugging Face text tower, which would be "
                          f"fetched from the network; use an open_clip model with a built-in text tower")
    if folder is not None:
        found = _find_checkpoint_in_dir(folder)
        if found is None:
            raise GenkitError(f"--features {feature}: no weights file (.safetensors, .bin, .pth) in '{folder}'")
        path, sha = locate_weights(Path(found).name, found, sha256_prefix="")
        protocol = protocol or folder.name
    else:
        path, sha = _locate(Path(str(weights)).name, weights, prefix="")
    # A file path as `pretrained` (or local-dir:) loads locally with weights_only=True; no tag, no download.
    model = open_clip.create_model(model_name, pretrained=None if folder else str(path.resolve()),
                                   pretrained_image=False, pretrained_text=False, require_pretrained=True)
    return model, protocol, sha, int(cfg["embed_dim"])


def build_clip(protocol: str | None = None, weights: str | Path | None = None) -> FeatureExtractor:
    """open_clip image features from local weights: 'local-dir:FOLDER', or a FILE with protocol=MODEL.

    MODEL must be the config the weights were trained with (OpenAI's: 'ViT-B-32-quickgelu').
    """
    if weights is None:
        raise GenkitError("--features clip needs --weights: local-dir:FOLDER (open_clip_config.json + weights) "
                          "or a weights FILE with --protocol MODEL, e.g. ViT-B-32")
    return ClipFeatures(*_open_clip_model(protocol, weights))


class CmmdFeatures(FeatureExtractor):
    """CMMD's image embeddings (Jayasumana et al. 2024), as google-research/cmmd computes them.

    io_util: the centred square crop, PIL bicubic to the model's size (336), uint8; embedding: / 255,
    CLIP's mean/std, the image embedding L2-normalised (scenic's CLIP `normalize=True`).
    """

    name = "cmmd"

    def __init__(self, model: nn.Module, protocol: str, sha256: str, dim: int):
        super().__init__()
        size = model.visual.preprocess_cfg["size"]
        height, width = (size, size) if isinstance(size, int) else size
        if height != width:
            raise GenkitError(f"--features cmmd: the model's input {height}x{width} is not square (CMMD's is 336x336)")
        self.size = height
        self.model, self.protocol, self.weights_sha256, self.dim = model, protocol, sha256, dim
        self.resize = (f"centre crop to a square, then bicubic (PIL, antialias, uint8) to {self.size}x{self.size} "
                       f"(google-research/cmmd)")
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def protocol_dict(self) -> dict[str, Any]:
        """The common protocol, plus the normalisation and the output CMMD is defined on."""
        return {**super().protocol_dict(), "normalize": f"x / 255, CLIP mean {CLIP_MEAN} std {CLIP_STD}",
                "output": "image embedding, L2-normalised"}

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """L2-normalised embeddings (B, dim) of uint8 images (B, C, H, W)."""
        x = _pil_resize(check_images(images), self.size, crop=True).float() / 255    # (B, 3, size, size)
        return self.model.encode_image((x - self.mean) / self.std, normalize=True).float()


def build_cmmd(protocol: str | None = None, weights: str | Path | None = None) -> FeatureExtractor:
    """CMMD's CLIP embeddings from local weights: 'local-dir:FOLDER', or a FILE of OpenAI's ViT-L/14@336px."""
    if weights is None:
        raise GenkitError(f"--features cmmd needs --weights: local-dir:FOLDER (open_clip_config.json + "
                          f"open_clip_model.safetensors, e.g. Hugging Face's timm/vit_large_patch14_clip_336.openai) "
                          f"or a weights FILE of OpenAI's CLIP ViT-L/14@336px (--protocol {CMMD_MODEL} by default)")
    if not str(weights).startswith("local-dir:"):
        protocol = protocol or CMMD_MODEL
    return CmmdFeatures(*_open_clip_model(protocol, weights, "cmmd"))


class DinoV2Features(FeatureExtractor):
    """DINOv2 CLS token (after the final norm) at 224 px, as dgm-eval's DINOv2Encoder (Stein et al. 2023).

    dgm-eval's transform: torchvision's Resize((224, 224), BICUBIC) on the PIL image (PIL's bicubic, uint8),
    ToTensor, ImageNet mean/std; its model: torch hub's DINOv2, whose forward is the normed CLS token.
    """

    name = "dinov2"
    resize = f"bicubic (PIL, antialias, uint8, as dgm-eval) to {DINOV2_SIZE}x{DINOV2_SIZE}, squash"

    def __init__(self, model: nn.Module, protocol: str, sha256: str | None):
        super().__init__()
        self.model, self.protocol, self.weights_sha256 = model, protocol, sha256
        self.dim = int(model.num_features)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def protocol_dict(self) -> dict[str, Any]:
        """The common protocol, plus the normalisation, the output and the position-embedding interpolation."""
        return {**super().protocol_dict(), "normalize": f"x / 255, ImageNet mean {IMAGENET_MEAN} std {IMAGENET_STD}",
                "output": "CLS token after the final norm",
                "pos_embed": f"official DINOv2 interpolation (bicubic, scale (grid + {DINOV2_POS_OFFSET}) / 37, "
                             f"no antialias)"}

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features (B, dim) of uint8 images (B, C, H, W)."""
        x = _pil_resize(check_images(images), DINOV2_SIZE, crop=False).float() / 255  # (B, 3, 224, 224)
        return self.model.forward_features((x - self.mean) / self.std)[:, 0].float()  # (B, dim) CLS


def dinov2_pos_embed(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """(1, 1 + M*M, d) position embeddings -> (1, 1 + gh*gw, d) as DINOv2's `interpolate_pos_encoding` does.

    Bicubic with scale factors (g + 0.1) / M and no antialias (facebookresearch/dinov2's defaults), which
    timm's size-based, antialiased resampling does not reproduce.
    """
    cls, patch = pos_embed[:, :1], pos_embed[:, 1:].float()
    m, dim = math.isqrt(patch.shape[1]), patch.shape[2]
    patch = F.interpolate(patch.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",    # (1, d, M, M)
                          scale_factor=((grid[0] + DINOV2_POS_OFFSET) / m, (grid[1] + DINOV2_POS_OFFSET) / m))
    if tuple(patch.shape[-2:]) != tuple(grid):  # the offset keeps floor((g + 0.1) / M * M) == g
        raise GenkitError(f"--features dinov2: cannot interpolate a {m}x{m} position grid to {grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)                # (1, gh*gw, d)
    return torch.cat([cls, patch], dim=1)


def load_dinov2_weights(model: nn.Module, state: dict[str, Tensor], source: str = "state dict") -> None:
    """Load an official DINOv2 checkpoint into timm's ViT: position embeddings interpolated as DINOv2 does,
    then timm's filter (drops mask_token, renames a giant's SwiGLU)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if "mask_token" not in state:
        raise GenkitError(f"--features dinov2: {source} is not an official DINOv2 checkpoint (no 'mask_token')")
    state = dict(state)
    if "pos_embed" in state and state["pos_embed"].shape[1] != model.pos_embed.shape[1]:
        state["pos_embed"] = dinov2_pos_embed(state["pos_embed"], model.patch_embed.grid_size)
    try:
        model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    except RuntimeError as e:
        raise GenkitError(f"--features dinov2: {source} does not fit {type(model).__name__}: "
                          f"{str(e).splitlines()[0]}") from None


def build_dinov2(protocol: str | None = None, weights: str | Path | None = None) -> FeatureExtractor:
    """DINOv2 through timm (built with pretrained=False: no code or weights fetched), official weights file."""
    import timm

    protocol = _check_protocol("dinov2", protocol, [FD_DINOV2_PROTOCOL, "vits14", "vitb14", "vitg14"])
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
    "cmmd": build_cmmd,
}


def build_features(name: str, *, protocol: str | None = None, weights: str | Path | None = None,
                   device: str | torch.device = "cpu") -> FeatureExtractor:
    """Build the extractor `name` from local weights, frozen, on `device`.

    Args:
        name: a key of FEATURES (inception, clip, dinov2, digits, cmmd).
        protocol: inception: 'tf' (default), 'pytorch-fid' or 'clean-fid'; clip: an open_clip model name;
            dinov2: vitl14 (default: FD-DINOv2's), vits14, vitb14, vitg14; digits: 'genkit';
            cmmd: an open_clip model name (default ViT-L-14-336-quickgelu, the paper's).
        weights: a weights file, a folder holding the canonical file, a bare file name searched in
            $GENKIT_WEIGHTS_DIR and the caches, or 'local-dir:FOLDER' (clip, cmmd); None: the default file.
        device: where the network runs.
    """
    if name not in FEATURES:
        close = difflib.get_close_matches(str(name), list(FEATURES), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise GenkitError(f"--features: unknown extractor {name!r}{hint}; known: {', '.join(FEATURES)}")
    return FEATURES[name](protocol=protocol, weights=weights).to(device).freeze()
