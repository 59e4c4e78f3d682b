"""Issue #30, items 4 and 5: 2407.17060's pre-editing module P (multi-scale, guided by CLIP tokens) and CoTAM's random
per-batch quality masks in `train adapter`. Each test fails when the part it names is undone: P ignoring its
guidance, P not editing at coarse scales, a former P file loading silently, or the adapter's batches coded without
a random mask."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from .conftest import TINY_CLIP
from .test_train import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_file):
    from comneck_cli.clip.tower import load_clip

    return load_clip(TINY_CLIP, "test", weights_file=tiny_clip_file).requires_grad_(False)


def _perturbed_editor(width: int, layers=(1, 2), seed: int = 0):
    """A P whose residual convolution is no longer zero, so its edit is visible."""
    from comneck_cli.models.preedit import PreEditor

    torch.manual_seed(seed)
    editor = PreEditor(width, layers, channels=8)
    with torch.no_grad():
        editor.out.weight.normal_(std=0.3)
    return editor.eval()


def test_p_starts_as_the_identity_and_keeps_size_and_range(tiny_clip):
    from comneck_cli.models.preedit import ClipTokens, PreEditor

    tokens = ClipTokens(tiny_clip, (1, 2))
    x = torch.rand(2, 3, 75, 131)
    grids = tokens.grids(tokens(x))
    with torch.no_grad():
        assert torch.equal(PreEditor(tokens.width, (1, 2), channels=8)(x, grids), x)
        edited = _perturbed_editor(tokens.width)(x, grids)
    assert edited.shape == x.shape and edited.min() >= 0 and edited.max() <= 1
    assert (edited - x).abs().mean() > 1e-3


def test_p_follows_its_clip_guidance(tiny_clip):
    """The same pixels with another image's tokens get another edit, and the edit's gradient reaches the tokens of
    every guiding layer: a P that ignores (or drops a layer of) its guidance fails here."""
    from comneck_cli.models.preedit import ClipTokens

    tokens = ClipTokens(tiny_clip, (1, 2))
    editor = _perturbed_editor(tokens.width)
    x, other = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    own, foreign = tokens.grids(tokens(x)), tokens.grids(tokens(other))
    with torch.no_grad():
        edit_own, edit_foreign = editor(x, own) - x, editor(x, foreign) - x
    assert (edit_own - edit_foreign).abs().mean() > 0.1 * edit_own.abs().mean()
    grids = [g.clone().requires_grad_(True) for g in own]
    editor(x, grids).sum().backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in grids)


def test_p_edits_at_coarse_scales(tiny_clip):
    """Multi-scale: a change of the guidance on the top-left token alone moves pixels far outside that token's
    14×14 area, through the 1/2 and 1/4 scales; the same network at full resolution only (``scales=1``) does not."""
    from comneck_cli.models.preedit import ClipTokens

    tokens = ClipTokens(tiny_clip, (1, 2))
    editor = _perturbed_editor(tokens.width)
    x = torch.rand(1, 3, 56, 56)  # the tiny tower's size: 4×4 tokens of 14 px
    grids = tokens.grids(tokens(x))
    nudged = [g.clone() for g in grids]
    for g in nudged:
        g[..., 0, 0] += 5 * g.std()  # the top-left token only
    with torch.no_grad():
        moved = (editor(x, nudged) - editor(x, grids)).abs().sum(dim=1)[0]
    # bilinear upsampling and the full-resolution layers alone reach 22 px (scales=1); the 1/2 and 1/4 scales reach 38
    assert moved[30:, 30:].sum() > 0


def test_joint_training_teaches_p_to_use_its_guidance(photos, vbr_codec_file, tiny_clip_file, tiny_clip, tmp_path):
    """After a few joint steps (`train vbr --pre-edit`) P's edit depends on the tokens it is given."""
    from comneck_cli.models.preedit import ClipTokens, load_preedit
    from comneck_cli.train.vbr import VbrTrainConfig, train_vbr

    data = tmp_path / "data"
    data.mkdir()
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        shutil.copy(photos[name], data / photos[name].name)
    out = tmp_path / "vbr.safetensors"
    train_vbr(VbrTrainConfig(init=vbr_codec_file, data=data, steps=6, crop=64, batch_size=4, pre_edit=True,
                             gamma=0.0, beta=0.3, rank_weight=0.0, lr=3e-4, pre_edit_lr=1e-3, clip_model=TINY_CLIP,
                             clip_tag="test", clip_weights=tiny_clip_file, quiet=True, device="cpu", output=out,
                             register=None, pre_edit_register=None, run_dir=tmp_path / "run"))
    editor, info = load_preedit(tmp_path / "vbr.preedit.safetensors")
    assert info.config["scales"] == 3 and info.config["layers"] == [1, 2]
    tokens = ClipTokens(tiny_clip, info.config["layers"])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        grids = tokens.grids(tokens(x))
        swapped = [g.flip(0) for g in grids]
        own, other = editor(x, grids) - x, editor(x, swapped) - x
    assert own.abs().mean() > 1e-4  # P edits
    assert (own - other).abs().mean() > 0.05 * own.abs().mean()


def test_a_former_blend_file_is_refused_in_one_line(vbr_codec_file, tiny_clip_file, photos, tmp_path):
    from safetensors.torch import save_file

    from comneck_cli.cli import main

    old = tmp_path / "old.preedit.safetensors"
    save_file({"out.bias": torch.zeros(3)}, str(old), metadata={
        "format": "comneck-preedit", "format_version": "1", "codec": "mbt2018-mean-vbr", "codec_digest": "00000000",
        "clip_model": TINY_CLIP, "clip_tag": "test",
        "config": '{"channels": 32, "clip_width": 64, "layers": [1, 2], "smooth": [4, 16]}'})
    result = CliRunner().invoke(main, ["encode", str(photos["coffee"]), "--codec", "mbt2018-mean-vbr", "--weights",
                                       str(vbr_codec_file), "--rate", "4", f"--pre-edit={old}", "--clip-weights",
                                       str(tiny_clip_file), "-o", str(tmp_path / "out.cnk"), "--quiet"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("comneck: error:"), result.output
    assert "format version 1" in lines[0] and "convex blend" in lines[0] and "--pre-edit" in lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "out.cnk").exists()


# --- CoTAM's random quality masks in `train adapter` ------------------------------------------------------------


def test_quality_masks_are_cotams_three_modes():
    from comneck_cli.train.gainmaps import MASK_MODES, quality_mask

    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        mode, mask = quality_mask(generator, (6, 8))
        seen.add(mode)
        assert mask.shape == (6, 8) and mask.min() >= 0 and mask.max() <= 1
        assert np.allclose(mask * 9, np.rint(mask * 9))  # CoTAM's 10 levels
        if mode == "uniform":
            assert np.ptp(mask) == 0
        if mode == "gradient":  # a ramp over all levels
            assert mask.min() == 0 and mask.max() == 1
    assert seen == set(MASK_MODES)


@pytest.fixture
def adapter_data(photos, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("coffee", "chelsea", "astronaut", "rocket"):
        shutil.copy(photos[name], data / photos[name].name)
    return data


def _adapter_config(vbr_codec_file, tiny_clip_file, data, tmp_path, **extra):
    from comneck_cli.train.adapter import AdapterTrainConfig

    return AdapterTrainConfig(codec="mbt2018-mean-vbr", weights=vbr_codec_file, clip_model=TINY_CLIP,
                              clip_tag="none", clip_weights=tiny_clip_file, rates=(3.0, 3.0), warmup_epochs=0.0,
                              batch_size=2, crop=128, data=data, register=None, output=tmp_path / "a.safetensors",
                              quiet=True, device="cpu", run_dir=tmp_path / "run", log_every=1, **extra)


def test_every_batch_is_coded_at_its_own_random_quality_mask(vbr_codec_file, tiny_clip_file, adapter_data, tmp_path,
                                                              monkeypatch):
    """As CoTAM's run_batch: one random mask per batch, the codec run at its gains, the loss weighted by it."""
    from comneck_cli.train import adapter as training
    from comneck_cli.train.loop import read_metrics

    calls, weights = [], []
    reconstruct, forward = training.reconstruct, training.CotamLoss.forward

    def coded(codec, x, rate, guide, strength=0.0, mask=None):
        out = reconstruct(codec, x, rate, guide, strength, mask)
        plain = reconstruct(codec, x, rate, guide, strength, None)
        calls.append((mask, out, plain))
        return out

    def spy(self, adapter, y_hat, x_hat, m, teacher, final):
        weights.append(m.detach().clone())
        return forward(self, adapter, y_hat, x_hat, m, teacher, final)

    monkeypatch.setattr(training, "reconstruct", coded)
    monkeypatch.setattr(training.CotamLoss, "forward", spy)
    cfg = _adapter_config(vbr_codec_file, tiny_clip_file, adapter_data, tmp_path, steps=6)
    training.train_adapter(cfg)
    assert cfg.gain_maps == 1.0  # CoTAM's default: every batch
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["gain_map"] for r in rows] == [1.0] * 6
    masks = [mask for mask, _, _ in calls]
    assert all(mask is not None and mask[0].shape == (8, 8) for mask in masks)
    assert len({mask[0].tobytes() for mask in masks}) > 1  # a new draw each batch
    varied = 0
    for (mask, (_, y_hat, importance), (_, y_plain, _)), m in zip(calls, weights):
        assert torch.equal(importance[0], importance[1])  # one mask for the whole batch
        assert torch.allclose(m, training.token_weights(importance, (4, 4)))  # the loss is weighted by the mask
        if np.ptp(mask[0]) > 0 and mask[1] > 0.2:  # a varying mask at some strength: gains differ per position
            varied += 1
            assert not torch.equal(y_hat, y_plain)
    assert varied and any(r["mask_spread"] > 0 for r in rows)
    # A resumed or repeated run draws the same masks (functions of seed and step).
    run = training.AdapterRun.__new__(training.AdapterRun)
    run.cfg = cfg
    again = run.quality_mask(0, 128, 128)
    assert np.array_equal(again[1], masks[0][0]) and again[2] == masks[0][1]


def test_mask_share_defaults_and_checks(vbr_codec_file, codec_files, tiny_clip_file, adapter_data, tmp_path):
    from comneck_cli.errors import UsageError
    from comneck_cli.train.adapter import _resolve

    cfg = _adapter_config(vbr_codec_file, tiny_clip_file, adapter_data, tmp_path, steps=1, semantic_strength=1.5)
    _resolve(cfg)
    assert cfg.gain_maps == 0.5  # semantic records get the other half of the steps
    fixed = dict(codec="mbt2018-mean", quality=1, weights=codec_files["mbt2018-mean"])
    cfg = _adapter_config(vbr_codec_file, tiny_clip_file, adapter_data, tmp_path, steps=1)
    for key, value in fixed.items():
        setattr(cfg, key, value)
    _resolve(cfg)
    assert cfg.gain_maps == 0.0  # a fixed-rate codec has no gain to vary
    cfg = _adapter_config(vbr_codec_file, tiny_clip_file, adapter_data, tmp_path, steps=1, gain_maps=0.5)
    for key, value in fixed.items():
        setattr(cfg, key, value)
    with pytest.raises(UsageError, match="`gain_maps` needs a variable-rate codec"):
        _resolve(cfg)
