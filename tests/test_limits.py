"""Issue #22, items 2 and 4: one set of size limits for every way in, a writer that enforces the reader's limits,
and decoding / feature extraction in bounded memory. Every input is crafted here; limits are made small (option,
environment) so each case runs in seconds on the tiny codecs of conftest."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from comneck_cli import coding as api
from comneck_cli import codecs as codecs_module
from comneck_cli.cli import main
from comneck_cli.errors import ComneckError
from comneck_cli.formats import Limits, Record, pack, unpack

from .test_hardening import png_with_size  # a PNG header over a few bytes of pixels


def run(*args, input=None):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result


def mbt(codec_files) -> list:
    return ["--codec", "mbt2018-mean", "-q", "1", "--weights", codec_files["mbt2018-mean"]]


# --------------------------------------------------------------------------- the writer enforces the reader's limits
def test_encode_refuses_a_width_the_reader_refuses_before_any_model_loads(tmp_path):
    """1×70,000 used to encode with exit 0 and then be refused by info/decode. The weights named do not exist:
    the width is refused first, so no model was loaded for an image no reader would take."""
    wide = tmp_path / "wide.png"
    wide.write_bytes(png_with_size(70_000, 1))
    r = run("encode", wide, "--codec", "mbt2018-mean", "-q", "1", "--weights", tmp_path / "missing.safetensors")
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"comneck: error: {wide}: image width of 70000 pixels, over the limit of 65536 per "
                                "side; if the file is trusted, raise COMNECK_MAX_SIDE")
    assert not wide.with_suffix(".cnk").exists()


def test_what_encode_writes_at_the_limit_info_and_decode_read(tmp_path, codec_files, monkeypatch):
    monkeypatch.setenv("COMNECK_MAX_SIDE", "64")
    Image.new("RGB", (64, 8), (90, 20, 200)).save(tmp_path / "edge.png")
    Image.new("RGB", (65, 8), (90, 20, 200)).save(tmp_path / "over.png")
    assert run("encode", tmp_path / "edge.png", *mbt(codec_files)).exit_code == 0
    assert run("info", tmp_path / "edge.cnk").exit_code == 0
    assert run("decode", tmp_path / "edge.cnk", "--weights", codec_files["mbt2018-mean"]).exit_code == 0
    r = run("encode", tmp_path / "over.png", *mbt(codec_files))
    assert r.exit_code == 1 and "image width of 65 pixels, over the limit of 64 per side" in r.stderr
    assert not (tmp_path / "over.cnk").exists()


def test_library_encode_refuses_before_g_a(codec_files, monkeypatch):
    codec = api.load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    monkeypatch.setattr(type(codec), "analyze", lambda *a: pytest.fail("g_a ran on an image no reader would take"))
    with pytest.raises(ComneckError, match=r"^image to encode: image width of 70000 pixels, over the limit of 65536"):
        api.encode(np.zeros((1, 70_000, 3), np.uint8), codec)
    with pytest.raises(ComneckError, match=r"^image to encode: 80×60 image \(4800 pixels\), over the limit of 4000"):
        api.ImageEncoder(codec, limits=Limits(max_pixels=4000))([np.zeros((60, 80, 3), np.uint8)])


# --------------------------------------------------------------------------- the same limit for every way in
@pytest.fixture(scope="module")
def video_80x60(tmp_path_factory) -> Path:
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("video") / "clip.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=5)
        stream.width, stream.height, stream.pix_fmt = 80, 60, "bgr0"
        for value in (10, 200):
            frame = np.full((60, 80, 3), value, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_one_pixel_limit_for_images_frames_videos_and_records(tmp_path, codec_files, video_80x60, monkeypatch):
    """80×60 = 4,800 pixels against a limit of 4,000, through every way in. The video used to be checked only
    under --max-pixels, never against COMNECK_MAX_PIXELS or the default."""
    image = tmp_path / "image.png"
    Image.new("RGB", (80, 60), (1, 2, 3)).save(image)
    (tmp_path / "frames").mkdir()
    Image.new("RGB", (80, 60), (1, 2, 3)).save(tmp_path / "frames" / "f_0001.png")
    assert run("encode", image, *mbt(codec_files)).exit_code == 0  # a record to read back under the limit
    over = "80×60 image (4800 pixels), over the limit of 4000 pixels; if the file is trusted, raise --max-pixels"
    monkeypatch.setenv("COMNECK_MAX_PIXELS", "4000")
    for source, label in ((image, image), (tmp_path / "frames", tmp_path / "frames" / "f_0001.png"),
                          (video_80x60, video_80x60)):
        r = run("encode", source, *mbt(codec_files), "-o", tmp_path / "out.cnk")
        assert r.exit_code == 1 and f"comneck: error: {label}: {over}" in r.stderr, r.stderr
        assert not (tmp_path / "out.cnk").exists()
    r = run("decode", image.with_suffix(".cnk"), "-o", tmp_path / "back.png", "--weights", codec_files["mbt2018-mean"])
    assert r.exit_code == 1 and f".cnk record: {over}" in r.stderr
    assert not (tmp_path / "back.png").exists()
    monkeypatch.delenv("COMNECK_MAX_PIXELS")
    r = run("encode", video_80x60, *mbt(codec_files), "--max-pixels", "4000", "-o", tmp_path / "out.cnk")
    assert r.exit_code == 1 and over in r.stderr


def test_a_png_header_over_the_limit_is_refused_before_its_pixels_decode(tmp_path, codec_files):
    """A few hundred bytes declaring 9,500×9,500 (just over the default limit, under Pillow's own 2× error): refused
    from the header, in a child whose address space could not even hold the decoded pixels."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_with_size(9_500, 9_500))
    code = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 29, 1 << 29))
        from comneck_cli.errors import ComneckError
        from comneck_cli.io.images import read_image
        try:
            read_image(sys.argv[1])
        except Exception as e:  # a typed ComneckError (InputError) counts as one
            print("ComneckError" if isinstance(e, ComneckError) else type(e).__name__, e)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"ComneckError {bomb}: 9500×9500 image (90250000 pixels), over the limit of "
                                  "89478485 pixels; if the file is trusted, raise `max_pixels` or COMNECK_MAX_PIXELS")


# --------------------------------------------------------------------------- bounded memory
@pytest.mark.parametrize("name", ["mbt2018-mean", "cheng2020-anchor"])
def test_g_s_runs_in_tiles_above_the_tile_size(codec_files, monkeypatch, name):
    """With tiles of 8×8 latent positions a 24×30 grid runs g_s in 12 tiles (each with an 8-position halo), and the
    seams match a whole-image g_s to float rounding; a grid within one tile runs whole, bit for bit as before."""
    codec = api.load_codec(name, 1, weights=codec_files[name])
    torch.manual_seed(0)
    y_hat = torch.randn(1, codec.latent_channels, 24, 30) * 3
    with torch.no_grad():
        whole = codec.model.g_s(y_hat).clamp(0, 1)
    calls = []
    forward = codec.model.g_s.forward
    monkeypatch.setattr(codec.model.g_s, "forward", lambda x: calls.append(tuple(x.shape[-2:])) or forward(x))
    monkeypatch.setattr(codecs_module.runtime, "SYNTHESIS_TILE", 8)
    tiled = codec.synthesize(y_hat)
    assert len(calls) == 12 and max(calls) == (24, 24)  # 8 + 2×8 halo at most: never the whole grid
    assert tiled.shape == whole.shape and (tiled - whole).abs().max() < 1e-5
    calls.clear()
    monkeypatch.setattr(codecs_module.runtime, "SYNTHESIS_TILE", 30)
    assert torch.equal(codec.synthesize(y_hat), whole) and calls == [(24, 30)]


def test_decode_through_tiled_g_s_matches_whole(tmp_path, codec_files, photos, monkeypatch):
    """The CLI decode of chelsea (451×300, a 29×19 grid) with 8-position tiles equals the untiled decode within one
    grey level (a float-rounding seam can only move a value that sits on a rounding edge)."""
    Image.open(photos["chelsea"]).save(tmp_path / "c.png")
    assert run("encode", tmp_path / "c.png", *mbt(codec_files)).exit_code == 0
    w = ["--weights", codec_files["mbt2018-mean"]]
    assert run("decode", tmp_path / "c.cnk", "-o", tmp_path / "whole.png", *w).exit_code == 0
    monkeypatch.setattr(codecs_module.runtime, "SYNTHESIS_TILE", 8)
    assert run("decode", tmp_path / "c.cnk", "-o", tmp_path / "tiled.png", *w).exit_code == 0
    a, b = (np.asarray(Image.open(tmp_path / f), dtype=int) for f in ("whole.png", "tiled.png"))
    assert a.shape == (300, 451, 3) and np.abs(a - b).max() <= 1


def test_pixel_conversions_make_no_whole_image_float_copies():
    """to_tensor / from_tensor on a 4000×3000 image: the peak grows by the float tensor made (to_tensor) or the
    uint8 image returned (from_tensor), plus a band, not by extra whole-image temporaries (they used to double it)."""
    code = textwrap.dedent("""
        import resource, numpy as np, torch
        from comneck_cli.io.images import from_tensor, to_tensor
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        image = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
        x_hat = torch.from_numpy(image).permute(2, 0, 1)[None].float().div_(255.0)  # an unpadded x_hat
        before = peak()  # from_tensor first: ru_maxrss only rises, and to_tensor's peak must not hide its own
        back = from_tensor(x_hat, 3000, 4000, 1)
        grew_out = (peak() - before) / back.nbytes
        del x_hat
        before = peak()
        x = to_tensor(image, 64)
        print((peak() - before) / (x.numel() * 4), grew_out, np.array_equal(back, image))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grew_in, grew_out, same = out.stdout.split()
    assert float(grew_in) < 1.2 and float(grew_out) < 1.5 and same == "True", out.stdout


# --------------------------------------------------------------------------- the features path
def test_features_refuse_a_latent_grid_over_the_token_limit(tmp_path, codec_files, neck_file, tiny_clip_file,
                                                            monkeypatch):
    """64×64 (a 4×4 grid, 16 tokens) passes a limit of 16 tokens; 128×64 (8×4, 32 tokens) is refused before its
    latents are decoded, and the library refuses such latents too."""
    from comneck_cli.features import FeatureExtractor

    for width in (64, 128):
        Image.new("RGB", (width, 64), (120, 60, 30)).save(tmp_path / f"w{width}.png")
        assert run("encode", tmp_path / f"w{width}.png", *mbt(codec_files)).exit_code == 0
    common = ["--neck", neck_file, "--clip-weights", tiny_clip_file, "--weights", codec_files["mbt2018-mean"]]
    monkeypatch.setenv("COMNECK_MAX_TOKENS", "16")
    assert run("features", tmp_path / "w64.cnk", "-o", tmp_path / "ok.pt", *common).exit_code == 0
    r = run("features", tmp_path / "w128.cnk", "-o", tmp_path / "big.pt", *common)
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"comneck: error: {tmp_path / 'w128.cnk'}: record: latent grid 8×4 (32 tokens), over "
                                "the limit of 16 tokens for the neck and CLIP (their attention memory grows with its "
                                "square); encode a smaller image, or if the memory is there, raise COMNECK_MAX_TOKENS")
    assert not (tmp_path / "big.pt").exists()
    extractor = FeatureExtractor.for_neck(neck_file, clip_weights=tiny_clip_file)
    with pytest.raises(ComneckError, match=r"^latents: latent grid 8×4 \(32 tokens\), over the limit of 16 tokens"):
        extractor.from_latents([torch.zeros(1, 12, 4, 8)], -2, "patch")


def test_limits_are_one_object(monkeypatch):
    """Record and image checks share Limits; an unset environment gives the documented defaults."""
    assert Limits.from_env() == Limits(max_side=65536, max_pixels=89_478_485, max_record_bytes=256 << 20,
                                       max_tokens=4096)
    monkeypatch.setenv("COMNECK_MAX_TOKENS", "0")
    with pytest.raises(ValueError, match="COMNECK_MAX_TOKENS must be a positive integer"):
        Limits.from_env()
    monkeypatch.delenv("COMNECK_MAX_TOKENS")
    record = Record(codec_id=4, quality=1, weights_digest=b"\0" * 4, height=1, width=70_000, strings=(b"y", b"z"))
    with pytest.raises(ValueError, match=r"^\.cnk record: image width of 70000 pixels, over the limit of 65536"):
        unpack(pack(record))

