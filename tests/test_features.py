"""`comneck features`: from compressed latents through the neck and C', never decoding the image."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from comneck_cli import coding as api
from comneck_cli.cli import main
from comneck_cli.clip.tower import ClipTail, load_clip
from comneck_cli.models.neck import load_neck
from comneck_cli.formats import unpack

from .conftest import TINY_CLIP


def run(*args, input=None):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture
def cnk(tmp_path, photos, codec_files):
    """Two 64×64 crops (4×4 latent grid = the tiny ViT's patch grid) coded as files and as one stream."""
    files = []
    for key in ("astronaut", "coffee"):
        crop = np.asarray(Image.open(photos[key]).convert("RGB"))[100:164, 200:264]
        Image.fromarray(crop).save(tmp_path / f"{key}.png")
        r = run("encode", tmp_path / f"{key}.png", "--codec", "mbt2018-mean", "-q", "1",
                "--weights", codec_files["mbt2018-mean"])
        assert r.exit_code == 0, r.stderr
        files.append(tmp_path / f"{key}.cnk")
    return files


@pytest.fixture
def common(neck_file, tiny_clip_file, codec_files):
    return ["--neck", neck_file, "--clip-weights", tiny_clip_file, "--weights", codec_files["mbt2018-mean"]]


def expected_neck_features(path, neck_file, tiny_clip_file, codec_files, layer=-2, select="patch"):
    codec = api.load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    neck, info = load_neck(neck_file)
    clip = load_clip(TINY_CLIP, "test", weights_file=tiny_clip_file)
    y_hat = api.decode_latents(unpack(path.read_bytes()), codec)
    with torch.no_grad():
        return ClipTail(clip.visual, info.k)(neck(y_hat)).select(layer, select)


def test_neck_features_equal_the_library_computation(cnk, common, tmp_path, neck_file, tiny_clip_file, codec_files):
    out = tmp_path / "f.pt"
    r = run("features", cnk[0], "-o", out, *common)
    assert r.exit_code == 0, r.stderr
    saved = torch.load(out, weights_only=True)
    assert saved["features"].shape == (1, 16, 64)  # (N, patches, width): what a LLaVA projector takes
    expected = expected_neck_features(cnk[0], neck_file, tiny_clip_file, codec_files)
    assert torch.allclose(saved["features"], expected, atol=1e-6)
    meta = saved["metadata"]
    assert (meta["via"], meta["layer"], meta["select"], meta["clip_model"], meta["k"]) == ("neck", "-2", "patch", TINY_CLIP, "2")


def test_synthesis_transform_never_runs(cnk, common, tmp_path, monkeypatch):
    from comneck_cli import codecs

    real = codecs.load_codec

    class Forbidden(torch.nn.Module):
        def forward(self, *args):
            raise AssertionError("g_s ran on the features path")

    def without_g_s(*args, **kwargs):
        codec = real(*args, **kwargs)
        codec.model.g_s = Forbidden()
        return codec

    monkeypatch.setattr(codecs, "load_codec", without_g_s)  # where CodecCache loads each record's codec
    r = run("features", *cnk, "-o", tmp_path / "f.safetensors", *common)
    assert r.exit_code == 0, r.stderr
    # The reference path really does go through g_s.
    with pytest.raises(AssertionError, match="g_s ran"):
        run("features", cnk[0], "--via", "reconstruction", "-o", tmp_path / "r.pt", *common)


def test_output_kinds_streams_and_batching(cnk, common, tmp_path, neck_file, tiny_clip_file, codec_files):
    stream = cnk[0].read_bytes() + cnk[1].read_bytes()
    r = run("features", "-", "-o", tmp_path / "s.safetensors", "--batch-size", "1", *common, input=stream)
    assert r.exit_code == 0, r.stderr
    single = load_file(tmp_path / "s.safetensors")["features"]
    r = run("features", *cnk, "-o", tmp_path / "b.npy", "--batch-size", "2", *common)
    batched = torch.from_numpy(np.load(tmp_path / "b.npy"))
    assert single.shape == batched.shape == (2, 16, 64)
    assert torch.allclose(single, batched, atol=1e-5)
    assert torch.allclose(single[1], expected_neck_features(cnk[1], neck_file, tiny_clip_file, codec_files)[0], atol=1e-6)
    r = run("features", *cnk, "-o", f"{tmp_path / 'dir'}/", "--format", "npy", "--select", "pooled", *common)
    assert r.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["astronaut.npy", "coffee.npy"]
    assert np.load(tmp_path / "dir" / "coffee.npy").shape == (1, 32)


def test_uncompressed_is_the_full_clip_tower(cnk, tmp_path, tiny_clip_file, common):
    image = cnk[0].with_suffix(".png")
    r = run("features", image, "--via", "uncompressed", "--select", "pooled", "-o", tmp_path / "u.pt", *common)
    assert r.exit_code == 0, r.stderr
    got = torch.load(tmp_path / "u.pt", weights_only=True)["features"]
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=str(tiny_clip_file))
    with torch.no_grad():
        want = model.eval().encode_image(preprocess(Image.open(image)).unsqueeze(0))
    assert torch.allclose(got, want, atol=1e-5)
    r = run("features", cnk[0], "--via", "reconstruction", "--select", "pooled", "-o", tmp_path / "r.pt", *common)
    assert r.exit_code == 0, r.stderr
    assert torch.load(tmp_path / "r.pt", weights_only=True)["features"].shape == got.shape


def test_mismatched_neck_and_bad_inputs_are_one_line(cnk, common, tmp_path, other_weights, photos):
    r = run("features", cnk[0], "-o", tmp_path / "x.pt", "--layer", "1", *common)
    assert r.exit_code == 1 and "computed inside C's first k=2 blocks" in r.stderr
    r = run("features", photos["camera"], "-o", tmp_path / "x.pt", *common)
    assert r.exit_code == 1 and "use --via uncompressed" in r.stderr
    # A record coded with other codec weights: the neck was not trained on its latents.
    shutil.copy(photos["camera"], tmp_path / "cam.png")
    run("encode", tmp_path / "cam.png", "--codec", "mbt2018-mean", "-q", "1", "--weights", other_weights)
    args = [a if a != common[-1] else other_weights for a in common]
    r = run("features", tmp_path / "cam.cnk", "-o", tmp_path / "y.pt", *args)
    assert r.exit_code == 1 and "trained on latents" in r.stderr
    assert not (tmp_path / "y.pt").exists() and not (tmp_path / "x.pt").exists()


def test_registry_neck_and_clip_are_found_by_name(cnk, tmp_path, neck_file, tiny_clip_file, codec_files):
    from comneck_cli import weights as registry

    registry.import_file("mbt2018-mean-q1", codec_files["mbt2018-mean"], "codec")
    registry.import_file("mbt2018-mean-q1-neck", neck_file, "neck")
    registry.import_file(f"clip-{TINY_CLIP.lower()}-test", tiny_clip_file, "clip")
    r = run("features", cnk[0], "-o", tmp_path / "f.pt")
    assert r.exit_code == 0, r.stderr
    assert torch.load(tmp_path / "f.pt", weights_only=True)["features"].shape == (1, 16, 64)


def test_complexity_command_counts_every_component(tiny_clip_file):
    r = run("complexity", "--codec", "mbt2018-mean", "-q", "1", "--clip", TINY_CLIP, "--size", "64", "--json")
    assert r.exit_code == 0, r.stderr
    import json

    rows = {row["component"]: row for row in json.loads(r.stdout)}
    neck = rows["transform-neck T"]
    # Linear 192->64, class token, 17 positions, ln_pre; block: ln_1, qkv, out, ln_2, MLP 64->256->64.
    block = 128 + (64 * 192 + 192) + (64 * 64 + 64) + 128 + (64 * 256 + 256) + (256 * 64 + 64)
    assert neck["params"] == (192 * 64 + 64) + 64 + 17 * 64 + 128 + block
    assert set(rows) == {"transform-neck T", "codec synthesis g_s", "CLIP C: patch embedding + first 2 blocks"}
    assert all(row["kmac_per_px"] > 0 for row in rows.values())
    r = run("complexity", "--size", "100")
    assert r.exit_code == 2 and "multiple of 64" in r.stderr  # a usage error


def test_feature_runner_batches_what_the_extractor_computes(cnk, neck_file, tiny_clip_file, codec_files):
    """The library's one feature path (what ``features`` and ``batch features`` call): each record's neck, one
    forward per latent grid, the same tensors as the step-by-step computation; a bad input fails alone."""
    from comneck_cli.features import FeatureRunner

    runner = FeatureRunner(via="neck", neck=str(neck_file), clip_weights=tiny_clip_file,
                           weights=codec_files["mbt2018-mean"])
    records = [unpack(path.read_bytes()) for path in cnk]
    prepared = [runner.prepare(record) for record in records]
    assert prepared[0][0] is prepared[1][0]  # one extractor (one neck, one CLIP) for both
    features, notes = runner.compute(prepared, ["a", "b"])
    for path, got in zip(cnk, features):
        assert torch.allclose(got, expected_neck_features(path, neck_file, tiny_clip_file, codec_files)[0], atol=1e-6)
    assert notes == [] and runner.metadata(prepared[0][0], "a")["source"] == "a"


def test_library_errors_name_parameters_for_the_command_line():
    from comneck_cli.cli.plumbing import flag
    from comneck_cli.errors import ComneckError
    from comneck_cli.features import FeatureExtractor, resolve_neck

    with pytest.raises(ComneckError) as info:
        resolve_neck(None)
    assert "--" not in str(info.value) and "`neck`" in str(info.value)
    assert info.value.render(flag) == str(info.value).replace("`neck`", "--neck")
    extractor = FeatureExtractor(clip=None, k=2, device=torch.device("cpu"))
    with pytest.raises(ComneckError) as info:
        extractor.from_latents([torch.zeros(1, 8, 4, 4)], -2, "patch")
    assert str(info.value) == "no neck loaded; pass `neck`" and info.value.render(flag) == "no neck loaded; pass --neck"
