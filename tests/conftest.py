"""Shared fixtures: tiny but real CompressAI codecs, shipped photos, an isolated registry, no network."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)

# Tiny configurations of the real architectures: same code paths, milliseconds per image.
TINY_CODECS = {
    "bmshj2018-hyperprior": {"N": 8, "M": 12},
    "mbt2018-mean": {"N": 8, "M": 12},
    "cheng2020-anchor": {"N": 8},
    "elic2022-official": {"N": 8, "M": 24, "groups": [2, 2, 4, 8, 8]},
    "mbt2018-mean-vbr": {"N": 8, "M": 12},
}


def skimage_photo(name: str) -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / name


# The training photos of tests/test_train*.py, by class (test_train_targets holds out others).
CLASSES = {"cat": ("chelsea.png", "astronaut.png"), "coffee": ("coffee.png", "camera.png"),
           "rocket": ("rocket.jpg", "retina.jpg")}


def make_image_folder(root: Path, side: int = 80) -> Path:
    """Three classes of two shipped photos each, shrunk to side×side so a 64 crop sees most of the photo."""
    from PIL import Image

    for label, names in CLASSES.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for name in names:
            image = Image.open(skimage_photo(name)).convert("RGB").resize((side, side), Image.BICUBIC)
            image.save(root / label / f"{Path(name).stem}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained_codec(image_folder, tmp_path_factory) -> Path:
    """A tiny mbt2018-mean trained for 60 steps: a random one rounds every latent to its mean, so its
    reconstructions hold nothing of x for a neck or a U-Net to work with."""
    from comneck_cli.train import CodecTrainConfig, train_codec

    folder = tmp_path_factory.mktemp("codec")
    cfg = CodecTrainConfig(codec="mbt2018-mean", quality=8, data=image_folder, steps=60, batch_size=6, crop=64,
                           config=TINY_CODECS["mbt2018-mean"], lr=5e-3, run_dir=folder / "run", quiet=True,
                           register=None, output=folder / "codec.safetensors", device="cpu")
    return train_codec(cfg).output


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    """Photos scikit-image ships: odd sizes (chelsea 451×300), JPEG, grayscale."""
    names = {"chelsea": "chelsea.png", "coffee": "coffee.png", "astronaut": "astronaut.png",
             "rocket": "rocket.jpg", "camera": "camera.png", "retina": "retina.jpg"}
    return {k: skimage_photo(v) for k, v in names.items()}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """Every test gets its own user registry, and any attempt to reach the network fails loudly."""
    monkeypatch.setenv("COMNECK_HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        raise OSError(f"tests must not use the network (tried {address})")

    monkeypatch.setattr(socket.socket, "connect", guarded)


def make_codec_file(folder: Path, name: str, seed: int = 0, quality: int = 1) -> Path:
    """Write a tiny, randomly initialised codec of architecture ``name`` as a comneck safetensors file."""
    import torch
    from compressai.registry import MODELS

    from comneck_cli.codecs import save_codec

    torch.manual_seed(seed)
    config = TINY_CODECS[name]
    model = MODELS[name](**config).eval()
    path = folder / f"{name}-s{seed}-q{quality}.safetensors"
    save_codec(model, path, name, quality, config)
    return path


@pytest.fixture(scope="session")
def codec_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("codecs")
    return {name: make_codec_file(folder, name) for name in TINY_CODECS}


@pytest.fixture(scope="session")
def vbr_codec_file(tmp_path_factory, photos) -> Path:
    """A tiny mbt2018-mean-vbr trained briefly on shipped photos, so its rate actually follows R (random weights
    code everything to the same few bytes). About 10 s on 2 cores."""
    import shutil

    from comneck_cli.train.codec import CodecTrainConfig, train_codec

    data = tmp_path_factory.mktemp("vbr-data")
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        shutil.copy(photos[name], data / Path(photos[name]).name)
    out = tmp_path_factory.mktemp("vbr") / "vbr.safetensors"
    train_codec(CodecTrainConfig(codec="mbt2018-mean-vbr", config={"N": 16, "M": 24}, data=data, steps=120,
                                 crop=64, batch_size=4, lr=1e-3, output=out, register=None, quiet=True,
                                 run_dir=out.parent / "run"))
    return out


@pytest.fixture(scope="session")
def other_weights(tmp_path_factory) -> Path:
    """Same architecture as codec_files['mbt2018-mean'], different weights: the digest must differ."""
    return make_codec_file(tmp_path_factory.mktemp("other"), "mbt2018-mean", seed=1)


TINY_CLIP = "comneck-tiny-ViT-14"  # tests/tiny_configs: 56 px, patch 14 (4×4 grid), width 64, 4 blocks


@pytest.fixture(scope="session")
def tiny_clip_file(tmp_path_factory) -> Path:
    """A tiny open_clip ViT registered with open_clip and saved as a local weights file."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    open_clip.add_model_config(Path(__file__).parent / "tiny_configs")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def neck_file(tmp_path_factory, codec_files, tiny_clip_file) -> Path:
    """A randomly initialised neck for the tiny mbt2018-mean codec (12 channels) and the tiny CLIP, k = 2."""
    import torch

    from comneck_cli import weights as registry
    from comneck_cli.models.neck import NeckInfo, TransformNeck, save_neck

    torch.manual_seed(0)
    neck = TransformNeck(latent_channels=12, width=64, heads=4, grid=(4, 4))
    info = NeckInfo(codec="mbt2018-mean", quality=1, codec_digest=registry.file_sha256(codec_files["mbt2018-mean"])[:8],
                    clip_model=TINY_CLIP, clip_tag="test", k=2, scenario="d1", config=neck.config)
    path = tmp_path_factory.mktemp("neck") / "neck.safetensors"
    save_neck(neck, path, info)
    return path
