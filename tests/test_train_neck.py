"""`comneck train neck`: the three scenarios with a tiny CLIP and a tiny codec trained here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from comneck_cli.errors import ComneckError

from .conftest import TINY_CODECS
from .test_train import first_last, one_thread  # noqa: F401 (one_thread: autouse fixture)

TINY_CONFIGS = Path(__file__).parent / "tiny_configs"
TINY_CLIP = "comneck-tiny-ViT-14"  # 56 px, patch 14: a 4×4 grid, like the 4×4 latent grid of a 64 crop
CODEC = "mbt2018-mean"


@pytest.fixture(autouse=True)
def tiny_clip_config():
    import open_clip

    open_clip.add_model_config(TINY_CONFIGS)


def scratch_neck(folder: Path, codec: str = CODEC, quality: int = 8, codec_file: Path | None = None) -> Path:
    """A randomly initialised neck file for the tiny CLIP (width 64, 4 heads) and a codec's latent channels: what
    d2/d3 tests start from where the point is not the d1 neck's training."""
    from comneck_cli.codecs import load_codec
    from comneck_cli.models.neck import NeckInfo, TransformNeck, save_neck

    channels = load_codec(codec, quality, weights=codec_file).latent_channels
    torch.manual_seed(0)
    neck = TransformNeck(channels, 64, 4, (4, 4))
    path = folder / f"scratch-neck-{channels}.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    save_neck(neck, path, NeckInfo(codec=codec, quality=quality, codec_digest="0" * 8, clip_model=TINY_CLIP,
                                   clip_tag="none", k=2, scenario="d1", config=neck.config))
    return path


def neck_config(scenario: str, codec_file: Path, data: Path, folder: Path, **kw):
    """d2/d3 start from a scratch neck unless ``neck_init`` is given (None: the registry's d1 neck)."""
    from comneck_cli.train import NeckTrainConfig

    settings = dict(scenario=scenario, codec=CODEC, quality=8, codec_weights=codec_file, data=data,
                    clip_model=TINY_CLIP, clip_tag="none", steps=(30, 30, 30), lr=(3e-3, 1e-3, 1e-3), batch_size=6, crop=64,
                    run_dir=folder / "run", log_every=1, checkpoint_every=1000, quiet=True, register=None,
                    output=folder / "neck.safetensors", device="cpu")
    settings.update(kw)
    if settings["scenario"] != "d1" and "neck_init" not in kw and settings.get("resume") is None:
        settings["neck_init"] = scratch_neck(folder / "init", settings["codec"], settings["quality"], codec_file)
    return NeckTrainConfig(**settings)


def test_d1_cross_entropy_and_distillation_decrease(trained_codec, image_folder, tmp_path):
    from comneck_cli import weights as registry

    from comneck_cli.codecs import load_codec
    from comneck_cli.models.neck import load_neck
    from comneck_cli.train import train_neck
    from comneck_cli.train.loop import read_metrics

    cfg = neck_config("d1", trained_codec, image_folder, tmp_path, register="{codec}-q{quality}-neck{suffix}")
    result = train_neck(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["ce"] * 30 + ["ce+dist"] * 30 + ["dist"] * 30
    assert [r["lr"] for r in rows[::30]] == [3e-3, 1e-3, 1e-3]
    assert "dist" not in rows[0] and "ce" not in rows[-1]
    ce_first, ce_last = first_last(rows[:30], "ce")
    dist_first, dist_last = first_last(rows[30:], "dist")
    assert ce_last < 0.8 * ce_first, (ce_first, ce_last)
    assert dist_last < 0.8 * dist_first, (dist_first, dist_last)
    # the default (release) recipe scales every d1 loss by the authors' 11.52
    assert rows[30]["loss"] == pytest.approx(11.52 * (rows[30]["ce"] + 100 * rows[30]["dist"]), rel=1e-5)

    neck, info = load_neck(result.output)
    codec = load_codec(CODEC, 8, weights=trained_codec)
    assert info.scenario == "d1" and info.codec_digest == codec.digest.hex() and info.k == 2
    assert info.targets == "pooled:1"  # the authors' only target, recorded in the neck file
    assert (info.clip_model, info.clip_tag) == (TINY_CLIP, "none")  # random weights, not "None" (#32.2)
    assert neck.config["grid"] == [4, 4] and neck.config["latent_channels"] == TINY_CODECS[CODEC]["M"]
    # A record the codec writes passes the neck's own compatibility check.
    from comneck_cli import coding as api

    record = api.encode((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8), codec)
    info.check_matches(record.codec_name, record.quality, record.weights_digest, TINY_CLIP, None, 2)
    entry = registry.lookup("mbt2018-mean-q8-neck")  # where `comneck features` looks by default
    assert entry.kind == "neck" and entry.info["codec_digest"] == info.codec_digest
    assert entry.info["stage_steps"] == [30, 30, 30] and entry.info["machine_only"] is False
    assert not list(tmp_path.glob("*.codec.safetensors"))  # d1 leaves the codec alone


def test_trained_neck_beats_an_untrained_one(trained_codec, image_folder, tmp_path):
    """The neck's C'(T(y_hat)) ends closer to C(x) than a fresh neck's, on the same crops."""
    from comneck_cli.clip.tower import load_clip, split_clip
    from comneck_cli.codecs import load_codec
    from comneck_cli.models.neck import TransformNeck, load_neck
    from comneck_cli.train import Target, train_neck
    from comneck_cli.train.data import ImageFolderCrops
    from comneck_cli.train.latents import frozen_latents
    from comneck_cli.clip.teacher import Teacher

    result = train_neck(neck_config("d1", trained_codec, image_folder, tmp_path, steps=(0, 0, 60), lr=(3e-3,)))
    torch.manual_seed(0)  # the run's seed: the same random tiny CLIP
    clip = load_clip(TINY_CLIP, None)
    head, tail = split_clip(clip, 2)
    data = ImageFolderCrops(image_folder, 64)
    x = torch.stack([data[(i, (5, i))][0] for i in range(len(data))])
    codec = load_codec(CODEC, 8, weights=trained_codec)
    with torch.no_grad():
        y_hat = frozen_latents(codec.model, codec.spec.family, x)
        (teacher,) = Teacher(clip, head, tail, Target())(x)
        trained, _ = load_neck(result.output)
        fresh = TransformNeck(**{**trained.config, "grid": tuple(trained.config["grid"])})
        errors = [torch.nn.functional.mse_loss(tail(n(y_hat)).embedding, teacher).item() for n in (trained, fresh)]
    assert errors[0] < 0.5 * errors[1], errors


@pytest.mark.parametrize("scenario", ["d2", "d3"])
def test_retrained_codec_is_exported_and_the_neck_records_its_digest(trained_codec, image_folder, tmp_path, scenario):
    from comneck_cli import weights as registry

    from comneck_cli.codecs import load_codec
    from comneck_cli.models.neck import load_neck
    from comneck_cli.train import train_neck
    from comneck_cli.train.export import is_machine_only
    from comneck_cli.train.loop import read_metrics

    cfg = neck_config(scenario, trained_codec, image_folder, tmp_path, steps=(15, 15, 5),
                      register="{codec}-q{quality}-neck{suffix}")
    result = train_neck(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["dist"] * 15 + ["joint"] * 15 + ["dist"] * 5
    joint = rows[15:30]
    assert all({"bpp", "dist", "aux"} <= set(r) for r in joint)
    assert all(("mse" in r) == (scenario == "d2") for r in joint)
    first, last = first_last(rows[:15], "dist")
    assert last < 0.8 * first, (first, last)
    for r in joint:  # R + λ(γ·MSE + β·L_dist); d3 has no reconstruction term
        recon = cfg.gamma * r.get("mse", 0.0)
        assert r["loss"] == pytest.approx(r["bpp"] + cfg.lmbda * (recon + cfg.beta * r["dist"]), rel=1e-4)

    codec_file = tmp_path / "neck.codec.safetensors"
    assert result.extra["codec_output"] == codec_file
    digest = registry.file_sha256(codec_file)[:8]
    _, info = load_neck(result.output)
    assert info.scenario == scenario and info.codec_digest == digest == result.extra["codec_digest"]
    original, retrained = load_codec(CODEC, 8, weights=trained_codec), load_codec(CODEC, 8, weights=codec_file)
    assert retrained.digest.hex() == digest != original.digest.hex()
    from comneck_cli import coding as api

    record = api.encode((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8), retrained)
    info.check_matches(record.codec_name, record.quality, record.weights_digest, TINY_CLIP, None, 2)
    changed = {name for name, p in retrained.model.named_parameters()
               if not torch.equal(p, dict(original.model.named_parameters())[name])}
    assert any(n.startswith("g_a.") for n in changed)
    # d3 trains the encoder side only: g_s is left exactly as it was.
    assert any(n.startswith("g_s.") for n in changed) == (scenario == "d2")
    assert is_machine_only(codec_file) == (scenario == "d3")
    entry = registry.lookup(f"mbt2018-mean-q8-{scenario}")
    assert entry.kind == "codec" and entry.sha256[:8] == digest and entry.info["machine_only"] == (scenario == "d3")
    assert registry.lookup(f"mbt2018-mean-q8-neck-{scenario}").info["codec_weights"] == f"mbt2018-mean-q8-{scenario}"


def test_encoding_with_a_d3_codec_writes_machine_only_records(trained_codec, image_folder, tmp_path, photos):
    from comneck_cli import coding as api
    from comneck_cli.codecs import load_codec
    from comneck_cli.io.images import read_image
    from comneck_cli.train import train_neck

    train_neck(neck_config("d3", trained_codec, image_folder, tmp_path, steps=(1, 1, 1)))
    codec = load_codec(CODEC, 8, weights=tmp_path / "neck.codec.safetensors")
    record = api.encode(read_image(photos["coffee"])[:64, :64], codec)
    assert record.machine_only is True


@pytest.mark.parametrize("crash_at", [3, 6])
def test_neck_resume_equals_uninterrupted_across_stages(trained_codec, image_folder, tmp_path, monkeypatch, crash_at):
    """d2 killed right after a checkpoint (inside joint training, or in the last stage after it), then
    resumed: neck, codec and optimizers end bit-identical to an uninterrupted run."""
    from comneck_cli.train import checkpoint, train_neck

    steps = (2, 3, 2)
    train_neck(neck_config("d2", trained_codec, image_folder, tmp_path / "a", steps=steps, batch_size=4))

    real_save = checkpoint.save

    def save_then_crash(path, state):
        real_save(path, state)
        if state["step"] == crash_at:
            raise KeyboardInterrupt(f"simulated crash after the step-{crash_at} checkpoint")

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_neck(neck_config("d2", trained_codec, image_folder, tmp_path / "b", steps=steps, batch_size=4,
                               checkpoint_every=crash_at))
    monkeypatch.setattr(checkpoint, "save", real_save)
    ckpt = tmp_path / "b" / "run" / "checkpoint.pt"
    assert checkpoint.load(ckpt, "neck")["step"] == crash_at and not (tmp_path / "b" / "neck.safetensors").exists()
    train_neck(neck_config("d2", trained_codec, image_folder, tmp_path / "b", steps=None, batch_size=None, resume=ckpt))

    a, b = (checkpoint.load(tmp_path / run / "run" / "checkpoint.pt", "neck") for run in ("a", "b"))
    assert a["step"] == b["step"] == 7
    for part in ("neck", "codec"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    for opt in ("optimizer", "codec_optimizer", "aux_optimizer"):
        for i, state in a[opt]["state"].items():
            for k, v in state.items():
                assert torch.equal(v, b[opt]["state"][i][k]), (opt, i, k)
    rows = [(tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines() for run in ("a", "b")]
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]  # noqa: E731
    assert strip(rows[0]) == strip(rows[1])


def test_token_targets_must_fit_the_teachers_grid(trained_codec, image_folder, tmp_path):
    from comneck_cli.train import Target, train_neck

    assert Target.parse("patch:-2") == Target("patch", -2) and str(Target.parse("pooled")) == "pooled"
    with pytest.raises(ComneckError, match="unknown distillation target"):
        Target.parse("hidden:3")
    with pytest.raises(ComneckError, match="use `crop` 64 or a pooled or cls target"):
        train_neck(neck_config("d1", trained_codec, image_folder, tmp_path, crop=128, target="patch:-1"))
    # A hidden-state target that fits trains.
    result = train_neck(neck_config("d1", trained_codec, image_folder, tmp_path, target="patch:-1", steps=(1, 1, 1)))
    assert np.isfinite(result.final["dist"])


def test_cross_entropy_needs_class_folders(trained_codec, image_folder, tmp_path):
    import shutil

    from comneck_cli.train import train_neck

    flat = tmp_path / "flat"
    flat.mkdir()
    for p in image_folder.glob("*/*.png"):
        shutil.copy(p, flat / p.name)
    with pytest.raises(ComneckError, match="one sub-folder of images per class"):
        train_neck(neck_config("d1", trained_codec, flat, tmp_path, steps=(1, 1, 1)))
    # Scenarios without cross-entropy take a flat folder.
    result = train_neck(neck_config("d3", trained_codec, flat, tmp_path, steps=(1, 1, 1)))
    assert result.output.is_file()


def test_cli_train_neck(trained_codec, image_folder, tmp_path):
    from comneck_cli.models.neck import load_neck
    from comneck_cli.cli.train_commands import train

    out = tmp_path / "neck.safetensors"
    args = ["neck", "--scenario", "d1", "--codec", CODEC, "-q", "8", "--codec-weights", str(trained_codec),
            "--data", str(image_folder), "--clip-config", str(TINY_CONFIGS), "--clip-model", TINY_CLIP,
            "--clip-tag", "none", "--steps", "2,1,1", "--lr", "1e-3", "--batch-size", "3", "--crop", "64",
            "--template", "a photo of a {}.", "--template", "a picture of a {}.", "-o", str(out),
            "--device", "cpu", "--workers", "0"]
    result = CliRunner().invoke(train, args)
    assert result.exit_code == 0, result.output
    assert "registered mbt2018-mean-q8-neck" in result.output
    _, info = load_neck(out)
    assert info.scenario == "d1"
    rows = [json.loads(line) for line in (tmp_path / "neck.run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4]  # the end of every stage is logged

    bad = CliRunner().invoke(train, ["neck", "--codec", CODEC, "-q", "8", "--data", str(image_folder),
                                     "--steps", "1,2", "--device", "cpu"])
    assert bad.exit_code == 1 and "--steps takes one value or three" in bad.output


@pytest.mark.parametrize("name", sorted(n for n in TINY_CODECS if not n.endswith("-vbr")))  # vbr: d1 only
def test_every_codec_family_trains_jointly(codec_files, image_folder, tmp_path, name):
    """Frozen, joint and frozen-again stages for each family (the autoregressive one codes its frozen y_hat)."""
    from comneck_cli.codecs import load_codec
    from comneck_cli.models.neck import load_neck
    from comneck_cli.train import train_neck

    cfg = neck_config("d2", codec_files[name], image_folder, tmp_path, steps=(1, 1, 1), codec=name, quality=1)
    result = train_neck(cfg)
    assert all(np.isfinite(v) for v in result.final.values())
    _, info = load_neck(result.output)
    assert load_codec(name, 1, weights=result.extra["codec_output"]).digest.hex() == info.codec_digest


@pytest.mark.parametrize("scenario,extra,flag", [
    ("d2", ["--ce-dist", "1:10"], "--ce-dist"), ("d3", ["--template", "a {}."], "--template"),
    ("d1", ["--lmbda", "0.01"], "--lmbda"), ("d1", ["--gamma", "1"], "--gamma"), ("d1", ["--beta", "1"], "--beta"),
    ("d3", ["--gamma", "1"], "--gamma"),
])
def test_options_a_scenario_does_not_use_are_refused(image_folder, tmp_path, scenario, extra, flag):
    """An option that would be accepted and ignored is one error line naming it, before anything loads."""
    from comneck_cli.cli.train_commands import train

    out = tmp_path / "neck.safetensors"
    result = CliRunner().invoke(train, ["neck", "--scenario", scenario, "--codec", CODEC, "-q", "8", "--data",
                                        str(image_folder), "--steps", "1", "--device", "cpu", "-o", str(out),
                                        *extra])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"comneck: error: scenario {scenario} does not use {flag}: ")
    assert result.output.count("\n") == 1 and not out.exists()


def test_quality_of_a_variable_rate_neck_is_refused(image_folder, tmp_path):
    from comneck_cli.cli.train_commands import train

    result = CliRunner().invoke(train, ["neck", "--codec", "mbt2018-mean-vbr", "-q", "3", "--data", str(image_folder),
                                        "--steps", "1", "--device", "cpu"])
    assert result.exit_code == 1
    assert result.output == ("comneck: error: a neck for the variable-rate mbt2018-mean-vbr trains on every rate at "
                             "once and serves records of any rate; drop --quality 3\n")


def test_d2_and_d3_start_from_the_registrys_d1_neck_or_refuse(trained_codec, image_folder, tmp_path):
    """The paper: distillation alone does not train a neck from scratch, so d2/d3 fine-tune a d1 neck."""
    from comneck_cli import weights as registry
    from comneck_cli.models.neck import load_neck
    from comneck_cli.train import train_neck

    with pytest.raises(ComneckError, match=r"^scenario d3 starts its neck from a d1 neck .* registry has no "
                                           r"mbt2018-mean-q8-neck; train it first with `comneck train neck"):
        train_neck(neck_config("d3", trained_codec, image_folder, tmp_path / "a", steps=(0, 0, 0), neck_init=None))
    assert not (tmp_path / "a").exists()
    d1 = scratch_neck(tmp_path / "d1", codec_file=trained_codec)
    registry.import_file("mbt2018-mean-q8-neck", d1, "neck")
    result = train_neck(neck_config("d3", trained_codec, image_folder, tmp_path / "b", steps=(0, 0, 0),
                                    neck_init=None))
    start, _ = load_neck(d1)
    exported, _ = load_neck(result.output)
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), exported.state_dict().values()))


@pytest.mark.slow  # two 15-step joint runs
def test_distillation_trains_the_neck_in_joint_training(trained_codec, image_folder, tmp_path):
    """d2's joint stage with L_dist removed (β = 0: the codec's own rate-distortion loss) against with it, from the
    same neck, seed and batches: only with it does the neck's distillation error fall clearly."""
    from comneck_cli.train import train_neck
    from comneck_cli.train.loop import read_metrics

    runs = {}
    for name, beta in (("off", 0.0), ("on", 255.0**2 / 60)):
        train_neck(neck_config("d2", trained_codec, image_folder, tmp_path / name, steps=(0, 15, 0),
                               lr=(1e-3, 3e-3, 1e-3), beta=beta))
        runs[name] = [r["dist"] for r in read_metrics(tmp_path / name / "run" / "metrics.jsonl")]
    assert runs["on"][0] == pytest.approx(runs["off"][0])  # the same start
    late = {name: float(np.mean(values[-5:])) for name, values in runs.items()}
    assert late["on"] < 0.7 * late["off"], (late, runs)
