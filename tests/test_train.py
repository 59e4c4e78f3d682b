"""`comneck train codec` and the training machinery: latent paths, data, checkpoints, export, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from .conftest import TINY_CODECS

from comneck_cli.errors import ComneckError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine their spinning costs 5-10×."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def codec_config(codec: str, data: Path, run_dir: Path, **kw):
    from comneck_cli.train import CodecTrainConfig

    settings = dict(codec=codec, quality=1, data=data, steps=6, batch_size=3, crop=64, config=TINY_CODECS[codec],
                    lr=5e-3, run_dir=run_dir, log_every=1, checkpoint_every=1000, quiet=True, register=None,
                    output=run_dir.parent / f"{run_dir.name}.safetensors", device="cpu")
    settings.update(kw)
    return CodecTrainConfig(**settings)


def first_last(rows: list[dict], key: str, n: int = 5) -> tuple[float, float]:
    values = [r[key] for r in rows if key in r]
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


# ---------------------------------------------------------------- latent paths
@pytest.mark.parametrize("name", sorted(n for n in TINY_CODECS if not n.endswith("-vbr")))  # vbr: test_train_vbr
def test_latent_path_reproduces_compressai_forward(name):
    """quantizer="noise" in training mode is CompressAI's own forward, bit for bit (same random draws)."""
    from compressai.registry import MODELS

    from comneck_cli.codecs import CODECS
    from comneck_cli.train.latents import latent_path

    torch.manual_seed(0)
    model = MODELS[name](**TINY_CODECS[name]).train()
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    latents = latent_path(model, CODECS[name].family, x, "noise")
    assert torch.equal(model.g_s(latents.y_hat), expected["x_hat"])
    assert latents.likelihoods.keys() == expected["likelihoods"].keys()
    for key, value in expected["likelihoods"].items():
        assert torch.equal(latents.likelihoods[key], value)


@pytest.mark.parametrize("name", sorted(TINY_CODECS))
def test_frozen_latents_are_what_the_entropy_coder_writes(name, codec_files):
    from comneck_cli.codecs import load_codec
    from comneck_cli.train.latents import frozen_latents, latent_path

    codec = load_codec(name, 1, weights=codec_files[name])
    x = torch.rand(1, 3, 128, 64, generator=torch.Generator().manual_seed(3))
    _, coded = codec.compress(x)
    assert torch.equal(frozen_latents(codec.model, codec.spec.family, x, codec.gain), coded)
    if codec.spec.variable_rate:
        return  # its training path (gain-scaled, straight-through) is tests/test_train_vbr.py's
    # Straight-through rounding passes gradients and equals the rounding in value.
    codec.model.train()
    x.requires_grad_(True)
    y_hat = latent_path(codec.model, codec.spec.family, x, "ste").y_hat
    y_hat.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- data
def test_image_folder_classes_and_class_file(image_folder, tmp_path):
    from comneck_cli.train.data import ImageFolderCrops

    data = ImageFolderCrops(image_folder, 64)
    assert data.classes == ["cat", "coffee", "rocket"] and len(data) == 6
    x, label = data[(0, (0, 0, 0))]
    assert x.shape == (3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1 and label == 0
    mapping = tmp_path / "names.txt"
    mapping.write_text("rocket a space rocket\ncat tabby cat, house cat\ncoffee cup of coffee\n")
    named = ImageFolderCrops(image_folder, 64, classes_file=mapping)
    assert named.classes == ["tabby cat", "cup of coffee", "a space rocket"]
    mapping.write_text("kitty\nespresso\n")
    with pytest.raises(ComneckError, match="2 names but the data folder has 3"):
        ImageFolderCrops(image_folder, 64, classes_file=mapping)


def test_wordnet_id_folders_get_open_clips_imagenet_names_and_its_80_templates(image_folder, tmp_path):
    """`--data imagenet/train` prompts "a bad photo of a tench.", not "a photo of a n01440764."."""
    import shutil

    from open_clip import OPENAI_IMAGENET_TEMPLATES

    from comneck_cli.train.data import ImageFolderCrops
    from comneck_cli.train.neck import DEFAULT_TEMPLATES, default_templates

    for wnid, folder in zip(("n01440764", "n01443537", "n15075141"), ("cat", "coffee", "rocket")):
        shutil.copytree(image_folder / folder, tmp_path / "imagenet" / wnid)
    data = ImageFolderCrops(tmp_path / "imagenet", 64)
    assert data.classes == ["tench", "goldfish", "toilet paper"]  # the first two and the last of ImageNet-1k
    assert data.class_source.startswith("open_clip's ImageNet class names")
    templates = default_templates(data)
    assert len(templates) == 80 and templates[0].format("tench") == OPENAI_IMAGENET_TEMPLATES[0]("tench")
    shutil.copytree(image_folder / "cat", tmp_path / "imagenet" / "n99999999")  # not an ImageNet-1k id
    plain = ImageFolderCrops(tmp_path / "imagenet", 64)
    assert plain.classes[-1] == "n99999999" and plain.class_source == "the folder names"
    assert default_templates(plain) == DEFAULT_TEMPLATES


def test_resized_centre_crops_are_the_authors_protocol():
    """Short side to the crop size (bicubic here; the long side truncated as torchvision does), then the centre square:
    the same every epoch, the whole short side."""
    from PIL import Image

    from comneck_cli.train.data import resize_centre_crop

    image = np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8)
    x = resize_centre_crop(image, 256)
    expected = np.asarray(Image.fromarray(image).resize((384, 256), Image.BICUBIC))[:, 64:320]  # 451·256/300 truncated
    assert x.shape == (3, 256, 256)
    assert torch.equal(x, torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255)


def test_flat_folder_has_no_labels(image_folder, tmp_path):
    import shutil

    from comneck_cli.train.data import UNLABELLED, ImageFolderCrops

    for p in image_folder.glob("*/*.png"):
        shutil.copy(p, tmp_path / p.name)
    with pytest.raises(ComneckError, match="one sub-folder of images per class"):
        ImageFolderCrops(tmp_path, 64)
    flat = ImageFolderCrops(tmp_path, 64, labelled=False)
    assert len(flat) == 6 and flat[(0, (0,))][1] == UNLABELLED


def test_small_images_are_padded_and_crops_are_seeded():
    from comneck_cli.train.data import random_crop

    image = np.repeat(np.arange(0, 200, 5, dtype=np.uint8)[:, None, None], 100, axis=1).repeat(3, axis=2)
    x = random_crop(image, 64, np.random.default_rng(0))
    assert x.shape == (3, 64, 64)
    assert torch.equal(x[:, 12:52], torch.from_numpy(image[:, :64]).permute(2, 0, 1).float() / 255)
    # centred padding rows repeat the first and last image rows, as images.to_tensor pads for coding
    assert torch.equal(x[:, :12], x[:, 12:13].expand(-1, 12, -1))
    assert torch.equal(x[:, 52:], x[:, 51:52].expand(-1, 12, -1))
    big = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    a, b = (random_crop(big, 64, np.random.default_rng((0, 1, 2))) for _ in range(2))
    assert torch.equal(a, b)


def test_batch_of_a_step_does_not_depend_on_where_iteration_starts(image_folder):
    from comneck_cli.train.data import Batches, ImageFolderCrops

    batches = Batches(ImageFolderCrops(image_folder, 64), batch_size=4, seed=7)
    assert batches.per_epoch == 2
    straight = {step: (x, y) for step, x, y in batches.iterate(0, 5)}
    for start in (1, 2, 3):
        for step, x, y in batches.iterate(start, 5):
            assert torch.equal(x, straight[step][0]) and torch.equal(y, straight[step][1])
    # Loader processes change nothing: every crop is seeded by (seed, epoch, index).
    workers = Batches(ImageFolderCrops(image_folder, 64), batch_size=4, seed=7, workers=2)
    for step, x, y in workers.iterate(2, 4):
        assert torch.equal(x, straight[step][0]) and torch.equal(y, straight[step][1])
    # Two ranks split each epoch between them.
    ranks = [Batches(ImageFolderCrops(image_folder, 64), batch_size=4, seed=7, rank=r, world=2) for r in (0, 1)]
    seen = [sorted(int(i) for _, _, y in b.iterate(0, 1) for i in y) for b in ranks]
    assert sorted(seen[0] + seen[1]) == sorted(int(i) for i in straight[0][1].tolist() + straight[1][1].tolist())


# ---------------------------------------------------------------- train codec
def test_rd_loss_decreases_and_metrics_are_logged(image_folder, tmp_path):
    from comneck_cli.train import train_codec
    from comneck_cli.train.loop import read_metrics

    result = train_codec(codec_config("mbt2018-mean", image_folder, tmp_path / "run", steps=40, batch_size=6))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert set(rows[0]) >= {"step", "stage", "loss", "bpp", "mse", "aux", "lr", "seconds"}
    first, last = first_last(rows, "loss")
    assert last < 0.8 * first, (first, last)
    assert result.final["loss"] == pytest.approx(rows[-1]["loss"])
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_trainer_reports_progress_and_prints_nothing(image_folder, tmp_path, capfd):
    """The library's trainer tells its caller each step reached through on_progress and writes nothing itself."""
    from comneck_cli.train import train_codec

    calls = []
    train_codec(codec_config("mbt2018-mean", image_folder, tmp_path / "run", steps=3, quiet=False),
                on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_each_setting_lives_in_its_config_dataclass():
    """Defaults and what a resume keeps are read from the config fields, and errors name parameters, not flags."""
    from comneck_cli.train.codec import CodecTrainConfig
    from comneck_cli.train.config import defaults, merge_resumed, trajectory
    from comneck_cli.train.neck import NeckTrainConfig

    cfg = CodecTrainConfig(lr=0.01)
    assert defaults(cfg)["lr"] == 1e-4 and defaults(cfg)["batch_size"] == 8
    assert {"codec", "lr", "crop", "seed"} <= set(trajectory(cfg)) and "steps" not in trajectory(cfg)
    assert "classes" in trajectory(NeckTrainConfig()) and "classes" not in trajectory(cfg)
    with pytest.raises(ComneckError) as caught:
        merge_resumed(cfg, {"lr": 0.005})
    assert caught.value.params == ("lr", "resume")
    assert caught.value.render(lambda name: "--" + name) == (
        "the checkpoint was trained with --lr 0.005, not 0.01; drop --lr to resume it, or start a new run without "
        "--resume")


@pytest.mark.parametrize("name", ["mbt2018-mean", "elic2022-official"])
def test_resume_equals_uninterrupted(image_folder, tmp_path, name):
    from comneck_cli.train import train_codec
    from comneck_cli.train.checkpoint import load
    from comneck_cli.train.loop import read_metrics

    train_codec(codec_config(name, image_folder, tmp_path / "straight", steps=6))
    train_codec(codec_config(name, image_folder, tmp_path / "resumed", steps=3))
    resumed = codec_config(name, image_folder, tmp_path / "resumed", steps=6,
                           resume=tmp_path / "resumed" / "checkpoint.pt")
    for field in ("codec", "quality", "config", "lr", "batch_size", "crop"):  # taken from the checkpoint
        setattr(resumed, field, None)
    train_codec(resumed)
    a, b = (load(tmp_path / run / "checkpoint.pt", "codec") for run in ("straight", "resumed"))
    assert a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in ("optimizer", "aux_optimizer"):
        for i, state in a[key]["state"].items():
            for k, v in state.items():
                assert torch.equal(v, b[key]["state"][i][k]), (key, i, k)
    rows = [read_metrics(tmp_path / run / "metrics.jsonl") for run in ("straight", "resumed")]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(rows[0]) == strip(rows[1])
    # The exported files hold the same codec (tensors and metadata; safetensors orders metadata keys at random).
    from safetensors import safe_open

    files = [safe_open(str(tmp_path / f"{run}.safetensors"), framework="pt") for run in ("straight", "resumed")]
    assert files[0].metadata() == files[1].metadata() and set(files[0].keys()) == set(files[1].keys())
    for key in files[0].keys():
        assert torch.equal(files[0].get_tensor(key), files[1].get_tensor(key)), key


def test_precision_picks_bf16_autocast_of_the_transforms_only():
    from compressai.registry import MODELS

    from comneck_cli.train.loop import setup_runtime

    assert not setup_runtime("cpu").bf16 and setup_runtime("cpu", "bf16").bf16
    with pytest.raises(ComneckError, match="unknown `precision` 'fp16'"):
        setup_runtime("cpu", "fp16")
    runtime = setup_runtime("cpu", "bf16")
    torch.manual_seed(0)
    model = MODELS["mbt2018-mean-vbr"](**TINY_CODECS["mbt2018-mean-vbr"]).eval()
    keys = list(model.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        exact = model.g_a(x)
        with runtime.autocast_transforms(model):
            fast = model.g_a(x)
            # Outside g_a/g_s nothing autocasts: the hyperprior and likelihoods see float32.
            assert not torch.is_autocast_enabled("cpu") and model.h_a(fast).dtype == torch.float32
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)  # computed in bf16, handed back as float32
    assert torch.allclose(fast, exact, rtol=0.05, atol=0.05 * exact.abs().max().item())
    assert "forward" not in vars(model.g_a) and "forward" not in vars(model.g_s)  # the class forward is back
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model.g_a(x), exact)


def test_bf16_training_runs_and_its_resume_may_switch_precision(image_folder, tmp_path):
    from comneck_cli.train import train_codec
    from comneck_cli.train.loop import read_metrics

    run = tmp_path / "run"
    train_codec(codec_config("mbt2018-mean-vbr", image_folder, run, quality=None, steps=20, warmup=10,
                             precision="bf16"))
    train_codec(codec_config("mbt2018-mean-vbr", image_folder, run, quality=None, steps=24, config=None, lr=None,
                             batch_size=None, crop=None, resume=run / "checkpoint.pt"))  # float32 from here
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert all(np.isfinite(r["loss"]) for r in rows)
    first, last = first_last(rows[:20], "loss")
    assert last < first, (first, last)


def test_resume_refuses_a_different_trajectory(image_folder, tmp_path):
    from comneck_cli.train import train_codec

    train_codec(codec_config("mbt2018-mean", image_folder, tmp_path / "run", steps=1))
    again = codec_config("mbt2018-mean", image_folder, tmp_path / "run", steps=2, lr=1e-2,
                         resume=tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ComneckError, match="trained with `lr` 0.005, not 0.01"):
        train_codec(again)
    with pytest.raises(ComneckError, match="from `comneck train codec`, not `comneck train neck`"):
        from comneck_cli.train.checkpoint import load

        load(tmp_path / "run" / "checkpoint.pt", "neck")


def test_exported_codec_encodes_decodes_and_is_registered(image_folder, tmp_path, photos):
    from comneck_cli import weights as registry

    from comneck_cli import coding as api
    from comneck_cli.codecs import load_codec
    from comneck_cli.io.images import read_image
    from comneck_cli.train import train_codec
    from comneck_cli.train.export import is_machine_only

    out = tmp_path / "codec.safetensors"
    result = train_codec(codec_config("bmshj2018-hyperprior", image_folder, tmp_path / "run", steps=3, output=out,
                                      register="{codec}-q{quality}", quality=2))
    assert result.output == out and result.registered == "bmshj2018-hyperprior-q2"
    entry = registry.lookup("bmshj2018-hyperprior-q2")
    assert entry.kind == "codec" and entry.sha256 == registry.file_sha256(out)
    assert entry.info["quality"] == 2 and entry.info["steps"] == 3 and entry.info["lmbda"] == 0.0035
    assert entry.info["data"] == str(image_folder.resolve()) and set(entry.info["final_losses"]) >= {"loss", "bpp"}
    assert not is_machine_only(out)

    from_file = load_codec("bmshj2018-hyperprior", 2, weights=out)
    from_registry = load_codec("bmshj2018-hyperprior", 2)  # no weights: the registry entry
    assert from_registry.digest == from_file.digest
    image = read_image(photos["chelsea"])[:100, :130]
    record = api.encode(image, from_registry)
    decoded = api.decode(record, from_file)
    assert decoded.shape == image.shape and record.weights_digest == from_file.digest


def test_lambda_table():
    from comneck_cli.train.losses import default_lambda

    assert [default_lambda("elic2022-official", q) for q in range(1, 5)] == [0.004, 0.008, 0.016, 0.032]
    assert default_lambda("mbt2018-mean", 3) == 0.0067 and default_lambda("cheng2020-anchor", 6) == 0.0483
    with pytest.raises(ComneckError, match="pass `lmbda`"):
        default_lambda("elic2022-official", 5)


def test_cheng2020_trains_from_its_quality_table(image_folder, tmp_path):
    """cheng2020's quality table lists M, which its constructor does not take: it must still build."""
    from comneck_cli.train import train_codec

    result = train_codec(codec_config("cheng2020-anchor", image_folder, tmp_path / "run", steps=1))
    assert result.output.is_file()


# ---------------------------------------------------------------- CLI
def test_cli_train_codec(image_folder, tmp_path):
    from comneck_cli.codecs import load_codec
    from comneck_cli.cli.train_commands import train

    out = tmp_path / "tiny.safetensors"
    args = ["codec", "--codec", "mbt2018-mean", "-q", "3", "--data", str(image_folder), "--steps", "2",
            "--batch-size", "2", "--crop", "64", "--config", json.dumps(TINY_CODECS["mbt2018-mean"]), "-o", str(out),
            "--device", "cpu", "--workers", "0", "--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(train, args)
    assert result.exit_code == 0, result.output
    assert "registered mbt2018-mean-q3" in result.output and "2 steps" in result.output
    assert load_codec("mbt2018-mean", 3).digest == load_codec("mbt2018-mean", 3, weights=out).digest
    # Resuming needs only the checkpoint (and may extend the run).
    result = CliRunner().invoke(train, ["codec", "--resume", str(tmp_path / "run" / "checkpoint.pt"), "--steps", "3",
                                        "--no-register", "-o", str(out), "--quiet", "--workers", "0"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]  # log_every 10: the end of each run is logged

    bad = CliRunner().invoke(train, ["codec", "--codec", "mbt2018-mean", "-q", "3", "--data", str(image_folder),
                                     "--crop", "96", "--steps", "1", "--device", "cpu"])
    assert bad.exit_code == 1 and "comneck: error: --crop 96 is not a multiple of 64" in bad.output


def test_importing_the_train_commands_does_not_import_torch():
    code = ("import sys; from comneck_cli.cli.train_commands import train; "
            "assert 'torch' not in sys.modules and 'compressai' not in sys.modules; print(sorted(train.commands))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['adapter', 'codec', 'neck', 'postprocess', 'vbr']"


@pytest.mark.slow
def test_torchrun_data_parallel_on_cpu(image_folder, tmp_path):
    """Two gloo ranks on the CPU: each reads half of every batch, gradients are averaged, rank 0 writes."""
    out = tmp_path / "ddp.safetensors"
    config = json.dumps(TINY_CODECS["mbt2018-mean"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "comneck_cli.cli.train_commands", "codec", "--codec", "mbt2018-mean", "-q", "1", "--data",
           str(image_folder), "--steps", "3", "--batch-size", "2", "--crop", "64", "--config", config, "-o", str(out),
           "--no-register", "--device", "cpu", "--workers", "0", "--log-every", "1", "--run-dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    from comneck_cli.train.checkpoint import load

    state = load(tmp_path / "run" / "checkpoint.pt", "codec")
    assert state["world"] == 2 and len(state["rng"]) == 2  # each rank's generators, for an exact resume
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # ranks draw different noise
