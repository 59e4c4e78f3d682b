"""CoTAM's decoder adapter A: its shape at CLIP's token grid, the latent view it reads, its file, its training run and
`comneck eval`'s semantic-adapter method (features of E(x_hat) + A(y_hat) through CLIP's blocks)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from comneck_cli import coding as api
from comneck_cli.codecs import load_codec
from comneck_cli.errors import ComneckError
from comneck_cli.formats import pack
from comneck_cli.io.images import read_image
from comneck_cli.models.adapter import DecoderAdapter, adapter_registry_name, latent_view, load_adapter

from .conftest import TINY_CLIP


def test_the_adapter_maps_elic_latents_to_577_vit_l_tokens():
    """The authors' LinearEncoder for ELIC (320 channels) and ViT-L/14@336: 577 × 1024 tokens, the neck's 13.19 M
    parameters plus 320 more positions."""
    adapter = DecoderAdapter(latent_channels=320, width=1024, heads=16, grid=(24, 24))
    assert sum(p.numel() for p in adapter.parameters()) == 13_191_168 + 320 * 1024
    embedded = torch.randn(1, 577, 1024)
    with torch.no_grad():
        assert adapter(torch.randn(1, 320, 24, 24), embedded).shape == (1, 577, 1024)
    with pytest.raises(ComneckError, match="reads a 24x24 latent grid, not 16x16"):
        adapter(torch.randn(1, 320, 16, 16), embedded)


def test_latent_view_is_what_clip_sees_of_the_image():
    """Padding cropped, the centre square taken (open_clip's centre crop), resized to the grid; a crop is itself."""
    y = torch.arange(8.0).repeat(1, 2, 4, 1)  # (1, 2, 4, 8): value = column of a 64×128 image's latents
    assert torch.equal(latent_view(y[..., :4], 64, 64, (4, 4)), y[..., :4])
    assert torch.equal(latent_view(y, 64, 128, (4, 4)), y[..., 2:6])  # the centre square of a wide image
    padded = torch.zeros(1, 2, 8, 8)  # a 100×100 image pads to 128 (14 px above and left): rows/cols 1..7
    padded[..., 1:7, 1:7] = 1
    assert torch.equal(latent_view(padded, 100, 100, (6, 6)), torch.ones(1, 2, 6, 6))
    assert latent_view(padded, 100, 100, (3, 3)).shape == (1, 2, 3, 3)


def test_the_adapter_file_records_its_design_and_refuses_pixel_filters(tmp_path, tiny_clip_file):
    from safetensors.torch import save_file

    from comneck_cli.clip.tower import load_clip
    from comneck_cli.models.adapter import DESIGN, AdapterInfo, save_adapter

    adapter = DecoderAdapter.for_clip(load_clip(TINY_CLIP, None, weights_file=tiny_clip_file), 12)
    info = AdapterInfo(codec="mbt2018-mean-vbr", codec_digest="0123abcd", clip_model=TINY_CLIP, clip_tag="None",
                       shallow_layer=0, loss_weights=(0.1, 1.0), warmup_epochs=5.0)
    save_adapter(adapter, tmp_path / "a.safetensors", info)
    loaded, got = load_adapter(tmp_path / "a.safetensors")
    assert got.design == DESIGN and got.config == {**adapter.config} and loaded.grid == (4, 4)
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), loaded.state_dict().values()))
    got.check_clip(TINY_CLIP, None, "a")
    with pytest.raises(ComneckError, match="trained for CLIP"):
        got.check_clip("ViT-L-14", "openai", "a")
    save_file({"head.weight": torch.zeros(1)}, str(tmp_path / "old.safetensors"),
              metadata={"format": "comneck-adapter", "format_version": "1"})  # the pixel filter's files
    with pytest.raises(ComneckError, match="format version '1'"):
        load_adapter(tmp_path / "old.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vbr_codec_file, tiny_clip_file, photos):
    """150 steps on 64-px crops of four photos coded at R in 2..6 (semantic records of strength 1), warm-up one
    epoch (1 step), against the tiny CLIP."""
    from comneck_cli.train.adapter import AdapterTrainConfig, train_adapter

    data = tmp_path_factory.mktemp("adapter-data")
    for name in ("coffee", "chelsea", "astronaut", "rocket"):
        shutil.copy(photos[name], data / photos[name].name)
    out = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    cfg = AdapterTrainConfig(codec="mbt2018-mean-vbr", weights=vbr_codec_file, clip_model=TINY_CLIP, clip_tag="none",
                             clip_weights=tiny_clip_file, semantic_strength=1.0, rates=(2.0, 6.0), warmup_epochs=1.0,
                             steps=150, batch_size=4, data=data, output=out, register=None, quiet=True, device="cpu",
                             run_dir=out.parent / "run")
    return cfg, train_adapter(cfg)


def test_the_trained_adapter_brings_held_out_features_closer_to_c_x(trained, vbr_codec_file, tiny_clip_file, photos):
    """On crops of photos it never saw, the final embedding of C_{1..L}(E(x_hat) + A(y_hat)) is nearer C(x)'s than
    C(x_hat)'s (reconstruction). Measured here (150 steps, random 4-block CLIP): embedding MSE 0.257 against 0.282;
    the layer -2 patch tokens, which the loss does not hold, move away (5.8 against 3.6)."""
    from comneck_cli.clip.tower import load_clip, split_clip
    from comneck_cli.models.adapter import adapted_tokens
    from comneck_cli.train.neck import Teacher

    cfg, result = trained
    adapter, info = load_adapter(result.output)
    assert info.codec == "mbt2018-mean-vbr" and info.semantic_strength == 1.0 and info.loss_weights == (0.1, 1.0)
    codec = load_codec("mbt2018-mean-vbr", 3, weights=vbr_codec_file)
    info.check_codec(codec, result.output)
    clip = load_clip(TINY_CLIP, None, weights_file=tiny_clip_file)
    head, tail = split_clip(clip, 0)
    prep = Teacher(clip, head, tail, ())

    def features(tokens):
        out = tail(tokens, layer=None, embedding=True)
        return out.hidden_states[-2][:, 1:], out.embedding

    errors = {"reconstruction": np.zeros(2), "adapter": np.zeros(2)}
    for name in ("camera", "retina"):
        pixels = read_image(photos[name])
        for top, left in ((100, 100), (200, 250), (300, 150)):
            image = np.ascontiguousarray(pixels[top : top + 64, left : left + 64])
            record = api.encode(image, codec)
            x_hat = prep.preprocess(api.to_tensor(api.decode(record, codec), 1))
            with torch.no_grad():
                reference = features(head.embed(prep.preprocess(api.to_tensor(image, 1))))
                for method, tokens in (("reconstruction", head.embed(x_hat)),
                                       ("adapter", adapted_tokens(adapter, head.embed, api.decode_latents(record, codec),
                                                                  x_hat, 64, 64))):
                    errors[method] += [float(torch.nn.functional.mse_loss(a, b))
                                       for a, b in zip(features(tokens), reference)]
    assert errors["adapter"][1] < 0.95 * errors["reconstruction"][1], errors


def test_train_adapter_command_resumes_and_registers(trained, tmp_path):
    from click.testing import CliRunner

    from comneck_cli import weights as registry
    from comneck_cli.cli import main

    cfg, _ = trained
    args = ["train", "adapter", "--codec", "mbt2018-mean-vbr", "--weights", str(cfg.weights), "--clip-model", TINY_CLIP,
            "--clip-tag", "none", "--clip-weights", str(cfg.clip_weights), "--warmup-epochs", "0.5",
            "--batch-size", "2", "--data", str(cfg.data), "--lr", "1e-3",
            "--run-dir", str(tmp_path / "run"), "--quiet", "--device", "cpu", "--workers", "0"]
    out = CliRunner().invoke(main, [*args, "--steps", "2"])
    assert out.exit_code == 0, out.output
    entry = registry.lookup(adapter_registry_name("mbt2018-mean-vbr"))
    assert entry is not None and entry.kind == "adapter" and entry.info["warmup_epochs"] == 0.5
    out = CliRunner().invoke(main, ["train", "adapter", "--resume", str(tmp_path / "run" / "checkpoint.pt"),
                                    "--steps", "3", "--quiet", "--workers", "0"])
    assert out.exit_code == 0, out.output
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 3
    out = CliRunner().invoke(main, [*args, "--steps", "1", "--loss-weights", "1,2,3"])
    assert out.exit_code != 0 and "--loss-weights takes 2" in out.output and "`" not in out.output
    out = CliRunner().invoke(main, [*args, "--steps", "1", "--loss-weights", "0,1"])
    assert out.exit_code != 0 and "positive shallow weight" in out.output


@pytest.mark.slow
def test_eval_compares_the_cotam_methods(trained, vbr_codec_file, tiny_clip_file, photos, tmp_path):
    """`comneck eval --methods semantic,semantic-adapter`: rates are the semantic records' bytes (map included), people
    see g_s's output in both, CLIP reads E(x_hat) + A(y_hat) in the adapter's; without an adapter it is skipped."""
    from click.testing import CliRunner
    from PIL import Image

    from comneck_cli.cli.eval_commands import eval_command
    from comneck_cli.clip.tower import load_clip, split_clip
    from comneck_cli.coding.semantic import Guide, semantic_map
    from comneck_cli.features import FeatureExtractor
    from comneck_cli.models.adapter import adapted_tokens

    data = tmp_path / "data"
    data.mkdir()
    pixels = read_image(photos["coffee"])
    for n, (y, x) in enumerate([(100, 200), (200, 300)]):
        Image.fromarray(pixels[y : y + 64, x : x + 64]).save(data / f"{n}.png")
    args = ["--data", str(data), "--codec", "mbt2018-mean-vbr", "--qualities", "2,5", "--weights",
            f"q2={vbr_codec_file},q5={vbr_codec_file}", "--clip", TINY_CLIP, "--clip-tag", "none", "--clip-weights",
            str(tiny_clip_file), "--size", "64", "--methods", "reconstruction,semantic,semantic-adapter",
            "--select", "pooled"]
    out = CliRunner().invoke(eval_command, [*args, "-o", str(tmp_path / "r1")])
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "r1" / "points.json").read_text())
    skipped = {m["name"]: m for m in report["methods"]}["semantic-adapter"]
    assert skipped["status"] != "ok" and "comneck train adapter" in json.dumps(skipped)
    out = CliRunner().invoke(eval_command, [*args, "--adapter", str(trained[1].output), "-o", str(tmp_path / "r0")])
    assert out.exit_code == 0, out.output
    rows = json.loads((tmp_path / "r0" / "points.json").read_text())["images"]

    clip = load_clip(TINY_CLIP, None, weights_file=tiny_clip_file)
    codec = load_codec("mbt2018-mean-vbr", 5, weights=vbr_codec_file)
    image = read_image(data / "0.png")
    record = api.encode(image, codec, importance=semantic_map(image, Guide(clip), 1.5))
    got = {r["method"]: r for r in rows if r["image"] == "0.png" and r["point"] == "q5"}
    assert got["semantic"]["bpp"] == got["semantic-adapter"]["bpp"] == 8 * len(pack(record)) / (64 * 64)
    assert got["semantic"]["psnr"] == got["semantic-adapter"]["psnr"]  # people see g_s's output in both
    adapter, _ = load_adapter(trained[1].output)
    tower = FeatureExtractor(clip=clip, k=0, device=torch.device("cpu"))
    head, tail = split_clip(clip, 0)
    x_hat = api.decode(record, codec)
    with torch.no_grad():
        reference = tower.from_images([image], 0, "pooled")
        adapted = tail.pool(tail(adapted_tokens(adapter, head.embed, api.decode_latents(record, codec),
                                                tower.preprocess(x_hat)[None], 64, 64)).hidden_states[-1])
        plain = tower.from_images([x_hat], 0, "pooled")
    expected = float(torch.nn.functional.mse_loss(adapted, reference))
    assert got["semantic-adapter"]["feature_mse"] == pytest.approx(expected, rel=1e-4)
    assert got["semantic"]["feature_mse"] == pytest.approx(float(torch.nn.functional.mse_loss(plain, reference)),
                                                           rel=1e-4)
