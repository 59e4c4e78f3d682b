"""`comneck features --via adapter`: CoTAM's features C_{1..L}(E(x_hat) + A(y_hat)) from `.cnk` files, through the
one feature path (FeatureRunner) that `comneck eval --methods semantic-adapter` shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from comneck_cli import coding as api
from comneck_cli import weights as registry
from comneck_cli.cli import main
from comneck_cli.clip.preprocess import ClipPreprocess
from comneck_cli.clip.tower import load_clip, split_clip
from comneck_cli.formats import pack, unpack
from comneck_cli.io.images import read_image
from comneck_cli.models.adapter import AdapterInfo, DecoderAdapter, latent_view, load_adapter, save_adapter
from comneck_cli.models.neck import TransformNeck

from .conftest import TINY_CLIP


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result


def make_adapter(path: Path, clip_file: Path, codec: str, codec_file: Path, *, zero: bool = False) -> Path:
    """A randomly initialised adapter for the tiny CLIP (tag ``test``) and the 12-channel latents of ``codec_file``;
    ``zero``: every weight 0, so A(y_hat) = 0."""
    torch.manual_seed(1)
    adapter = DecoderAdapter.for_clip(load_clip(TINY_CLIP, "test", weights_file=clip_file), 12)
    if zero:
        with torch.no_grad():
            for p in adapter.parameters():
                p.zero_()
    info = AdapterInfo(codec=codec, codec_digest=registry.file_sha256(codec_file)[:8], clip_model=TINY_CLIP,
                       clip_tag="test", shallow_layer=0, loss_weights=(0.1, 1.0), warmup_epochs=0.0)
    save_adapter(adapter, path, info)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_clip_file, codec_files) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    codec = codec_files["mbt2018-mean"]
    return {"random": make_adapter(folder / "a.safetensors", tiny_clip_file, "mbt2018-mean", codec),
            "zero": make_adapter(folder / "zero.safetensors", tiny_clip_file, "mbt2018-mean", codec, zero=True),
            "other": make_adapter(folder / "other.safetensors", tiny_clip_file, "bmshj2018-hyperprior",
                                  codec_files["bmshj2018-hyperprior"])}


@pytest.fixture
def cnk(tmp_path, photos, codec_files) -> list[Path]:
    """A 64×64 crop (4×4 latent grid = the tiny ViT's patch grid) and an 80×120 one (padded to 128×128: the
    adapter reads the centre square of its unpadded latents), coded as .cnk files."""
    codec = api.load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    sizes = {"astronaut": (64, 64), "coffee": (80, 120)}
    for key, (h, w) in sizes.items():
        crop = np.ascontiguousarray(read_image(photos[key])[100 : 100 + h, 150 : 150 + w])
        (tmp_path / f"{key}.cnk").write_bytes(pack(api.encode(crop, codec)))
    return [tmp_path / f"{key}.cnk" for key in sizes]


@pytest.fixture
def tower(tiny_clip_file, codec_files) -> list:
    return ["--clip", TINY_CLIP, "--clip-tag", "test", "--clip-weights", tiny_clip_file,
            "--weights", codec_files["mbt2018-mean"]]


def expected(path: Path, adapter_file: Path, clip_file: Path, codec_file: Path) -> torch.Tensor:
    """C_{1..L}(E(x_hat) + A(y_hat)) at layer -2, patch tokens, from the pieces: g_s's image, CLIP's preprocessing
    and embedding E, the adapter's own tokens A(y_hat) of the latents' view CLIP sees, C's blocks."""
    codec = api.load_codec("mbt2018-mean", 1, weights=codec_file)
    record = unpack(path.read_bytes())
    clip = load_clip(TINY_CLIP, "test", weights_file=clip_file)
    head, tail = split_clip(clip, 0)
    adapter, _ = load_adapter(adapter_file)
    x_hat = api.decode(record, codec)
    view = latent_view(api.decode_latents(record, codec), record.height, record.width, adapter.grid)
    with torch.no_grad():
        tokens = head.embed(ClipPreprocess(clip).image(x_hat)[None]) + TransformNeck.forward(adapter, view)
        return tail(tokens).select(-2, "patch")


def test_adapter_features_are_clip_blocks_on_embedded_x_hat_plus_adapter_tokens(cnk, tower, adapters, tmp_path,
                                                                               tiny_clip_file, codec_files):
    r = run("features", *cnk, "--via", "adapter", "--adapter", adapters["random"], "-o", f"{tmp_path / 'out'}/",
            *tower)
    assert r.exit_code == 0, r.stderr
    for path in cnk:
        saved = torch.load(tmp_path / "out" / f"{path.stem}.pt", weights_only=True)
        want = expected(path, adapters["random"], tiny_clip_file, codec_files["mbt2018-mean"])
        assert saved["features"].shape == (1, 16, 64)
        assert torch.allclose(saved["features"], want, atol=1e-6)
        meta = saved["metadata"]
        assert (meta["via"], meta["adapter"], meta["adapter_codec"], meta["clip_model"]) == (
            "adapter", "a.safetensors", "mbt2018-mean", TINY_CLIP)
        assert meta["adapter_digest"] == registry.file_sha256(adapters["random"])[:16]
    # Batched through C's blocks: the same features as one at a time.
    r = run("features", *cnk, "--via", "adapter", "--adapter", adapters["random"], "-o", tmp_path / "b.pt",
            "--batch-size", "2", *tower)
    assert r.exit_code == 0, r.stderr
    both = torch.load(tmp_path / "b.pt", weights_only=True)["features"]
    assert torch.allclose(both[1:], torch.load(tmp_path / "out" / "coffee.pt", weights_only=True)["features"],
                          atol=1e-5)


def test_a_zero_adapter_gives_the_reconstruction_features_and_a_trained_one_does_not(cnk, tower, adapters,
                                                                                   tmp_path):
    """A(y_hat) = 0 leaves E(x_hat): exactly `--via reconstruction`'s features; any other adapter moves them."""
    r = run("features", cnk[1], "--via", "reconstruction", "-o", tmp_path / "r.pt", *tower)
    assert r.exit_code == 0, r.stderr
    plain = torch.load(tmp_path / "r.pt", weights_only=True)["features"]
    feats = {}
    for name in ("zero", "random"):
        r = run("features", cnk[1], "--via", "adapter", "--adapter", adapters[name], "-o", tmp_path / f"{name}.pt",
                *tower)
        assert r.exit_code == 0, r.stderr
        feats[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)["features"]
    assert torch.allclose(feats["zero"], plain, atol=1e-6)
    assert not torch.allclose(feats["random"], plain, atol=1e-3)


def test_the_registry_adapter_of_the_records_codec_is_the_default(cnk, tower, adapters, tmp_path):
    """No `--adapter`: the registry's `{codec}-adapter` of the record's codec (mbt2018-mean quality 1)."""
    r = run("features", cnk[0], "--via", "adapter", "-o", tmp_path / "none.pt", *tower)
    assert r.exit_code == 1 and "mbt2018-mean-q1-adapter" in r.stderr and "comneck train adapter" in r.stderr
    registry.import_file("mbt2018-mean-q1-adapter", adapters["random"], "adapter")
    r = run("features", cnk[0], "--via", "adapter", "-o", tmp_path / "reg.pt", *tower)
    assert r.exit_code == 0, r.stderr
    saved = torch.load(tmp_path / "reg.pt", weights_only=True)
    assert saved["metadata"]["adapter_digest"] == registry.file_sha256(adapters["random"])[:16]


def test_wrong_codec_wrong_clip_and_misused_options_are_one_line(cnk, tower, adapters, tmp_path):
    r = run("features", cnk[0], "--via", "adapter", "--adapter", adapters["other"], "-o", tmp_path / "x.pt", *tower)
    assert r.exit_code == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bmshj2018-hyperprior" in lines[0] and "mbt2018-mean" in lines[0], r.stderr
    assert "--adapter" in lines[0] and "`" not in lines[0]
    assert not (tmp_path / "x.pt").exists()
    r = run("features", cnk[0], "--via", "adapter", "--adapter", adapters["random"], "-o", tmp_path / "x.pt",
            *[a if a != "test" else "openai" for a in tower])
    assert r.exit_code == 1 and "trained for CLIP" in r.stderr and not (tmp_path / "x.pt").exists()
    r = run("features", cnk[0], "--adapter", adapters["random"], "-o", tmp_path / "x.pt", *tower)
    assert r.exit_code == 2 and "--adapter applies to --via adapter only" in r.stderr
    r = run("features", cnk[0], "--via", "adapter", "--neck", adapters["random"], "-o", tmp_path / "x.pt", *tower)
    assert r.exit_code == 2 and "drop --neck" in r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_batch_features_via_adapter_equals_features(cnk, tower, adapters, tmp_path):
    """`comneck batch features --via adapter` runs the same path: the same tensors for every record."""
    folder = cnk[0].parent
    r = run("batch", "features", "--input", folder, "--output", tmp_path / "batch", "--via", "adapter",
            "--adapter", adapters["random"], "--quiet", *tower)
    assert r.exit_code == 0, r.output
    r = run("features", *cnk, "--via", "adapter", "--adapter", adapters["random"], "-o", f"{tmp_path / 'one'}/",
            *tower)
    assert r.exit_code == 0, r.stderr
    for path in cnk:
        got = torch.load(tmp_path / "batch" / f"{path.stem}.pt", weights_only=True)["features"]
        assert torch.equal(got, torch.load(tmp_path / "one" / f"{path.stem}.pt", weights_only=True)["features"])
