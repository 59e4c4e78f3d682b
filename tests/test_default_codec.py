"""The codec shipped in weights/ (issue #10): a fresh, offline install encodes and decodes with no codec named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import weights as registry
from comneck_cli.cli import main
from comneck_cli.defaults import DEFAULT_CODEC
from comneck_cli.images import read_image

SHIPPED = Path(registry.__file__).parent
ROOT = Path(__file__).resolve().parents[1]


def test_the_default_codec_is_shipped_and_checked():
    entry = registry.entries()[DEFAULT_CODEC]
    assert entry.origin == "shipped" and entry.kind == "codec"
    assert registry.resolve(DEFAULT_CODEC) == SHIPPED / entry.file  # sha256 verified against the manifest
    assert entry.path().stat().st_size < 20 * 2**20
    assert (SHIPPED / f"{DEFAULT_CODEC}.md").is_file() and (SHIPPED / f"{DEFAULT_CODEC}.png").is_file()
    listing = CliRunner().invoke(main, ["codecs"]).output.splitlines()
    assert [line.split()[0] for line in listing if "the default codec" in line] == [DEFAULT_CODEC]


def test_quick_start_runs_offline_on_the_shipped_codec(photos, tmp_path, monkeypatch):
    """README's quick start, verbatim but for the file names: nothing named, nothing downloaded."""
    import torch.hub

    from formats import unpack

    def no_network(*args, **kwargs):
        raise AssertionError("the quick start tried to download something")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    photo = tmp_path / "photo.png"
    photo.write_bytes(Path(photos["coffee"]).read_bytes())
    runner = CliRunner()
    out = runner.invoke(main, ["encode", str(photo), "-q", "3", "--quiet"])
    assert out.exit_code == 0, out.output
    record = unpack((tmp_path / "photo.cnk").read_bytes())
    assert record.codec_name == DEFAULT_CODEC and record.rate == 3000
    out = runner.invoke(main, ["decode", str(tmp_path / "photo.cnk"), "-o", str(tmp_path / "photo_hat.png"), "--quiet"])
    assert out.exit_code == 0, out.output
    original, decoded = read_image(photo), read_image(tmp_path / "photo_hat.png")
    mse = np.mean((original.astype(np.float64) - decoded) ** 2)
    psnr = 10 * np.log10(255**2 / mse)
    assert psnr > 26 and record.bits_per_pixel < 1.0, (psnr, record.bits_per_pixel)


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.4, 0.6, 1.0])
def test_bpp_target_within_five_percent_on_held_out_photos(photos, target):
    from comneck_cli import api
    from comneck_cli.codecs import load_codec

    codec = load_codec(DEFAULT_CODEC, 3)
    for name in ("chelsea", "coffee", "astronaut"):
        record = api.encode_to_bpp(read_image(photos[name]), codec, target)
        assert abs(record.bits_per_pixel - target) <= 0.05 * target, (name, record.bits_per_pixel, record.rate)


def test_model_card_quotes_the_benchmark_of_the_shipped_file():
    """The card's results block is what benchmarks/default_codec.py measured for this very file."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import default_codec

    result = json.loads((ROOT / "benchmarks/results/default_codec.json").read_text())
    entry = registry.entries()[DEFAULT_CODEC]
    assert Path(result["weights"]).name == entry.file and result["sha256"] == entry.sha256
    assert len(result["held_out"]) == len(default_codec.HELD_OUT)
    card = (SHIPPED / f"{DEFAULT_CODEC}.md").read_text()
    assert default_codec.card_results(result) in card
    for anchor in ("jpeg", "webp"):
        assert result["bd_rate"][anchor]["bd_rate_percent"] is not None
    assert result["bd_rate"]["jpeg"]["bd_rate_percent"] < 0  # issue #10: fewer bits than JPEG for the same PSNR


@pytest.mark.parametrize("rate", [1.0, 3.4, 8.0])
def test_shipped_codec_decodes_the_encoders_y_hat_whatever_the_thread_count(photos, rate):
    """The float16 file runs in float32: the hyperprior the decoder recomputes must give the encoder's very scales."""
    import torch

    from comneck_cli import api
    from comneck_cli.codecs import load_codec
    from comneck_cli.images import to_tensor
    from formats import PAD_MULTIPLE

    codec = load_codec(DEFAULT_CODEC, 3).at_rate(rate)
    image = read_image(photos["chelsea"])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        strings, y_hat = codec.compress(to_tensor(image, PAD_MULTIPLE))
        torch.set_num_threads(2)
        record = api.encode(image, codec)
        assert list(record.strings) == strings
        decoded = api.decode_latents(record, codec)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(decoded, y_hat)
