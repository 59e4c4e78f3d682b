"""Issue #34: staged codec training. ``lapped-pca-vbr`` starts its entropy model at the blocks' statistics and its
reconstruction offsets at zero; ``train codec --freeze`` holds named parameters fixed; every exported codec has its
bottleneck quantiles fitted to its density (``settle_quantiles``)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from comneck_cli.cli import main
from comneck_cli.codecs import get_spec
from comneck_cli.codecs.lapped import PCA_SCALE, initialise_pca, photo_blocks
from comneck_cli.errors import ComneckError
from comneck_cli.train.checkpoint import seed_everything
from comneck_cli.train.codec import CodecTrainConfig, build_codec, train_codec
from tests.conftest import skimage_photo
from tests.test_lapped_codec import PHOTOS, _photo

TINY = {"N": 8, "M": 24}


def _initialised() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    net = get_spec("lapped-pca-vbr").constructor()(**TINY).eval()
    images = [_photo(n) for n in PHOTOS]
    initialise_pca(net, images)
    return net, images


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / torch.mean((a.clamp(0, 1) - b) ** 2).item())


def test_prior_starts_at_each_channels_statistics():
    net, images = _initialised()
    y = torch.cat([net.g_a(x).detach().flatten(2) for x in images], dim=2)[0]  # (M, blocks)
    with torch.no_grad():
        scales, means = net.h_s(net.h_a(net.g_a(images[0]))).chunk(2, 1)
    # constant over the grid, and each channel's own spread and centre (numpy's population std, float64)
    blocks = photo_blocks(images)
    assert blocks.shape[0] == y.shape[1]
    assert torch.allclose(scales[0, :, 0, 0], y.std(dim=1, unbiased=False), rtol=1e-3, atol=1e-3)
    assert torch.allclose(means[0, :, 0, 0], y.mean(dim=1), rtol=1e-3, atol=1e-3)
    assert (scales - scales[..., :1, :1]).abs().max() == 0


def test_initial_prior_codes_y_in_fewer_bits_than_a_random_one():
    net, images = _initialised()
    x = images[1]

    def y_bits(model) -> float:
        with torch.no_grad():
            return -torch.log2(model(x, stage=2, s=model.levels - 1)["likelihoods"]["y"]).sum().item()

    initial = y_bits(net)
    torch.manual_seed(1)
    net.h_s[-1].reset_parameters()  # the Conv2d default the init replaces
    assert initial < 0.8 * y_bits(net)


def test_top_level_starts_near_the_ceiling():
    """Random reconstruction offsets, fed these channels' large deviations, move y_hat by whole steps."""
    net, images = _initialised()
    x = images[0]
    with torch.no_grad():
        ceiling = _psnr(net.g_s(net.g_a(x)), x)
        top = _psnr(net(x, stage=2, s=net.levels - 1)["x_hat"], x)
    assert top > ceiling - 0.2, (top, ceiling)  # random offsets: 0.8 dB below
    assert PCA_SCALE * net.Gain[-1].item() >= 16  # the top level's step is at most 1/16 of a pixel-unit coefficient


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "photos"
    data.mkdir()
    for name in PHOTOS:
        shutil.copy(skimage_photo(name), data / name)
    return data


def _train(tmp_path: Path, **kwargs) -> Path:
    data = _data(tmp_path)
    torch.set_num_threads(1)
    out = tmp_path / "codec.safetensors"
    train_codec(CodecTrainConfig(codec="lapped-pca-vbr", config=TINY, init_pca=data, data=data, steps=2, crop=64,
                                 batch_size=2, lr=1e-2, output=out, register=None, quiet=True,
                                 run_dir=tmp_path / "run", device="cpu", workers=0, **kwargs))
    return out


@pytest.mark.slow  # about 10 s: two training steps and the export
def test_freeze_holds_the_named_parameters_and_trains_the_rest(tmp_path):
    out = _train(tmp_path, freeze=["g_a", "g_s.linear"])
    trained = load_file(str(out))
    seed_everything(0)  # what the run built before its first step
    start, _ = build_codec(get_spec("lapped-pca-vbr"), None, TINY, None, tmp_path / "photos")
    for name, value in start.state_dict().items():
        if name not in trained or not value.is_floating_point():
            continue
        same = torch.equal(value, trained[name].to(value.dtype))
        if name.startswith(("g_a.", "g_s.linear.")):
            assert same, name
        elif name.startswith(("g_s.residual.", "h_s.")) and name.endswith("weight"):
            assert not same, name


def test_freeze_refuses_a_name_that_matches_nothing(tmp_path):
    data = _data(tmp_path)
    for bad in ("g_x", "g_a.lin"):  # whole dotted parts only: g_a.lin is not g_a.linear
        with pytest.raises(ComneckError, match=f"`freeze` '{bad}' names no parameter of lapped-pca-vbr; its "
                                               "modules are .*g_a"):
            train_codec(CodecTrainConfig(codec="lapped-pca-vbr", config=TINY, init_pca=data, data=data, steps=1,
                                         crop=64, output=tmp_path / "x.safetensors", register=None, quiet=True,
                                         run_dir=tmp_path / "run", device="cpu", workers=0, freeze=[bad]))
    result = CliRunner().invoke(main, ["train", "codec", "--codec", "lapped-pca-vbr", "--config", '{"N": 8, "M": 24}',
                                       "--init-pca", str(data), "--data", str(data), "--steps", "1", "--crop", "64",
                                       "--freeze", "g_x", "--no-register", "-o", str(tmp_path / "y.safetensors"),
                                       "--run-dir", str(tmp_path / "run2"), "--device", "cpu", "--quiet"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "`--freeze` 'g_x' names no parameter" in result.output or "'g_x' names no parameter" in result.output
    assert not (tmp_path / "y.safetensors").exists()


@pytest.mark.slow  # about 10 s
def test_exported_codec_has_settled_quantiles(tmp_path):
    out = _train(tmp_path)
    net = get_spec("lapped-pca-vbr").constructor()(**TINY)
    net.load_state_dict(load_file(str(out)), strict=False)
    # two steps at CompressAI's aux lr leave the quantiles where they started: an aux loss in the hundreds
    assert net.aux_loss().item() < 2.0
