"""`comneck train neck --targets`: a weighted list of CLIP outputs, so one neck serves several MLLM families."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from comneck_cli.errors import ComneckError

from .conftest import skimage_photo
from .test_train import first_last, one_thread  # noqa: F401 (one_thread: autouse fixture)
from .test_train_neck import CODEC, TINY_CLIP, TINY_CONFIGS, neck_config, tiny_clip_config  # noqa: F401 (fixture)

# Shipped photos the tiny codec and necks never train on (conftest.CLASSES are the training ones).
HELD_OUT = ("motorcycle_left.png", "ihc.png", "hubble_deep_field.jpg", "color.png", "brick.png", "grass.png")


def one_sentence(message: str) -> bool:
    return "\n" not in message and ". " not in message.replace("e.g. ", "")


# ---------------------------------------------------------------- parsing
def test_targets_parse_weights_forms_and_family_names():
    from comneck_cli.train.neck import Target, WeightedTarget, parse_targets

    assert parse_targets("pooled:1,layer-2/patch:1,layer-1/patch:0.5") == (
        WeightedTarget(Target("pooled"), 1.0), WeightedTarget(Target("patch", -2), 1.0),
        WeightedTarget(Target("patch", -1), 0.5))
    assert parse_targets(" pooled , layer3/cls:2e-1 ,projected") == (
        WeightedTarget(Target("pooled"), 1.0), WeightedTarget(Target("cls", 3), 0.2),
        WeightedTarget(Target("projected"), 1.0))
    # Family names stand for what presets.PRESETS says the family reads, on the tower it reads it from.
    families = parse_targets("llava:1,llama-adapter:0.5,clip-embedding:1", "ViT-L-14", "openai")
    assert families == (WeightedTarget(Target("patch", -2), 1.0, "llava"),
                        WeightedTarget(Target("projected"), 0.5, "llama-adapter"),
                        WeightedTarget(Target("pooled"), 1.0, "clip-embedding"))
    assert [str(t) for t in families] == ["llava:1", "llama-adapter:0.5", "clip-embedding:1"]
    assert parse_targets("honeybee", "ViT-L-14", "openai")[0].target == Target("patch", -1)
    assert parse_targets("llava-1.5", "ViT-L-14-336", "openai")[0].target == Target("patch", -2)
    # --target keeps its older spelling, and the new one names the same thing.
    assert Target.parse("patch:-2") == Target.parse("layer-2/patch") == Target("patch", -2)
    assert str(Target("patch", -2)) == "layer-2/patch" and str(Target.parse("pooled:5")) == "pooled"


@pytest.mark.parametrize("text, match", [
    ("", "names no target"),
    ("pooled,,layer-2/patch", "has an empty item"),
    ("hidden:1", "unknown distillation target 'hidden'; use pooled, projected, layerN/patch"),
    ("pooled:heavy", "the weight 'heavy' of `targets` item 'pooled:heavy' is not a number"),
    ("pooled:", "the weight '' of `targets` item 'pooled:' is not a number"),
    ("pooled:0", "must be a positive number, not '0'"),
    ("pooled:-1", "must be a positive number"),
    ("pooled:nan", "must be a positive number"),
    ("pooled:inf", "must be a positive number"),
    ("patch:-2", "is ambiguous .* write layer-2/patch:WEIGHT instead"),
    ("layer-2/pooled:1", "after layerN/ use patch, cls or all"),
    ("layerx/patch", "unknown distillation target 'layerx/patch'"),
    ("llava:1,shikra:1", r"names layer-2/patch twice \(llava and shikra\); give it once, with the summed weight"),
    ("layer-2/patch,llava", "names layer-2/patch twice"),
    ("llava-1.5", "reads CLIP ViT-L-14-336/openai, but this neck trains against ViT-L-14/openai; train it with "
                  "`clip_model` ViT-L-14-336 `clip_tag` openai, or name the features it reads \\(layer-2/patch\\)"),
])
def test_targets_errors_are_one_sentence(text, match):
    from comneck_cli.train.neck import parse_targets

    with pytest.raises(ComneckError, match=match) as caught:
        parse_targets(text, "ViT-L-14", "openai")
    assert one_sentence(str(caught.value)), str(caught.value)


SELECTIONS = st.one_of(st.sampled_from(["pooled", "projected", "llava", "honeybee", "llama-adapter"]),
                       st.builds(lambda layer, select: f"layer{layer}/{select}", st.integers(-30, 30),
                                 st.sampled_from(["patch", "cls", "all"])))


@given(st.lists(st.tuples(SELECTIONS, st.floats(1e-6, 1e6, allow_nan=False)), min_size=1, max_size=5))
def test_targets_parse_what_they_print(items):
    """Any list of distinct selections with positive weights parses to itself, and prints back to the same list."""
    from comneck_cli.train.neck import parse_targets

    text = ",".join(f"{name}:{weight!r}" for name, weight in items)
    try:
        terms = parse_targets(text, "ViT-L-14", "openai")
    except ComneckError as exc:
        assert "twice" in str(exc)  # e.g. llava and layer-2/patch
        return
    assert [t.weight for t in terms] == [w for _, w in items]
    assert [t.family or str(t.target) for t in terms] == [n for n, _ in items]
    assert parse_targets(",".join(str(t) for t in terms), "ViT-L-14", "openai") == tuple(
        type(t)(t.target, float(f"{t.weight:g}"), t.family) for t in terms)


def test_weighted_distillation_is_the_weighted_sum_and_one_target_is_plain_distillation():
    from comneck_cli.train.losses import distillation, weighted_distillation

    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(2, 5, 3, generator=g) for _ in range(4))
    total, parts = weighted_distillation([a, c], [b, d], [1.0, 0.5])
    assert torch.allclose(total, distillation(a, b) + 0.5 * distillation(c, d))
    assert [p.item() for p in parts] == [distillation(a, b).item(), distillation(c, d).item()]
    assert torch.equal(weighted_distillation([a], [b], [1.0])[0], distillation(a, b))


# ---------------------------------------------------------------- training
def test_multi_target_loss_decreases_and_the_neck_records_its_targets(trained_codec, image_folder, tmp_path):
    from comneck_cli import weights as registry

    from comneck_cli.train import train_neck
    from comneck_cli.train.loop import read_metrics

    targets = "pooled:1,layer-2/patch:1,projected:0.5"
    cfg = neck_config("d1", trained_codec, image_folder, tmp_path, steps=(0, 0, 40), lr=(3e-3,), targets=targets,
                      register="{codec}-q{quality}-neck{suffix}")
    train_neck(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    parts = ["dist[pooled]", "dist[layer-2/patch]", "dist[projected]"]
    for row in rows:  # the logged loss is the weighted sum of the per-target MSEs
        assert row["dist"] == pytest.approx(row[parts[0]] + row[parts[1]] + 0.5 * row[parts[2]], rel=1e-5)
    for key in ["dist", *parts]:
        first, last = first_last(rows, key)
        assert last < 0.8 * first, (key, first, last)
    entry = registry.lookup("mbt2018-mean-q8-neck")
    assert entry.info["targets"] == [{"target": "pooled", "weight": 1.0, "family": None},
                                     {"target": "layer-2/patch", "weight": 1.0, "family": None},
                                     {"target": "projected", "weight": 0.5, "family": None}]


def test_target_errors_before_training(trained_codec, image_folder, tmp_path):
    from comneck_cli.train import train_neck

    cases = [
        (dict(target="pooled", targets="pooled:1"), "`target` pooled and `targets` pooled:1 both given"),
        (dict(targets="pooled,layer1/patch"), r"layer 1 \(the output of block 1\) is computed inside C's first k=2"),
        (dict(targets="pooled,layer-9/cls"), "hidden-state layer -9 does not exist"),
        (dict(targets="pooled,projected", crop=128), "target projected compares tokens, .* use `crop` 64"),
        (dict(targets="llava"), f"reads CLIP ViT-L-14/openai, but this neck trains against {TINY_CLIP}/None"),
        (dict(target="clip-embedding"), "reads CLIP ViT-L-14/openai"),
    ]
    for settings, match in cases:
        with pytest.raises(ComneckError, match=match) as caught:
            train_neck(neck_config("d1", trained_codec, image_folder, tmp_path, steps=(1, 1, 1), **settings))
        assert one_sentence(str(caught.value)), str(caught.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_train_neck_targets(trained_codec, image_folder, tmp_path):
    from comneck_cli.cli.train_commands import train

    from .test_train_neck import scratch_neck

    out = tmp_path / "neck.safetensors"
    args = ["neck", "--scenario", "d2", "--codec", CODEC, "-q", "8", "--codec-weights", str(trained_codec),
            "--neck-init", str(scratch_neck(tmp_path, codec_file=trained_codec)), "--data", str(image_folder),
            "--clip-config", str(TINY_CONFIGS), "--clip-model", TINY_CLIP,
            "--clip-tag", "none", "--steps", "1", "--lr", "1e-3", "--batch-size", "3", "--crop", "64",
            "-o", str(out), "--no-register", "--device", "cpu", "--workers", "0"]
    result = CliRunner().invoke(train, args + ["--targets", "layer-1/patch:2,pooled:1", "--log-every", "1"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "neck.run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"dist[layer-1/patch]", "dist[pooled]"} <= set(r) for r in rows) and rows[1]["stage"] == "joint"

    bad = CliRunner().invoke(train, args + ["--targets", "pooled:0"])
    assert bad.exit_code == 1
    assert bad.output.strip() == ("comneck: error: the weight of --targets item 'pooled:0' must be a positive "
                                  "number, not '0'")


def test_a_checkpoint_from_before_targets_resumes(trained_codec, image_folder, tmp_path, monkeypatch):
    """A checkpoint whose config has only ``target`` (as every run before --targets wrote) resumes exactly."""
    from comneck_cli.train import checkpoint, train_neck

    kw = dict(steps=(0, 0, 4), lr=(3e-3,), batch_size=4, target="layer-1/patch")
    train_neck(neck_config("d1", trained_codec, image_folder, tmp_path / "a", **kw))

    real_save = checkpoint.save

    def save_as_before_then_crash(path, state):
        state["config"].pop("targets")
        real_save(path, state)
        raise KeyboardInterrupt("simulated crash after the step-2 checkpoint")

    monkeypatch.setattr(checkpoint, "save", save_as_before_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_neck(neck_config("d1", trained_codec, image_folder, tmp_path / "b", checkpoint_every=2, **kw))
    monkeypatch.setattr(checkpoint, "save", real_save)
    ckpt = tmp_path / "b" / "run" / "checkpoint.pt"
    assert "targets" not in checkpoint.load(ckpt, "neck")["config"]
    train_neck(neck_config("d1", trained_codec, image_folder, tmp_path / "b", steps=None, batch_size=None,
                           lr=None, resume=ckpt))
    a, b = (checkpoint.load(tmp_path / run / "run" / "checkpoint.pt", "neck") for run in ("a", "b"))
    assert a["step"] == b["step"] == 4
    for key, value in a["neck"].items():
        assert torch.equal(value, b["neck"][key]), key


# ---------------------------------------------------------------- the measurement (issue #12)
def held_out_crops(side: int = 64) -> torch.Tensor:
    """Each held-out photo shrunk to 80×80 as the training folder's are, then its centre and four corner crops."""
    from PIL import Image

    crops = []
    for name in HELD_OUT:
        image = Image.open(skimage_photo(name)).convert("RGB").resize((80, 80), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        for top, left in ((8, 8), (0, 0), (0, 16), (16, 0), (16, 16)):
            crops.append(x[:, top:top + side, left:left + side])
    return torch.stack(crops)


def feature_errors(neck_file: Path, codec_file: Path, clip_file: Path, x: torch.Tensor) -> dict[str, float]:
    """MSE of C'(T(y_hat)) against C(x) on held-out crops: layer -2 patch tokens, and the projected embedding."""
    from comneck_cli.clip.tower import load_clip, split_clip
    from comneck_cli.codecs import load_codec
    from comneck_cli.models.neck import load_neck
    from comneck_cli.train.latents import frozen_latents
    from comneck_cli.clip.teacher import Target, Teacher, select_target, tail_request

    clip = load_clip(TINY_CLIP, None, weights_file=clip_file)
    head, tail = split_clip(clip, 2)
    codec = load_codec(CODEC, 8, weights=codec_file)
    neck, _ = load_neck(neck_file)
    targets = (Target("patch", -2), Target("pooled"))
    with torch.no_grad():
        teacher = Teacher(clip, head, tail, targets)(x)
        features = tail(neck(frozen_latents(codec.model, codec.spec.family, x)), **tail_request(targets))
        student = [select_target(features, t) for t in targets]
    mse = [torch.nn.functional.mse_loss(s, t).item() for s, t in zip(student, teacher)]
    return {"layer-2/patch": mse[0], "pooled": mse[1]}


def test_penultimate_tokens_among_the_targets_lower_their_error(trained_codec, image_folder, tmp_path,
                                                                 tiny_clip_file):
    """Same seed, same steps: the neck that also matches hidden state -2's patch tokens reproduces them on
    held-out photos better than the authors' pooled-only neck."""
    from comneck_cli.train import train_neck

    x = held_out_crops()
    errors = {}
    for targets in ("pooled:1", "pooled:1,layer-2/patch:1"):
        folder = tmp_path / re.sub(r"\W+", "_", targets)
        result = train_neck(neck_config("d1", trained_codec, image_folder, folder, steps=(0, 0, 60), lr=(3e-3,),
                                        clip_weights=tiny_clip_file, targets=targets))
        errors[targets] = feature_errors(result.output, trained_codec, tiny_clip_file, x)
    print(f"\nlayer -2 patch-token MSE vs C(x) on {len(x)} held-out crops ({len(HELD_OUT)} photos), 60 steps:")
    for targets, mse in errors.items():
        print(f"  --targets {targets:<26} patch {mse['layer-2/patch']:.4f}  pooled {mse['pooled']:.4f}")
    pooled_only, with_tokens = errors["pooled:1"], errors["pooled:1,layer-2/patch:1"]
    assert with_tokens["layer-2/patch"] < 0.8 * pooled_only["layer-2/patch"], errors
