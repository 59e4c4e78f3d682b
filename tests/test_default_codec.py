"""The codec shipped in weights/ (issue #10): a fresh, offline install encodes and decodes with no codec named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from comneck_cli import weights as registry
from comneck_cli.cli import main
from comneck_cli.defaults import DEFAULT_CODEC
from comneck_cli.io.images import read_image
from tests.conftest import skimage_photo

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


@pytest.fixture(scope="module")
def lapped_file(tmp_path_factory) -> Path:
    """A tiny lapped-pca-vbr codec file (two steps from its PCA start): another codec than the shipped one."""
    import shutil

    import torch

    from comneck_cli.train.codec import CodecTrainConfig, train_codec

    data = tmp_path_factory.mktemp("lapped-data")
    for name in ("chelsea.png", "coffee.png"):
        shutil.copy(skimage_photo(name), data / name)
    out = tmp_path_factory.mktemp("lapped") / "lapped.safetensors"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train_codec(CodecTrainConfig(codec="lapped-pca-vbr", config={"N": 8, "M": 24}, init_pca=data, data=data,
                                     steps=2, crop=64, batch_size=2, output=out, register=None, quiet=True,
                                     run_dir=out.parent / "run", device="cpu", workers=0))
    finally:
        torch.set_num_threads(threads)
    return out


def _run(monkeypatch, *args: str) -> dict:
    """benchmarks/default_codec.py's main with these arguments, in this process; the JSON it wrote."""
    import default_codec

    monkeypatch.setattr(sys, "argv", ["default_codec.py", *args])
    default_codec.main()
    return json.loads(Path(args[args.index("-o") + 1]).read_text())


def _no_anchor_sweeps(monkeypatch) -> None:
    import default_codec

    def swept(images, method, qualities):
        raise AssertionError(f"{method} was swept again")

    monkeypatch.setattr(default_codec, "sweep_pillow", swept)


def test_the_codec_is_the_one_the_weights_file_holds_and_another_is_refused(lapped_file, tmp_path, monkeypatch):
    import default_codec

    card = tmp_path / "card.md"
    report = _run(monkeypatch, "--tiny", "--weights", str(lapped_file), "-o", str(tmp_path / "a.json"),
                  "--card", str(card))
    assert report["codec"] == "lapped-pca-vbr" and report["sha256"] == registry.file_sha256(lapped_file)
    assert {r["method"] for r in report["rows"]} == {"lapped-pca-vbr", "jpeg", "webp"}
    assert set(report["curves"]["psnr"]) == {"lapped-pca-vbr", "jpeg", "webp"} and set(report["bd_rate"]) == {
        "jpeg", "webp"}
    assert sorted({r["setting"] for r in report["rows"] if r["method"] == "lapped-pca-vbr"}) == [1.0, 8.0]
    assert report["anchors_from"] is None
    assert card.read_text().count("`lapped-pca-vbr` measured ") == 1

    _no_anchor_sweeps(monkeypatch)  # refused before anything is measured
    with pytest.raises(SystemExit) as stop:
        _run(monkeypatch, "--tiny", "--codec", DEFAULT_CODEC, "--weights", str(lapped_file), "-o",
             str(tmp_path / "b.json"))
    assert stop.value.code == (f"default_codec: --weights {lapped_file} holds codec lapped-pca-vbr, not "
                               f"{DEFAULT_CODEC}; pass --codec lapped-pca-vbr or leave --codec out")
    assert not (tmp_path / "b.json").exists()
    assert default_codec.codec_and_weights("lapped-pca-vbr", str(lapped_file)) == ("lapped-pca-vbr", lapped_file)


def test_anchors_from_an_earlier_results_json_are_not_measured_again(lapped_file, tmp_path, monkeypatch):
    first = _run(monkeypatch, "--tiny", "-o", str(tmp_path / "shipped.json"))  # the shipped codec
    assert first["codec"] == DEFAULT_CODEC
    _no_anchor_sweeps(monkeypatch)
    card = tmp_path / "card.md"
    second = _run(monkeypatch, "--tiny", "--weights", str(lapped_file), "--anchors-from",
                  str(tmp_path / "shipped.json"), "-o", str(tmp_path / "lapped.json"), "--card", str(card))
    assert [r for r in second["rows"] if r["method"] != "lapped-pca-vbr"] == [
        r for r in first["rows"] if r["method"] != DEFAULT_CODEC]
    assert {r["method"] for r in second["rows"]} == {"lapped-pca-vbr", "jpeg", "webp"}
    assert second["anchors_from"] == {"file": str(tmp_path / "shipped.json"), "date": first["date"]}
    assert f"Anchor rows from `{tmp_path / 'shipped.json'}` (measured {first['date']})." in card.read_text()
    assert second["curves"]["psnr"]["jpeg"] == first["curves"]["psnr"]["jpeg"]
    assert second["bd_rate"].keys() == {"jpeg", "webp"}

    # results measured with other qualities and another libjpeg: refused, saying both, before anything is measured
    changed = {**first, "qualities": [50], "anchors": {**first["anchors"], "jpeg": "Pillow 1.0 JPEG (libjpeg_turbo 1)"}}
    (tmp_path / "old.json").write_text(json.dumps(changed))
    with pytest.raises(SystemExit) as stop:
        _run(monkeypatch, "--tiny", "--anchors-from", str(tmp_path / "old.json"), "-o", str(tmp_path / "c.json"))
    message = stop.value.code
    assert message.startswith(f"default_codec: --anchors-from {tmp_path / 'old.json'}: its qualities ([50]) and "
                              f"this run's ({first['qualities']}) differ; its jpeg anchor (Pillow 1.0 JPEG "
                              f"(libjpeg_turbo 1)) and this run's ({first['anchors']['jpeg']}) differ; ")
    assert "webp" not in message and "\n" not in message and not (tmp_path / "c.json").exists()


def test_a_stopped_run_keeps_the_anchor_rows_when_only_the_codec_changes(lapped_file, tmp_path, monkeypatch):
    """OUTPUT.partial.jsonl: the anchors' rows hold while what they depend on holds, the codec's while its do."""
    import default_codec

    images = default_codec.tiny_images()
    done = tmp_path / "out.partial.jsonl"
    first = default_codec.measure(images, None, (1.0, 8.0), (20, 80), ("jpeg", "webp"), done)
    _no_anchor_sweeps(monkeypatch)
    second = default_codec.measure(images, str(lapped_file), (1.0, 8.0), (20, 80), ("jpeg", "webp"), done,
                                   codec_name="lapped-pca-vbr")
    assert [r for r in second["rows"] if r["method"] != "lapped-pca-vbr"] == [
        r for r in first["rows"] if r["method"] != DEFAULT_CODEC]
    assert {r["method"] for r in second["rows"]} == {"lapped-pca-vbr", "jpeg", "webp"}

    # other qualities: the anchors are swept again, the lapped codec's rows (same file, same rates) are kept
    swept = []
    monkeypatch.setattr(default_codec, "sweep_pillow", lambda images, method, qualities: swept.append(method) or [])

    def coded(images, codec, rates):
        raise AssertionError("the codec was swept again")

    monkeypatch.setattr(default_codec, "sweep_codec", coded)
    third = default_codec.measure(images, str(lapped_file), (1.0, 8.0), (50,), ("jpeg", "webp"), done,
                                  codec_name="lapped-pca-vbr")
    assert sorted(swept) == ["jpeg", "jpeg", "webp", "webp"]  # one sweep per (anchor, photo)
    assert [r for r in third["rows"] if r["method"] == "lapped-pca-vbr"] == [
        r for r in second["rows"] if r["method"] == "lapped-pca-vbr"]
