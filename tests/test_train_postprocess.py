"""`comneck train postprocess`: the U-Net baseline trained on a tiny codec's reconstructions for a tiny CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from comneck_cli.errors import ComneckError

from .conftest import TINY_CLIP, make_codec_file
from .test_train import first_last, one_thread  # noqa: F401 (one_thread: autouse fixture)

CODEC = "mbt2018-mean"


def postprocess_config(codec_file: Path, data: Path, folder: Path, clip_file: Path, **kw):
    from comneck_cli.train.postprocess import PostprocessTrainConfig

    settings = dict(codec=CODEC, quality=8, weights=codec_file, data=data, clip_model=TINY_CLIP, clip_tag="test",
                    clip_weights=clip_file, steps=(30, 30, 30), lr=(1e-2, 1e-3, 1e-3), base=8, depth=2,
                    batch_size=6, crop=64, run_dir=folder / "run", log_every=1, checkpoint_every=1000, quiet=True,
                    register=None, output=folder / "unet.safetensors", device="cpu")
    settings.update(kw)
    return PostprocessTrainConfig(**settings)


def clip_distance(unet, clip_file: Path, codec_file: Path, data: Path) -> tuple[float, float]:
    """MSE to C(x) of the embeddings of C(U(x_hat)) and of C(x_hat) (the bare reconstruction), every image."""
    from comneck_cli.clip.tower import load_clip, split_clip
    from comneck_cli.codecs import load_codec
    from comneck_cli.train import Target
    from comneck_cli.train.data import ImageFolderCrops
    from comneck_cli.clip.teacher import Teacher
    from comneck_cli.train.postprocess import reconstruct

    clip = load_clip(TINY_CLIP, "test", weights_file=clip_file)
    head, tail = split_clip(clip, 0)
    preprocess = Teacher(clip, head, tail, Target()).preprocess
    crops = ImageFolderCrops(data, 64)
    x = torch.stack([crops[(i, (5, i))][0] for i in range(len(crops))])
    codec = load_codec(CODEC, 8, weights=codec_file)
    with torch.no_grad():
        x_hat = reconstruct(codec.model, codec.spec.family, x)
        reference = tail(head(preprocess(x))).embedding
        errors = [torch.nn.functional.mse_loss(tail(head(preprocess(image))).embedding, reference).item()
                  for image in (unet(x_hat), x_hat)]
    return errors[0], errors[1]


def test_three_stages_lower_both_losses_and_the_unet_is_exported(trained_codec, image_folder, tiny_clip_file,
                                                                   tmp_path):
    from comneck_cli import weights as registry

    from comneck_cli.codecs import load_codec
    from comneck_cli.models.unet import load_postprocess
    from comneck_cli.train.loop import read_metrics
    from comneck_cli.train.postprocess import train_postprocess

    cfg = postprocess_config(trained_codec, image_folder, tmp_path, tiny_clip_file,
                             register="{codec}-q{quality}-postprocess")
    result = train_postprocess(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["ce"] * 30 + ["ce+dist"] * 30 + ["dist"] * 30
    assert [r["lr"] for r in rows[::30]] == [1e-2, 1e-3, 1e-3]
    assert "dist" not in rows[0] and "ce" not in rows[-1]
    ce_first, ce_last = first_last(rows[:30], "ce")
    dist_first, dist_last = first_last(rows[30:], "dist")
    assert ce_last < 0.85 * ce_first, (ce_first, ce_last)
    assert dist_last < 0.5 * dist_first, (dist_first, dist_last)
    assert rows[30]["loss"] == pytest.approx(rows[30]["ce"] + 100 * rows[30]["dist"], rel=1e-5)

    unet, info = load_postprocess(result.output)
    digest = load_codec(CODEC, 8, weights=trained_codec).digest.hex()
    assert (info.codec, info.quality, info.codec_digest) == (CODEC, 8, digest)
    assert (info.clip_model, info.clip_tag) == (TINY_CLIP, "test")
    assert info.config == {"channels": 3, "base": 8, "depth": 2, "residual": True}
    assert result.registered == "mbt2018-mean-q8-postprocess"  # where `eval --methods postprocess` looks
    entry = registry.lookup("mbt2018-mean-q8-postprocess")
    assert entry.kind == "postprocess" and entry.sha256 == registry.file_sha256(result.output)
    assert entry.info["stage_steps"] == [30, 30, 30] and entry.info["codec_digest"] == digest
    assert entry.info["target"] == "pooled" and set(entry.info["final_losses"]) == {"dist", "loss"}

    # What the baseline is for: CLIP sees the U-Net's output closer to C(x) than the bare reconstruction.
    adapted, bare = clip_distance(unet, tiny_clip_file, trained_codec, image_folder)
    assert adapted < 0.7 * bare, (adapted, bare)


@pytest.mark.parametrize("crash_at", [3, 6])
def test_resume_equals_uninterrupted_across_stages(trained_codec, image_folder, tiny_clip_file, tmp_path, monkeypatch,
                                                   crash_at):
    """Killed right after a checkpoint (in stage 2, or in stage 3), then resumed from the checkpoint alone: U-Net
    (batch-norm statistics included), optimizer, metrics and the exported file equal an uninterrupted run's."""
    from safetensors import safe_open

    from comneck_cli.train import checkpoint
    from comneck_cli.train.postprocess import train_postprocess

    def config(run: str, **kw):
        return postprocess_config(trained_codec, image_folder, tmp_path / run, tiny_clip_file,
                                  **{"steps": (2, 3, 2), "batch_size": 4, **kw})

    train_postprocess(config("a"))
    real_save = checkpoint.save

    def save_then_crash(path, state):
        real_save(path, state)
        if state["step"] == crash_at:
            raise KeyboardInterrupt(f"simulated crash after the step-{crash_at} checkpoint")

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_postprocess(config("b", checkpoint_every=crash_at))
    monkeypatch.setattr(checkpoint, "save", real_save)
    ckpt = tmp_path / "b" / "run" / "checkpoint.pt"
    assert checkpoint.load(ckpt, "postprocess")["step"] == crash_at
    assert not (tmp_path / "b" / "unet.safetensors").exists()
    resumed = config("b", resume=ckpt)
    for field in ("codec", "quality", "weights", "clip_model", "clip_tag", "clip_weights", "steps", "lr", "base",
                  "depth", "batch_size", "crop"):  # the checkpoint has them
        setattr(resumed, field, None)
    train_postprocess(resumed)

    a, b = (checkpoint.load(tmp_path / run / "run" / "checkpoint.pt", "postprocess") for run in ("a", "b"))
    assert a["step"] == b["step"] == 7 and a["unet"].keys() == b["unet"].keys()
    for key, value in a["unet"].items():
        assert torch.equal(value, b["unet"][key]), key
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    lines = [(tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines() for run in ("a", "b")]
    strip = lambda rows: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in rows]  # noqa: E731
    assert strip(lines[0]) == strip(lines[1]) and len(lines[0]) == 7
    files = [safe_open(str(tmp_path / run / "unet.safetensors"), framework="pt") for run in ("a", "b")]
    assert files[0].metadata() == files[1].metadata() and set(files[0].keys()) == set(files[1].keys())
    for key in files[0].keys():
        assert torch.equal(files[0].get_tensor(key), files[1].get_tensor(key)), key


def test_resume_refuses_other_settings_and_other_codec_weights(trained_codec, image_folder, tiny_clip_file, tmp_path):
    import shutil

    from comneck_cli.train.postprocess import train_postprocess

    codec_file = tmp_path / "codec.safetensors"
    shutil.copy(trained_codec, codec_file)
    train_postprocess(postprocess_config(codec_file, image_folder, tmp_path, tiny_clip_file, steps=(1, 0, 0)))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(ComneckError, match="trained with `base` 8, not 16"):
        train_postprocess(postprocess_config(codec_file, image_folder, tmp_path, tiny_clip_file, resume=ckpt, base=16))
    other = make_codec_file(tmp_path, CODEC, seed=1, quality=8)
    shutil.copy(other, codec_file)  # same path and architecture, other weights: reconstructions never seen
    with pytest.raises(ComneckError, match="are not the ones this run trained on"):
        train_postprocess(postprocess_config(codec_file, image_folder, tmp_path, tiny_clip_file, resume=ckpt))
    with pytest.raises(ComneckError, match="`lr` takes one value or three"):
        train_postprocess(postprocess_config(trained_codec, image_folder, tmp_path / "x", tiny_clip_file,
                                             lr=(1e-3, 1e-3)))


def test_distillation_alone_takes_a_flat_folder(trained_codec, image_folder, tiny_clip_file, tmp_path):
    import shutil

    from comneck_cli.train.postprocess import train_postprocess

    flat = tmp_path / "flat"
    flat.mkdir()
    for p in image_folder.glob("*/*.png"):
        shutil.copy(p, flat / p.name)
    with pytest.raises(ComneckError, match="one sub-folder of images per class"):
        train_postprocess(postprocess_config(trained_codec, flat, tmp_path, tiny_clip_file, steps=(1, 1, 1)))
    result = train_postprocess(postprocess_config(trained_codec, flat, tmp_path, tiny_clip_file, steps=(0, 0, 2),
                                                  target="patch:-2"))
    assert result.output.is_file() and set(result.final) == {"dist", "loss"}


def test_cli_trains_and_eval_finds_the_registered_unet(trained_codec, image_folder, tiny_clip_file, tmp_path):
    """`comneck train postprocess` registers CODEC-qQ-postprocess; `comneck eval --methods postprocess` then runs
    it with no --postprocess flag."""
    from comneck_cli import weights as registry

    from comneck_cli.cli import main
    from comneck_cli.cli.train_commands import train

    args = ["postprocess", "--codec", CODEC, "-q", "8", "--weights", str(trained_codec), "--data", str(image_folder),
            "--clip-model", TINY_CLIP, "--clip-tag", "test", "--clip-weights", str(tiny_clip_file), "--steps", "2,1,1",
            "--lr", "1e-3", "--base", "4", "--depth", "2", "--batch-size", "3", "--crop", "64", "--device", "cpu",
            "--workers", "0", "--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(train, args)
    assert result.exit_code == 0, result.output
    assert "registered mbt2018-mean-q8-postprocess" in result.output and "4 steps" in result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4]  # the end of every stage is logged
    unet_file = registry.resolve("mbt2018-mean-q8-postprocess")

    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["eval", "--data", str(image_folder), "-o", str(out), "--codec", CODEC,
                                  "--qualities", "8",
                                  "--weights", f"q8={trained_codec}", "--clip", TINY_CLIP, "--clip-tag", "test",
                                  "--clip-weights", str(tiny_clip_file), "--size", "64",
                                  "--methods", "reconstruction,postprocess"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "points.json").read_text())
    assert {m["name"]: m["status"] for m in report["methods"]} == {"reconstruction": "ok", "postprocess": "ok"}
    assert report["skipped"] == []
    post = [row for row in report["images"] if row["method"] == "postprocess"]
    recon = {row["image"]: row for row in report["images"] if row["method"] == "reconstruction"}
    assert len(post) == len(recon) == 6
    for row in post:
        assert row["models"]["unet"] == registry.file_sha256(unet_file)[:16]  # the registered U-Net ran
        assert row["bpp"] == recon[row["image"]]["bpp"] and row["psnr"] == recon[row["image"]]["psnr"]
        assert row["feature_mse"] != recon[row["image"]]["feature_mse"]  # CLIP saw the U-Net's output
        assert row["correct"] in (0, 1)

    bad = CliRunner().invoke(train, ["postprocess", "--codec", CODEC, "-q", "8", "--data", str(image_folder),
                                     "--steps", "1,2", "--device", "cpu"])
    assert bad.exit_code == 1 and "--steps takes one value or three" in bad.output


def test_importing_the_train_commands_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from comneck_cli.cli.train_commands import train; "
            "assert 'torch' not in sys.modules and 'compressai' not in sys.modules; print(sorted(train.commands))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "postprocess" in out.stdout
