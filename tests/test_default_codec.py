"""The codec shipped in weights/ (issue #10): a fresh, offline install encodes and decodes with no codec named."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from comneck_cli import weights as registry
from comneck_cli.cli import main
from comneck_cli.defaults import DEFAULT_CODEC
from comneck_cli.io.images import read_image

SHIPPED = Path(registry.__file__).parent
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # default_codec.py and evalset.py


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

    from comneck_cli.formats import unpack

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
def test_bpp_target_within_five_percent_on_scikit_image_photos(photos, target):
    from comneck_cli import coding as api
    from comneck_cli.codecs import load_codec

    codec = load_codec(DEFAULT_CODEC, 3)
    for name in ("chelsea", "coffee", "astronaut"):
        record = api.encode_to_bpp(read_image(photos[name]), codec, target)
        assert abs(record.bits_per_pixel - target) <= 0.05 * target, (name, record.bits_per_pixel, record.rate)


@pytest.mark.slow  # about 25 s of CPU
def test_the_shipped_codec_measured_now_beats_jpeg_and_the_card_writer_prints_the_measurement(tmp_path):
    """A fresh measurement (never numbers read from a committed file): the shipped file on two small crops at
    three rates, JPEG on the same crops; then the model card's results block written from it."""
    import default_codec

    from comneck_cli.codecs import load_codec

    entry = registry.entries()[DEFAULT_CODEC]
    assert registry.file_sha256(Path(load_codec(DEFAULT_CODEC, 1).source)) == entry.sha256  # the shipped file
    images = default_codec.tiny_images()
    result = default_codec.measure(images, None, (1.0, 5.0, 6.0), range(2, 101, 6), ("jpeg",))
    rows, curves = result["rows"], result["curves"]
    ours = curves["psnr"][DEFAULT_CODEC]  # 5 and 6: 0.6-0.85 bpp on these crops
    assert [b for b, _ in ours] == sorted({b for b, _ in ours}) and [p for _, p in ours] == sorted(p for _, p in ours)
    jpeg_bpp, jpeg_psnr = zip(*curves["psnr"]["jpeg"])
    compared = [(b, p, float(np.interp(b, jpeg_bpp, jpeg_psnr))) for b, p in ours  # in the old card's bpp range
                if max(jpeg_bpp[0], 0.2) <= b <= 1.0]
    assert compared and all(p > anchor + 1.0 for _, p, anchor in compared), compared  # more dB at the same bpp
    assert result["anchor_better"] == {"jpeg": {"psnr": [], "ms_ssim": []}}  # crops under 161 px: no MS-SSIM

    report = {"codec": DEFAULT_CODEC, "held_out": list(images), "photo_set": "two crops", "bpp_range": [0.1, 2.0],
              "anchors": {"jpeg": "Pillow JPEG"}, "machine": {"cpus": 2}, "seconds": 1.0, "date": "now", **result}
    block = default_codec.card_results(report)
    rate5 = [r for r in rows if r["method"] == DEFAULT_CODEC and r["setting"] == 5.0]
    assert f"| 5 | {np.mean([r['bpp'] for r in rate5]):.3f} | {np.mean([r['psnr'] for r in rate5]):.2f} | n/a |" in block
    assert "| Pillow JPEG | n/a | n/a | none |" in block  # three rates: too few points for a BD-rate
    card = tmp_path / "card.md"
    card.write_text((SHIPPED / f"{DEFAULT_CODEC}.md").read_text())
    default_codec.write_card(card, block)
    text = card.read_text()
    assert text.count(default_codec.CARD_BEGIN) == 1 and block in text
    shipped = (SHIPPED / f"{DEFAULT_CODEC}.md").read_text()
    assert text.split(default_codec.CARD_BEGIN)[0] == shipped.split(default_codec.CARD_BEGIN)[0]  # the rest kept


def test_anchor_better_names_the_rates_where_the_anchor_has_more_quality_at_the_same_bpp():
    import default_codec

    points = [{"setting": 1.0, "bpp": 0.05, "value": 20.0}, {"setting": 2.0, "bpp": 0.3, "value": 31.0},
              {"setting": 3.0, "bpp": 0.6, "value": 31.0}, {"setting": 4.0, "bpp": 0.9, "value": None}]
    anchor = [(0.1, 25.0), (0.5, 30.0), (1.0, 36.0)]  # 27.5 dB at 0.3 bpp, 31.2 at 0.6; none below 0.1
    assert default_codec.anchor_better(points, anchor) == [3.0]
    assert default_codec.in_range([(0.05, 20.0), (0.3, 31.0), (0.6, 30.0), (0.9, 33.0), (2.5, 40.0)]) == \
        [(0.3, 31.0), (0.9, 33.0)]


def test_the_measurement_needs_the_assembled_set_and_says_how_to_get_it(tmp_path):
    """Without the unseen set the benchmark stops at once (before any model loads) and names the script."""
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "default_codec.py"), "--evalset", str(tmp_path),
                           "-o", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and not (tmp_path / "out.json").exists()
    import evalset

    count = len(evalset.read_listing()["photos"])
    assert proc.stderr.strip().startswith(f"default_codec: the evaluation set in {tmp_path} lacks {count} of {count} ")
    assert proc.stderr.strip().endswith("run `python benchmarks/evalset.py` first")


@pytest.mark.parametrize("rate", [1.0, 3.4, 8.0])
def test_shipped_codec_decodes_the_encoders_y_hat_whatever_the_thread_count(photos, rate):
    """The float16 file runs in float32: the hyperprior the decoder recomputes must give the encoder's very scales."""
    import torch

    from comneck_cli import coding as api
    from comneck_cli.codecs import load_codec
    from comneck_cli.io.images import to_tensor
    from comneck_cli.formats import PAD_MULTIPLE

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
