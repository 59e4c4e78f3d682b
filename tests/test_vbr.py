"""The variable-rate codec: one model, any rate R, the rate stored in the record, a bpp target met by search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from comneck_cli import coding as api
from comneck_cli.codecs import load_codec
from comneck_cli.io.images import read_image
from comneck_cli.formats import CnkError, pack, unpack


@pytest.fixture(scope="module")
def vbr(vbr_codec_file):
    return load_codec("mbt2018-mean-vbr", 3, weights=vbr_codec_file)


def test_bpp_rises_monotonically_with_rate(vbr, photos):
    image = read_image(photos["coffee"])
    rates = [1, 1.5, 2, 3, 4.25, 5, 6.5, 8]
    bpps = [api.encode(image, vbr.at_rate(r)).bits_per_pixel for r in rates]
    assert all(a < b for a, b in zip(bpps, bpps[1:])), dict(zip(rates, bpps))


@pytest.mark.parametrize("rate", [1, 2.718, 8])
def test_decoder_recovers_the_encoders_latents_at_any_rate(vbr, photos, rate):
    image = read_image(photos["chelsea"])
    codec = vbr.at_rate(rate)
    strings, y_hat = codec.compress(api.to_tensor(image, 64))
    record = unpack(pack(api.encode(image, codec)))
    assert record.rate == round(rate * 1000)
    decoder = api.CodecCache(weights=vbr.source).for_record(record)
    assert decoder.rate == pytest.approx(round(rate, 3))
    assert torch.equal(api.decode_latents(record, decoder), y_hat)


def test_a_record_is_refused_at_another_rate(vbr, photos):
    record = api.encode(read_image(photos["chelsea"]), vbr.at_rate(2))
    with pytest.raises(Exception, match="rate 2, not 5"):
        api.decode_latents(record, vbr.at_rate(5))


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_bpp_target_is_met_within_five_percent(vbr, photos, fraction):
    """Targets spread over what the (tiny) model reaches for each photo, between its lowest and highest rate."""
    for name in ("coffee", "astronaut", "rocket"):
        image = read_image(photos[name])
        low, high = (api.encode(image, vbr.at_rate(r)).bits_per_pixel for r in (1, 8))
        target = low * (high / low) ** fraction
        record = api.encode_to_bpp(image, vbr, target)
        assert abs(record.bits_per_pixel - target) <= 0.05 * target, (name, target, record.bits_per_pixel)


def test_bpp_target_out_of_reach_gives_the_end_of_the_range(vbr, photos):
    record = api.encode_to_bpp(read_image(photos["coffee"]), vbr, 1e-4)
    assert record.rate == 1000


def test_rate_section_is_critical_and_two_bytes():
    from comneck_cli.formats.container import TAG_RATE, CRITICAL_BIT

    assert TAG_RATE & CRITICAL_BIT
    record = unpack(pack(api.Record(codec_id=12, quality=3, weights_digest=b"abcd", height=5, width=7,
                                    strings=(b"x", b"y"), rate=3250)))
    assert record.rate == 3250
    with pytest.raises(CnkError):
        api.Record(codec_id=12, quality=3, weights_digest=b"abcd", height=5, width=7, strings=(b"x",), rate=70000)


def test_cli_rate_and_bpp_target(vbr_codec_file, photos, tmp_path):
    from click.testing import CliRunner

    from comneck_cli.cli import main

    runner = CliRunner()
    args = ["encode", str(photos["coffee"]), "--codec", "mbt2018-mean-vbr", "--weights", str(vbr_codec_file)]
    out = runner.invoke(main, [*args, "--rate", "4.5", "-o", str(tmp_path / "r.cnk"), "--quiet"])
    assert out.exit_code == 0, out.output
    assert unpack((tmp_path / "r.cnk").read_bytes()).rate == 4500
    out = runner.invoke(main, [*args, "--bpp-target", "0.3", "-o", str(tmp_path / "b.cnk"), "--quiet"])
    assert out.exit_code == 0, out.output
    assert abs(unpack((tmp_path / "b.cnk").read_bytes()).bits_per_pixel - 0.3) <= 0.015
    out = runner.invoke(main, ["decode", str(tmp_path / "b.cnk"), "--weights", str(vbr_codec_file),
                               "-o", str(tmp_path / "b.png"), "--quiet"])
    assert out.exit_code == 0, out.output
    for bad, message in ((["--rate", "9"], "between 1 and 8"), (["--rate", "2", "--bpp-target", "1"], "not both"),
                         (["--bpp-target", "0"], "positive")):
        out = runner.invoke(main, [*args, *bad, "-o", str(tmp_path / "x.cnk")])
        assert out.exit_code != 0 and message in out.output and "Traceback" not in out.output
        assert not (tmp_path / "x.cnk").exists()
    out = runner.invoke(main, ["encode", str(photos["coffee"]), "--codec", "mbt2018-mean", "--rate", "2"])
    assert out.exit_code != 0 and "variable-rate" in out.output


def test_weights_import_half_keeps_coding_exact(vbr_codec_file, photos):
    """--half stores g_a/g_s/h_a/h_s in float16: half the transform bytes, entropy models untouched, and records
    coded with the halved file decode to exactly the encoder's y_hat."""
    from click.testing import CliRunner
    from safetensors import safe_open

    from comneck_cli import weights as registry
    from comneck_cli.cli import main

    out = CliRunner().invoke(main, ["weights", "import", "mbt2018-mean-vbr", str(vbr_codec_file), "--half"])
    assert out.exit_code == 0, out.output
    entry = registry.lookup("mbt2018-mean-vbr")
    assert entry.kind == "codec" and entry.info["dtype"] == "float16"
    with safe_open(str(entry.path()), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert {d for k, d in dtypes.items() if k.startswith("g_a.") and k.endswith("weight")} == {torch.float16}
    assert dtypes["gaussian_conditional.scale_table"] == torch.float32
    assert entry.path().stat().st_size < vbr_codec_file.stat().st_size  # tiny model: its entropy tables dominate
    codec = load_codec("mbt2018-mean-vbr", 4)  # from the registry, by its bare name
    assert codec.source == entry.path()
    image = read_image(photos["coffee"])
    _, y_hat = codec.compress(api.to_tensor(image, 64))
    record = unpack(pack(api.encode(image, codec)))
    assert torch.equal(api.decode_latents(record, api.CodecCache().for_record(record)), y_hat)
    refused = CliRunner().invoke(main, ["weights", "import", "x-neck", str(vbr_codec_file), "--kind", "neck", "--half"])
    assert refused.exit_code == 2 and "codec files only" in refused.output


def test_batch_encode_rate_and_bpp_target_resume(vbr_codec_file, photos, tmp_path):
    """`batch encode --rate/--bpp-target`: records at that rate (or bpp), skipped on a rerun, redone when changed."""
    import shutil

    from comneck_cli.cli import main
    from comneck_cli.formats import read_file

    src = tmp_path / "in"
    src.mkdir()
    for name in ("coffee", "chelsea"):
        shutil.copy(photos[name], src / Path(photos[name]).name)
    runner = CliRunner()
    base = ["batch", "encode", "--input", str(src), "--output", str(tmp_path / "out"), "--codec", "mbt2018-mean-vbr",
            "--weights", str(vbr_codec_file), "--quiet"]
    assert runner.invoke(main, [*base, "--rate", "2.5"]).exit_code == 0
    records = [read_file(p)[0] for p in sorted((tmp_path / "out").rglob("*.cnk"))]
    assert [r.rate for r in records] == [2500, 2500]
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.cnk")}
    assert runner.invoke(main, [*base, "--rate", "2.5"]).exit_code == 0
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.cnk")}  # skipped: already done
    target = read_file(sorted((tmp_path / "out").rglob("*.cnk"))[0])[0].bits_per_pixel * 1.3
    assert runner.invoke(main, [*base, "--bpp-target", f"{target:.4f}"]).exit_code == 0
    first = read_file(sorted((tmp_path / "out").rglob("*.cnk"))[0])[0]
    assert first.rate != 2500 and abs(first.bits_per_pixel - target) <= 0.05 * target
