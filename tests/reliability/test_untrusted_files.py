"""No code runs from a file genkit reads, nothing outside a data root is read unasked, and what genkit
writes gets the usual permissions under unique temporary names.

1. Weights: a pickle planted under every name and in every place genkit looks for weights (its
   unpickling would create a marker file) is refused by its SHA-256 before anything unpickles it,
   on every path that loads such weights (LPIPS, the autoencoder_kl and vqgan perceptual losses,
   the Inception feature extractors, `genkit train`).
2. Folders: metadata.jsonl file names outside the root, and symlinks leading out of it, are refused
   unless `data.follow_symlinks` (symlinks are then followed; `../` and absolute names never are).
3. Writes: files 0666 and folders 0777 minus the umask; atomic_dir's temporary names are unique and
   cleaned up on success and on failure, and a failed replacement keeps the previous folder.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genkit.config import DataConfig
from genkit.data import build_dataset
from genkit.errors import DataError, GenkitError

# ---------------------------------------------------------------- 1. planted pickles in the weights places

VGG, ALEX = "vgg16-397923af.pth", "alexnet-owt-7be5be79.pth"
INCEPTION_TF, INCEPTION_PT = "weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth"
ALL_FILES = (VGG, ALEX, INCEPTION_TF, INCEPTION_PT)


class Planted:
    """Unpickling it opens (creates) the marker file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path) -> Path:
    """A torch checkpoint under `path` whose unpickling creates `marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"features.0.weight": Planted(marker), "state_dict": Planted(marker)}, path)
    return path


@pytest.fixture
def places(tmp_path, monkeypatch) -> dict[str, Path]:
    """Every folder genkit searches for weights, each redirected into tmp_path (all empty)."""
    monkeypatch.setenv("GENKIT_WEIGHTS_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    assert hub.is_relative_to(tmp_path), hub  # torch.hub.set_dir would escape the redirection
    return {"env": tmp_path / "env", "hub": hub, "genkit": tmp_path / "xdg" / "genkit"}


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code-ran"


def lpips(net):
    from genkit.nn.perceptual import LPIPS

    return lambda: LPIPS(net)


def autoencoder_kl():
    from genkit.families.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

    cfg = AutoencoderKLConfig(channels=[8, 16], norm_groups=4, latent_channels=2, mid_attention=False,
                              perceptual="lpips")
    return AutoencoderKL(cfg, (1, 16, 16))


def vqgan(net, size, weights=None):
    def build():
        from genkit.families.vqgan import VQGAN, QuantizerConfig, VQGANConfig

        cfg = VQGANConfig(f=2, channels=[8, 16], norm_groups=4, disc_channels=8, disc_layers=1,
                          quantizer=QuantizerConfig(num_codes=16, dim=8), perceptual="lpips",
                          perceptual_net=net, perceptual_weights=weights)
        return VQGAN(cfg, shape=(1, size, size))

    return build


def inception(protocol, weights=None):
    from genkit.eval.features import build_features

    return lambda: build_features("inception", protocol=protocol, weights=weights)


LOADERS = {  # every code path that loads one of the files: (file it reads, the call)
    "nn.perceptual.LPIPS(vgg)": (VGG, lpips("vgg")),
    "nn.perceptual.LPIPS(alex)": (ALEX, lpips("alex")),
    "autoencoder_kl perceptual=lpips": (VGG, autoencoder_kl),
    "vqgan perceptual=lpips vgg": (VGG, vqgan("vgg", 16)),
    "vqgan perceptual=lpips alex": (ALEX, vqgan("alex", 32)),
    "features inception tf": (INCEPTION_TF, inception("tf")),
    "features inception pytorch-fid": (INCEPTION_PT, inception("pytorch-fid")),
}


def assert_refused_by_hash(load, path: Path, marker: Path) -> None:
    """`load()` ends in a one-line GenkitError naming `path` and its SHA-256, and no code ran."""
    try:
        load()
    except Exception as error:  # checked after the marker: code running is the worse failure
        raised = error
    else:
        raised = None
    assert not marker.exists(), f"unpickling ran code: {marker} exists"
    assert isinstance(raised, GenkitError), repr(raised)
    message = str(raised)
    assert "\n" not in message and f"'{path}'" in message and "SHA-256" in message, message


def test_the_planted_file_runs_code_when_unpickled_naively(tmp_path, marker):
    path = plant(tmp_path / VGG, marker)
    torch.load(path, weights_only=False)  # what torchvision's cached-file load did
    assert marker.exists()


def test_weights_only_loading_refuses_the_planted_file_too(tmp_path, marker):
    from genkit.weights import load_state_dict

    path = plant(tmp_path / VGG, marker)  # the second line of defence, behind the hash check
    with pytest.raises(GenkitError, match="weights_only") as info:
        load_state_dict(path)
    assert not marker.exists() and f"'{path}'" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("place", ["env", "hub", "genkit", "all"])
@pytest.mark.parametrize("loader", list(LOADERS))
def test_planted_pickles_in_every_weights_place_are_refused_by_their_hash(places, marker, loader, place):
    filename, load = LOADERS[loader]
    chosen = list(places) if place == "all" else [place]
    for folder in chosen:
        for name in ALL_FILES:
            plant(places[folder] / name, marker)
    first = places[chosen[0]] / filename  # the search order: $GENKIT_WEIGHTS_DIR, torch hub, genkit cache
    assert_refused_by_hash(load, first, marker)


EXPLICIT = [(loader, form) for loader in ("lpips", "vqgan") for form in ("file", "folder")] + \
    [(loader, form) for loader in ("inception tf", "inception pytorch-fid") for form in ("file", "folder", "bare name")]


@pytest.mark.parametrize("loader, form", EXPLICIT)
def test_planted_pickles_given_explicitly_are_refused_by_their_hash(places, marker, tmp_path, loader, form):
    from genkit.nn.perceptual import LPIPS

    filename = {"lpips": ALEX, "vqgan": VGG, "inception tf": INCEPTION_TF,
                "inception pytorch-fid": INCEPTION_PT}[loader]
    folder = places["env"] if form == "bare name" else tmp_path / "mine"
    path = plant(folder / filename, marker)
    weights = {"file": str(path), "folder": str(folder), "bare name": filename}[form]
    load = {"lpips": lambda: LPIPS("alex", weights),
            "vqgan": vqgan("vgg", 16, weights),
            "inception tf": inception("tf", weights),
            "inception pytorch-fid": inception("pytorch-fid", weights)}[loader]
    assert_refused_by_hash(load, path, marker)


def test_genkit_train_with_lpips_refuses_a_planted_hub_file(places, marker, tmp_path, capsys):
    from genkit.cli import main

    path = plant(places["hub"] / VGG, marker)  # the reported attack: a pickle in the torch hub cache
    try:
        code = main(["train", "autoencoder_kl_digits", "model.perceptual=lpips", "model.channels=[8,16]",
                     "model.norm_groups=4", "train.steps=1", "--out", str(tmp_path / "run")])
    finally:
        assert not marker.exists(), f"unpickling ran code: {marker} exists"
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and f"'{path}'" in err and "SHA-256" in err, err


def test_autoencoder_kl_without_the_vgg_file_names_it_and_where_to_put_it(places):
    with pytest.raises(GenkitError) as info:
        autoencoder_kl()
    message = str(info.value)
    assert VGG in message and "GENKIT_WEIGHTS_DIR" in message and str(places["hub"]) in message
    assert "\n" not in message


def test_lpips_linear_layers_are_hash_checked_before_loading(tmp_path, marker, monkeypatch):
    import lpips as lpips_package

    from genkit.nn.perceptual import LPIPS

    fake = tmp_path / "lpips" / "__init__.py"
    path = plant(fake.parent / "weights" / "v0.1" / "vgg.pth", marker)  # as if lpips' own file were replaced
    monkeypatch.setattr(lpips_package, "__file__", str(fake))
    assert_refused_by_hash(lambda: LPIPS("vgg", random_backbone=True), path, marker)


def test_lpips_loads_every_file_itself_with_weights_only(monkeypatch):
    from genkit.nn.perceptual import LPIPS

    calls, real_load = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)  # lpips' own torch.load of its linear layers would show as None
    LPIPS("alex", random_backbone=True)
    assert calls == [True]


def test_autoencoder_kl_lpips_term_is_genkits_lpips_on_grey_images(monkeypatch):
    from genkit.families import autoencoder_kl as module
    from genkit.nn.perceptual import LPIPS

    class RandomBackbone(LPIPS):  # no ImageNet file needed to check the wiring
        def __init__(self, net: str = "vgg", weights: str | None = None, option: str = ""):
            super().__init__(net, random_backbone=True)

    monkeypatch.setattr(module, "LPIPS", RandomBackbone)
    torch.manual_seed(0)
    family = autoencoder_kl()
    assert isinstance(family.lpips, LPIPS) and not any(p.requires_grad for p in family.lpips.parameters())
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    losses = family.loss(x, torch.zeros(2, *family.prior_shape))
    x_rec = family.nets["vae"](x, torch.zeros(2, *family.prior_shape))[0].float()
    want = family.lpips.model(x_rec.expand(-1, 3, -1, -1), x.expand(-1, 3, -1, -1)).mean()  # grey -> RGB
    torch.testing.assert_close(losses["lpips"], want)
    torch.testing.assert_close(losses["loss"], losses["rec_l1"] + family.cfg.kl_weight * losses["kl"] + want)


# ---------------------------------------------------------------- 2. data folders: paths and symlinks


def png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)
    return path


def folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="folder", root=str(root), image_size=8, **kw)


def captioned(root: Path, *names: str) -> Path:
    """root/metadata.jsonl listing `names` (root/a.png exists)."""
    png(root / "a.png")
    rows = [json.dumps({"file_name": name, "text": f"caption {name}"}) for name in names]
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder next to the data root with one image, outside.png, and one image in a sub-folder."""
    png(tmp_path / "outside" / "outside.png", 255)
    png(tmp_path / "outside" / "dir" / "b.png", 255)
    return tmp_path / "outside"


@pytest.mark.parametrize("value", ["../outside/outside.png", "sub/../../outside/outside.png", "..",
                                   "/etc/passwd", "{outside}/outside.png"])
@pytest.mark.parametrize("follow", [False, True])
def test_metadata_file_names_outside_the_root_are_refused(tmp_path, outside, value, follow):
    value = value.format(outside=outside)
    root = captioned(tmp_path / "data", "a.png", value)
    (root / "sub").mkdir()
    with pytest.raises(DataError) as info:
        build_dataset(folder_cfg(root, follow_symlinks=follow))
    message = str(info.value)
    assert "metadata.jsonl:2:" in message and repr(value) in message and "\n" not in message, message


@pytest.mark.parametrize("link", ["file", "folder"])
def test_metadata_symlinks_leading_outside_are_refused_unless_followed(tmp_path, outside, link):
    root = tmp_path / "data"
    root.mkdir()
    if link == "file":
        (root / "link.png").symlink_to(outside / "outside.png")
        value = "link.png"
    else:
        (root / "linked").symlink_to(outside / "dir")
        value = "linked/b.png"
    captioned(root, "a.png", value)
    with pytest.raises(DataError) as info:
        build_dataset(folder_cfg(root))
    message = str(info.value)
    assert "metadata.jsonl:2:" in message and repr(value) in message and "data.follow_symlinks" in message
    assert "\n" not in message
    data = build_dataset(folder_cfg(root, follow_symlinks=True))  # opted in: read through the link
    assert len(data) == 2 and data[1]["image"].min() == 1 and data[1]["caption"] == f"caption {value}"


def test_metadata_jsonl_itself_symlinked_outside_is_refused(tmp_path, outside):
    captioned(outside, "outside.png")
    root = tmp_path / "data"
    root.mkdir()
    (root / "metadata.jsonl").symlink_to(outside / "metadata.jsonl")
    with pytest.raises(DataError, match="metadata.jsonl.*data.follow_symlinks"):
        build_dataset(folder_cfg(root))


def test_metadata_symlinks_inside_the_root_are_fine(tmp_path):
    root = tmp_path / "data"
    png(root / "sub" / "b.png", 255)
    (root / "alias.png").symlink_to("a.png")
    (root / "aliased").symlink_to("sub")
    captioned(root, "a.png", "alias.png", "aliased/b.png", "sub/../a.png")
    data = build_dataset(folder_cfg(root))
    assert [p.name for p in data.files] == ["a.png", "alias.png", "b.png", "a.png"]
    assert data[1]["image"].max() == -1 and data[2]["image"].min() == 1


@pytest.mark.parametrize("link, target, found", [("link.png", "outside.png", "link.png"),
                                                  ("linked", "dir", "linked/b.png")])
def test_folder_scan_refuses_a_symlink_leading_outside_unless_followed(tmp_path, outside, link, target, found):
    root = tmp_path / "data"
    png(root / "a.png")
    (root / link).symlink_to(outside / target)
    with pytest.raises(DataError) as info:
        build_dataset(folder_cfg(root))
    message = str(info.value)
    assert str(root / link) in message and "data.follow_symlinks" in message and "\n" not in message
    data = build_dataset(folder_cfg(root, follow_symlinks=True))  # opted in: read through the link
    assert data.files == [root / "a.png", root / found] and data[1]["image"].min() == 1


@pytest.mark.parametrize("follow", [False, True])
def test_folder_scan_symlinks_inside_the_root_are_fine_and_walked_once(tmp_path, outside, follow):
    root = tmp_path / "data"
    png(root / "a.png")
    png(root / "sub" / "b.png")
    (root / "alias.png").symlink_to("a.png")
    (root / "aliased").symlink_to("sub")  # its files are found through sub/
    (root / "sub" / "loop").symlink_to("..")  # a loop back to the root
    (outside / "dir" / "loop").symlink_to(outside)  # a loop outside, reached only when followed
    if follow:
        (root / "ext").symlink_to(outside)
    files = build_dataset(folder_cfg(root, follow_symlinks=follow)).files
    want = [root / "a.png", root / "alias.png", root / "sub" / "b.png"]
    if follow:
        want[2:2] = [root / "ext" / "dir" / "b.png", root / "ext" / "outside.png"]
    assert files == want


def test_a_data_root_given_through_a_symlink_is_fine(tmp_path):
    real = tmp_path / "real"
    png(real / "sub" / "b.png")
    (real / "alias.png").symlink_to("sub/b.png")  # inside the root, which is judged by its real path
    (tmp_path / "data").symlink_to(real)
    data = tmp_path / "data"
    assert build_dataset(folder_cfg(data)).files == [data / "alias.png", data / "sub" / "b.png"]
    captioned(real, "a.png", "alias.png")
    assert len(build_dataset(folder_cfg(data))) == 2


def test_follow_symlinks_is_a_recipe_key():
    from genkit.runs import load_recipe

    assert load_recipe("ddpm_digits").data.follow_symlinks is False
    assert load_recipe("ddpm_digits", ["data.follow_symlinks=true"]).data.follow_symlinks is True


# ---------------------------------------------------------------- 3. written files: modes and atomic folders


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=oct)
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_folders_get_the_usual_modes(tmp_path, umask):
    from genkit.io import atomic_dir, save_grid, save_npz, save_tensors, save_torch, write_json

    images = torch.zeros(2, 1, 8, 8)
    files = [save_tensors(tmp_path / "w.safetensors", {"x": torch.ones(2)}),
             save_torch(tmp_path / "optim.pt", {"x": torch.ones(2)}),
             write_json(tmp_path / "a.json", {"a": 1}),
             save_grid(images, tmp_path / "grid.png"),
             save_npz(tmp_path / "s.npz", images)]
    with atomic_dir(tmp_path / "export") as tmp:
        save_tensors(tmp / "unet" / "diffusion_pytorch_model.safetensors", {"x": torch.ones(2)})
        write_json(tmp / "unet" / "config.json", {})
        (tmp / "plain.txt").write_text("x")
    folder = tmp_path / "export"
    files += [folder / "unet" / "diffusion_pytorch_model.safetensors", folder / "unet" / "config.json",
              folder / "plain.txt"]
    assert {f.name: oct(mode(f)) for f in files} == {f.name: oct(0o666 & ~umask) for f in files}
    assert oct(mode(folder)) == oct(0o777 & ~umask) and oct(mode(folder / "unet")) == oct(0o777 & ~umask)


def test_the_umask_is_read_without_being_changed(umask, monkeypatch):
    from genkit import io

    assert io._umask() == umask
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self).startswith("/proc"):
            raise OSError("no /proc here (macOS)")
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)  # the os.umask fallback
    assert io._umask() == umask and os.umask(umask) == umask


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


def test_atomic_dir_temporary_folders_are_unique_and_removed(tmp_path):
    from genkit.io import atomic_dir

    target = tmp_path / "out"
    planted = [tmp_path / ".out.tmp", tmp_path / ".out.old"]
    for p in planted:  # the old fixed names, taken by someone else: neither used nor removed
        p.write_text("not yours")
    with atomic_dir(target) as first, atomic_dir(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        (first / "who").write_text("first")
        (second / "who").write_text("second")
    assert (target / "who").read_text() == "first"  # the outer block finished last
    assert leftovers(tmp_path, "out") == [".out.old", ".out.tmp"]
    assert all(p.read_text() == "not yours" for p in planted)


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
@pytest.mark.parametrize("existed", [False, True])
def test_atomic_dir_cleans_up_and_keeps_the_previous_folder_on_error(tmp_path, error, existed):
    from genkit.io import atomic_dir

    target = tmp_path / "out"
    if existed:
        target.mkdir()
        (target / "keep").write_text("previous")
    with pytest.raises(error), atomic_dir(target) as tmp:
        (tmp / "new").write_text("half")
        raise error("inside the block")
    assert leftovers(tmp_path, "out") == []
    if existed:
        assert sorted(p.name for p in target.iterdir()) == ["keep"] and (target / "keep").read_text() == "previous"
    else:
        assert not target.exists()


def test_atomic_dir_replaces_an_existing_folder_and_leaves_nothing_behind(tmp_path):
    from genkit.io import atomic_dir

    target = tmp_path / "out"
    for content in ("one", "two"):
        with atomic_dir(target) as tmp:
            (tmp / "content").write_text(content)
        assert [p.name for p in target.iterdir()] == ["content"] and (target / "content").read_text() == content
        assert leftovers(tmp_path, "out") == []


def test_atomic_dir_puts_the_previous_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    from genkit import io

    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("previous")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == target and Path(src).name.endswith(".tmp"):  # the new folder's rename into place
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"), io.atomic_dir(target) as tmp:
        (tmp / "new").write_text("complete")
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == ["keep"] and (target / "keep").read_text() == "previous"
    assert leftovers(tmp_path, "out") == []

