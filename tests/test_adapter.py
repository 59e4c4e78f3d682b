"""The CoTAM decoder adapter: light, identity at start, trained with the multi-level loss, applied by decode --for mllm."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from comneck_cli import coding as api
from comneck_cli.models.adapter import DecoderAdapter, adapt, adapter_registry_name, load_adapter
from comneck_cli.codecs import load_codec
from comneck_cli.io.images import read_image
from comneck_cli.formats import pack

from .conftest import TINY_CLIP


def test_adapter_is_light_and_starts_as_the_identity():
    adapter = DecoderAdapter()
    assert sum(p.numel() for p in adapter.parameters()) < 1_000_000
    x = torch.rand(1, 3, 37, 53)
    assert torch.equal(adapter(x), x)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vbr_codec_file, tiny_clip_file, photos):
    """60 steps on 64-px crops of one photo coded at R = 3 (semantic records of strength 1), against the tiny CLIP:
    enough to see the loss fall on that photo (a 4-block random CLIP and a 120-step codec do not generalise)."""
    from comneck_cli.train.adapter import AdapterTrainConfig, train_adapter

    data = tmp_path_factory.mktemp("adapter-data")
    shutil.copy(photos["coffee"], data / "coffee.png")
    out = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    cfg = AdapterTrainConfig(codec="mbt2018-mean-vbr", weights=vbr_codec_file, clip_model=TINY_CLIP, clip_tag="none",
                             clip_weights=tiny_clip_file, layers=(1, -1), semantic_strength=1.0, width=16, blocks=2,
                             rates=(3.0, 3.0), steps=60, lr=3e-3, batch_size=4, crop=64, data=data, output=out, register=None,
                             quiet=True, device="cpu", run_dir=out.parent / "run")
    return cfg, train_adapter(cfg)


def test_training_lowers_the_multilevel_loss_on_an_unseen_view(trained, vbr_codec_file, tiny_clip_file, photos):
    """A smoke test of the trained adapter: the pixel term alone would lower all three errors too, so that each
    CLIP term takes part in training is proven by test_train_adapter (their gradients reach A), not here."""
    from comneck_cli.clip.tower import load_clip
    from comneck_cli.coding.semantic import Guide
    from comneck_cli.train.adapter import MultiLevel, multilevel_loss, reconstruct

    cfg, result = trained
    adapter, info = load_adapter(result.output)
    assert info.codec == "mbt2018-mean-vbr" and info.layers == (1, -1) and info.semantic_strength == 1.0
    assert info.codec_digest == load_codec("mbt2018-mean-vbr", 3, weights=vbr_codec_file).digest.hex()
    clip = load_clip(TINY_CLIP, None, weights_file=tiny_clip_file)
    levels = MultiLevel(clip, (1, -1))
    codec = load_codec("mbt2018-mean-vbr", 3, weights=vbr_codec_file)
    image = read_image(photos["coffee"])[100:292, 200:392]  # a 192-px view, larger than any training crop
    x = api.to_tensor(image, 64)
    x_hat = reconstruct(codec, x, 3.0, Guide(clip), 1.0)
    with torch.no_grad():
        teacher = levels(x)
        before = multilevel_loss(levels, cfg.loss_weights, x_hat, x, teacher)  # untrained = identity
        after = multilevel_loss(levels, cfg.loss_weights, adapter(x_hat), x, teacher)
    assert after["loss"] < 0.85 * before["loss"], (before, after)
    assert all(after[k] < before[k] for k in ("pixel", "shallow", "deep")), (before, after)


def test_decode_for_mllm_applies_the_adapter(trained, vbr_codec_file, tiny_clip_file, photos, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from comneck_cli import weights as registry
    from comneck_cli.cli import main

    _, result = trained
    codec = load_codec("mbt2018-mean-vbr", 3, weights=vbr_codec_file)
    record = api.encode(read_image(photos["chelsea"]), codec.at_rate(2.5))
    (tmp_path / "a.cnk").write_bytes(pack(record))
    runner = CliRunner()
    base = ["decode", str(tmp_path / "a.cnk"), "--weights", str(vbr_codec_file), "--quiet"]
    out = runner.invoke(main, [*base, "--for", "mllm", "-o", str(tmp_path / "none.png")])
    assert out.exit_code == 1 and "no decoder adapter 'mbt2018-mean-vbr-adapter'" in out.output
    assert not (tmp_path / "none.png").exists()
    registry.import_file(adapter_registry_name("mbt2018-mean-vbr"), result.output, "adapter", {})
    out = runner.invoke(main, [*base, "--for", "mllm", "-o", str(tmp_path / "m.png")])
    assert out.exit_code == 0, out.output
    adapter, _ = load_adapter(result.output)
    plain = api.decode(record, codec.at_rate(2.5))
    expected = adapt(adapter, plain)
    assert np.array_equal(read_image(tmp_path / "m.png"), expected)
    assert not np.array_equal(expected, plain)
    out = runner.invoke(main, [*base, "--adapter", str(result.output), "-o", str(tmp_path / "x.png")])
    assert out.exit_code == 1 and "--adapter needs --for mllm" in out.output


def test_adapter_refuses_other_codec_weights(trained, codec_files, photos, tmp_path):
    from click.testing import CliRunner

    from comneck_cli.cli import main

    _, result = trained
    fixed = load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    (tmp_path / "f.cnk").write_bytes(pack(api.encode(read_image(photos["chelsea"]), fixed)))
    out = CliRunner().invoke(main, ["decode", str(tmp_path / "f.cnk"), "--weights", str(codec_files["mbt2018-mean"]),
                                    "--for", "mllm", "--adapter", str(result.output), "-o", str(tmp_path / "f.png")])
    assert out.exit_code == 1 and "was trained on reconstructions of mbt2018-mean-vbr" in out.output
    assert "Traceback" not in out.output and not (tmp_path / "f.png").exists()


def test_train_adapter_command_resumes_and_registers(trained, tmp_path):
    from click.testing import CliRunner

    from comneck_cli import weights as registry
    from comneck_cli.cli import main

    cfg, _ = trained
    args = ["train", "adapter", "--codec", "mbt2018-mean-vbr", "--weights", str(cfg.weights), "--clip-model", TINY_CLIP,
            "--clip-tag", "none", "--clip-weights", str(cfg.clip_weights), "--layers", "1,-1", "--width", "8",
            "--blocks", "1", "--crop", "64", "--batch-size", "2", "--data", str(cfg.data), "--lr", "1e-3",
            "--run-dir", str(tmp_path / "run"), "--quiet", "--device", "cpu", "--workers", "0"]
    out = CliRunner().invoke(main, [*args, "--steps", "2"])
    assert out.exit_code == 0, out.output
    entry = registry.lookup("mbt2018-mean-vbr-adapter")
    assert entry is not None and entry.kind == "adapter"
    out = CliRunner().invoke(main, ["train", "adapter", "--resume", str(tmp_path / "run" / "checkpoint.pt"),
                                    "--steps", "3", "--quiet", "--workers", "0"])
    assert out.exit_code == 0, out.output
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 3
    out = CliRunner().invoke(main, [*args, "--steps", "1", "--loss-weights", "1,2"])
    assert out.exit_code == 1 and "--loss-weights takes 3" in out.output


@pytest.mark.slow
def test_eval_compares_the_cotam_methods(trained, vbr_codec_file, tiny_clip_file, photos, tmp_path):
    """`comneck eval --methods semantic,semantic-adapter`: rates are the semantic records' bytes (map included) and
    the adapter's images are what CLIP sees; without a registered adapter that method is skipped with the reason."""
    import json

    from click.testing import CliRunner
    from PIL import Image

    from comneck_cli import weights as registry
    from comneck_cli.cli.eval_commands import eval_command

    data = tmp_path / "data"
    data.mkdir()
    pixels = read_image(photos["coffee"])
    for n, (y, x) in enumerate([(100, 200), (200, 300)]):
        Image.fromarray(pixels[y : y + 64, x : x + 64]).save(data / f"{n}.png")
    args = ["--data", str(data), "--codec", "mbt2018-mean-vbr", "--qualities", "2,5", "--weights",
            f"q2={vbr_codec_file},q5={vbr_codec_file}", "--clip", TINY_CLIP, "--clip-tag", "none", "--clip-weights",
            str(tiny_clip_file), "--size", "64", "--methods", "reconstruction,semantic,semantic-adapter"]
    out = CliRunner().invoke(eval_command, [*args, "-o", str(tmp_path / "r1")])
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "r1" / "points.json").read_text())
    skipped = {m["name"]: m for m in report["methods"]}["semantic-adapter"]
    assert skipped["status"] != "ok" and "--adapter FILE" in json.dumps(skipped)
    out = CliRunner().invoke(eval_command, [*args, "--adapter", str(trained[1].output), "-o", str(tmp_path / "r0")])
    assert out.exit_code == 0, out.output
    given = json.loads((tmp_path / "r0" / "points.json").read_text())["images"]

    registry.import_file("mbt2018-mean-vbr-adapter", trained[1].output, "adapter", {})
    out = CliRunner().invoke(eval_command, [*args, "-o", str(tmp_path / "r2")])
    assert out.exit_code == 0, out.output
    rows = json.loads((tmp_path / "r2" / "points.json").read_text())["images"]
    untimed = [[{k: v for k, v in r.items() if k != "time"} for r in table] for table in (given, rows)]
    assert untimed[0] == untimed[1]  # --adapter FILE is the registered adapter's evaluation
    codec = load_codec("mbt2018-mean-vbr", 5, weights=vbr_codec_file)
    from comneck_cli.clip.tower import load_clip
    from comneck_cli.coding.semantic import Guide, semantic_map

    guide = Guide(load_clip(TINY_CLIP, None, weights_file=tiny_clip_file))
    image = read_image(data / "0.png")
    expected = len(pack(api.encode(image, codec, importance=semantic_map(image, guide, 1.5))))
    got = {r["method"]: r for r in rows if r["image"] == "0.png" and r["point"] == "q5"}
    assert got["semantic"]["bpp"] == got["semantic-adapter"]["bpp"] == 8 * expected / (64 * 64)
    assert got["semantic"]["psnr"] == got["semantic-adapter"]["psnr"]  # people see g_s's output in both
    assert got["semantic"]["feature_mse"] != got["semantic-adapter"]["feature_mse"]  # CLIP sees the adapter's
