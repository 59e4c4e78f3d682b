"""Issue #34.1: lapped-pca-vbr starts at the linear optimum. After ``init_pca`` its unquantised g_s(g_a(x)) is exactly
the projection of each 16×16 block on the photos' top M principal components (computed here independently, by SVD),
and it trains, encodes and decodes as a registered variable-rate codec."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from comneck_cli.cli import main
from comneck_cli.codecs import get_spec
from comneck_cli.codecs.lapped import initialise_pca
from comneck_cli.errors import ComneckError
from comneck_cli.train.codec import CodecTrainConfig, train_codec
from tests.conftest import skimage_photo

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png")


def _photo(name: str, side: int = 128) -> torch.Tensor:
    from PIL import Image

    image = Image.open(skimage_photo(name)).convert("RGB").resize((side, side), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)[None]


def test_initialised_codec_is_the_block_pca_projection():
    torch.manual_seed(0)
    m = 24
    net = get_spec("lapped-pca-vbr").constructor()(N=8, M=m).eval()
    images = [_photo(n) for n in PHOTOS]
    initialise_pca(net, images)
    # the reference: SVD of the blocks of x − ½ (rows: 16×16 blocks, HWC inside), projection on the top m vectors
    blocks = np.concatenate([(x[0].permute(1, 2, 0).double().numpy() - 0.5).reshape(8, 16, 8, 16, 3)
                             .transpose(0, 2, 1, 3, 4).reshape(-1, 768) for x in images])
    basis = np.linalg.svd(blocks, full_matrices=False)[2][:m]
    x = images[1]
    expected = ((blocks[64:128] @ basis.T @ basis).reshape(8, 8, 16, 16, 3).transpose(0, 2, 1, 3, 4)
                .reshape(128, 128, 3) + 0.5)
    with torch.no_grad():
        y = net.g_a(x)
        got = net.g_s(y)[0].permute(1, 2, 0).double().numpy()
    assert y.shape == (1, m, 8, 8)
    assert np.abs(got - expected).max() < 1e-4
    # and what the residual branches add is nothing yet, while training can still reach them
    with torch.no_grad():
        assert net.g_a.residual(x).abs().max() == 0 and net.g_s.residual(y).abs().max() == 0


@pytest.mark.slow  # about 11 s: a two-step run, then encode and decode through the CLI
def test_init_pca_trains_encodes_and_decodes(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    for name in PHOTOS:
        shutil.copy(skimage_photo(name), data / name)
    torch.set_num_threads(1)
    out = tmp_path / "lapped.safetensors"
    result = train_codec(CodecTrainConfig(codec="lapped-pca-vbr", config={"N": 8, "M": 24}, init_pca=data, data=data,
                                          steps=2, crop=64, batch_size=2, output=out, register=None, quiet=True,
                                          run_dir=tmp_path / "run", device="cpu", workers=0))
    assert result.output == out
    image = tmp_path / "p.png"
    from PIL import Image

    Image.open(skimage_photo("chelsea.png")).convert("RGB").resize((96, 64)).save(image)
    run = CliRunner()
    coded = run.invoke(main, ["encode", str(image), "--codec", "lapped-pca-vbr", "--weights", str(out), "--rate",
                              "8", "-o", str(tmp_path / "p.cnk")])
    assert coded.exit_code == 0, coded.output
    decoded = run.invoke(main, ["decode", str(tmp_path / "p.cnk"), "--weights", str(out), "-o",
                                str(tmp_path / "d.png")])
    assert decoded.exit_code == 0, decoded.output
    a = np.asarray(Image.open(image), dtype=float)
    b = np.asarray(Image.open(tmp_path / "d.png"), dtype=float)
    assert 10 * np.log10(255**2 / ((a - b) ** 2).mean()) > 20  # two steps from the PCA start: already an image


def test_init_pca_is_for_the_lapped_codec_only(tmp_path):
    shutil.copy(skimage_photo("chelsea.png"), tmp_path / "chelsea.png")
    with pytest.raises(ComneckError, match="lapped-pca-vbr only"):
        train_codec(CodecTrainConfig(codec="mbt2018-mean-vbr", config={"N": 8, "M": 12}, init_pca=tmp_path,
                                     data=tmp_path, steps=1, crop=64, output=tmp_path / "x.safetensors",
                                     register=None, quiet=True, device="cpu"))
