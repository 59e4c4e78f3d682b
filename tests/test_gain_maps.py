"""Variable-rate training at spatially varying gains (issue #21 item 3): the maps training draws are the gain maps a
``--semantic`` record carries, each pixel's distortion is weighed by its position's λ, and both trainers use them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from comneck_cli.errors import UsageError

from .conftest import TINY_CODECS
from .test_train import codec_config, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture
def model():
    from compressai.registry import MODELS

    torch.manual_seed(0)
    return MODELS["mbt2018-mean-vbr"](**TINY_CODECS["mbt2018-mean-vbr"]).eval()


@pytest.mark.parametrize("rate", [1.0, 2.5, 3.0, 4.75, 8.0])
def test_lambda_of_a_rates_gain_is_the_rates_lambda(model, rate):
    from comneck_cli.codecs import rate_gain
    from comneck_cli.train.gainmaps import lambda_for_gain
    from comneck_cli.train.vbr import rate_lambda

    assert lambda_for_gain(model, rate_gain(model, rate)).item() == pytest.approx(rate_lambda(model, rate), rel=1e-5)
    # Finer steps cost more distortion weight; beyond the trained gains λ stays at the ends.
    gains = torch.tensor([0.01, 0.15, 0.5, 5.0])
    lams = lambda_for_gain(model, gains)
    assert torch.all(lams[1:] >= lams[:-1])
    assert lams[0].item() == pytest.approx(model.lmbda[0], rel=1e-5)
    assert lams[-1].item() == pytest.approx(model.lmbda[-1], rel=1e-5)


def test_maps_are_the_records_gain_maps_and_reproducible(model):
    from comneck_cli.codecs import rate_gain
    from comneck_cli.train.gainmaps import GainMaps

    x = torch.rand(3, 3, 128, 192)
    maps = GainMaps(model, seed=4, fraction=1.0, max_strength=3.0)
    gains = maps(7, x, 4.0)
    assert gains.shape == (3, 1, 8, 12)
    assert torch.equal(gains, maps(7, x, 4.0))  # a function of (seed, step): a resumed run draws the same
    assert not torch.equal(gains, maps(8, x, 4.0))
    trained = model.Gain.detach().abs()
    assert gains.min() >= trained.min() and gains.max() <= trained.max()
    # Constant on the record's cells of 2×2 positions; varying over the image; centred (in log2) on g_R.
    assert torch.equal(gains, gains[..., ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert all(g.unique().numel() > 1 for g in gains)
    centre = gains.log2().mean(dim=(1, 2, 3))
    assert torch.allclose(centre, rate_gain(model, 4.0).log2().expand(3), atol=0.35)
    assert GainMaps(model, seed=4, fraction=0.0)(7, x, 4.0) is None
    drawn = [GainMaps(model, seed=4, fraction=0.5)(s, x[:1], 4.0) is not None for s in range(200)]
    assert 70 < sum(drawn) < 130


def test_training_codes_at_the_gains_the_encoder_writes(vbr_codec_file):
    """The eval-mode training path at a drawn map gives exactly the y_hat of a --semantic record with that map."""
    from comneck_cli import coding
    from comneck_cli.codecs import load_codec
    from comneck_cli.coding.semantic import gain_map, quantise
    from comneck_cli.train.gainmaps import smooth_field
    from comneck_cli.train.latents import variable_rate_path

    codec = load_codec("mbt2018-mean-vbr", 1, weights=vbr_codec_file).at_rate(3.0)
    image = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
    imap = quantise(smooth_field(torch.Generator().manual_seed(1), (8, 8)), 128, 128, 2.5)
    record = coding.encode(image, codec, importance=imap)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        trained = variable_rate_path(codec.model, x, gain_map(codec.model, 3.0, imap, (8, 8))).y_hat
    plain = variable_rate_path(codec.model, x, gain_map(codec.model, 3.0, quantise(np.zeros((8, 8)), 128, 128, 2.5),
                                                        (8, 8))).y_hat
    assert torch.equal(trained, coding.decode_latents(record, codec))
    assert not torch.equal(plain, trained)


def test_pixel_weights_are_each_positions_lambda_over_the_rates(model):
    from comneck_cli.codecs import rate_gain
    from comneck_cli.train.gainmaps import GainMaps, lambda_for_gain
    from comneck_cli.train.losses import rd_loss

    maps = GainMaps(model, seed=0, fraction=1.0)
    flat = rate_gain(model, 5.0).reshape(1, 1, 1, 1).expand(2, 1, 4, 4)
    assert torch.allclose(maps.pixel_weights(flat, 5.0), torch.ones(2, 1, 64, 64))
    gains = maps(0, torch.rand(2, 3, 64, 64), 5.0)
    weights = maps.pixel_weights(gains, 5.0)
    assert weights.shape == (2, 1, 64, 64)
    expected = lambda_for_gain(model, gains[:, :, 1:2, 2:3]) / lambda_for_gain(model, rate_gain(model, 5.0))
    assert torch.allclose(weights[:, :, 16:32, 32:48], expected.expand(2, 1, 16, 16))
    # The loss weighs each pixel's squared error by its weight (a finer step costs more distortion).
    x, x_hat, bpp = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), torch.tensor(0.5)
    loss, mse = rd_loss(bpp, x_hat, x, 0.01, weights)
    assert loss.item() == pytest.approx(0.5 + 0.01 * 255**2 * (weights * (x_hat - x) ** 2).mean().item(), rel=1e-5)
    assert mse.item() == pytest.approx(((x_hat - x) ** 2).mean().item(), rel=1e-6)


def test_train_codec_steps_at_gain_maps(image_folder, tmp_path, monkeypatch):
    """Half the variable-rate steps by default go through the variable-rate path at a (B, 1, h, w) gain map and are
    logged; with --gain-maps 0 none does."""
    from comneck_cli.train import latents, train_codec
    from comneck_cli.train.loop import read_metrics

    seen = []
    original = latents.variable_rate_path

    def spy(model, x, gain):
        seen.append(tuple(gain.shape))
        return original(model, x, gain)

    monkeypatch.setattr("comneck_cli.train.codec.variable_rate_path", spy)
    train_codec(codec_config("mbt2018-mean-vbr", image_folder, tmp_path / "a", quality=None, steps=12))
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert sum(r["gain_map"] for r in rows) == len(seen) > 0
    assert all(shape == (3, 1, 4, 4) for shape in seen)
    seen.clear()
    train_codec(codec_config("mbt2018-mean-vbr", image_folder, tmp_path / "b", quality=None, steps=6, gain_maps=0.0))
    assert not seen and not any(r["gain_map"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl"))


def test_settings_are_checked_and_old_runs_resume_without_maps(image_folder, tmp_path):
    from comneck_cli.train import train_codec
    from comneck_cli.train.gainmaps import check_settings

    with pytest.raises(UsageError, match="`gain_maps` needs a variable-rate codec"):
        train_codec(codec_config("mbt2018-mean", image_folder, tmp_path / "f", gain_maps=0.5))
    with pytest.raises(UsageError, match="reads CLIP attention"):
        check_settings(0.5, 3.0, "clip", True, False)
    with pytest.raises(UsageError, match=r"in \[0, 1\]"):
        check_settings(1.5, 3.0, "random", True, True)
    # A checkpoint from before gain maps (no such setting) resumes without them.
    run = tmp_path / "old"
    train_codec(codec_config("mbt2018-mean-vbr", image_folder, run, quality=None, steps=2, gain_maps=0.0))
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    for key in ("gain_maps", "gain_map_strength", "gain_map_source"):
        del state["config"][key]
    torch.save(state, run / "checkpoint.pt")
    again = codec_config("mbt2018-mean-vbr", image_folder, run, quality=None, steps=4, config=None, lr=None,
                         batch_size=None, crop=None, resume=run / "checkpoint.pt")
    train_codec(again)
    assert again.gain_maps == 0.0


def test_cli_options(image_folder, tmp_path):
    from comneck_cli.cli import main

    out = tmp_path / "c.safetensors"
    args = ["train", "codec", "--codec", "mbt2018-mean-vbr", "--data", str(image_folder), "--steps", "2",
            "--batch-size", "2", "--crop", "64", "--config", '{"N": 8, "M": 12}', "-o", str(out), "--no-register",
            "--quiet", "--gain-maps", "1", "--gain-map-strength", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and out.exists(), result.output
    bad = CliRunner().invoke(main, ["train", "codec", "--codec", "mbt2018-mean", "-q", "1", "--data",
                                    str(image_folder), "--steps", "1", "--gain-maps", "0.5", "--no-register",
                                    "-o", str(tmp_path / "d.safetensors")])
    assert bad.exit_code == 2 and "--gain-maps needs a variable-rate codec" in bad.output, bad.output


@pytest.mark.slow
def test_train_vbr_reads_clip_importance_maps(photos, vbr_codec_file, tiny_clip_file, tmp_path, monkeypatch):
    """With --gain-map-source clip every mapped image's importance is the encoder's own (Guide.importance on the
    training CLIP), and the loss weighs pixels by their λ (γ > 0): the logged loss is R + λ_R(γ·D_w + β·L_sem)."""
    import shutil

    from comneck_cli.cli import main
    from comneck_cli.coding.semantic import Guide
    from comneck_cli.train.loop import read_metrics

    from .test_train_vbr import train_args

    data = tmp_path / "data"
    data.mkdir()
    for name in ("chelsea", "coffee"):
        shutil.copy(photos[name], data)
    calls = []
    original = Guide.importance

    def spy(self, image):
        calls.append(image.shape)
        return original(self, image)

    monkeypatch.setattr(Guide, "importance", spy)
    args = [a for a in train_args(data, vbr_codec_file, tiny_clip_file, tmp_path / "v.safetensors", 4) if a != "--pre-edit"]
    result = CliRunner().invoke(main, [*args, "--gain-maps", "1", "--gain-map-source", "clip", "--batch-size", "2",
                                       "--rank-weight", "0", "--no-register", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["gain_map"] == 1 for r in rows)
    assert calls == [(64, 64, 3)] * 8  # 4 steps × 2 images, each a uint8 crop as the encoder reads it
