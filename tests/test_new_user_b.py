"""Issue #23, part B: what a new user met first (usage errors, unreachable bpp targets, offline CLIP, registry
imports, a broken Ray, the sizes `codecs` and `complexity` report, features metadata)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from comneck_cli import weights as registry
from comneck_cli import codecs, features
from comneck_cli import coding as api
from comneck_cli.cli import main
from comneck_cli.defaults import CODEC_LEVELS, DEFAULT_CODEC, VARIABLE_RATE_CODECS
from comneck_cli.formats import unpack

from .conftest import TINY_CLIP, make_codec_file


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "in" / "photo.png"
    path.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def refuse(*args, **kwargs):
    raise AssertionError("a model was loaded before the usage error")


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: usage errors must come first."""
    monkeypatch.setattr(api, "load_codec", refuse)
    monkeypatch.setattr(codecs, "load_codec", refuse)
    return refuse


# --------------------------------------------------------------------------- item 6: usage errors exit 2, at once
USAGE = [
    (["-q", "99"], "codec mbt2018-mean-vbr has quality levels 1..8, not 99"),
    (["--rate", "9"], "takes --rate between 1 and 8, not 9"),
    (["--rate", "-1"], "takes --rate between 1 and 8, not -1"),
    (["--rate", "nan"], "takes --rate between 1 and 8, not nan"),
    (["--bpp-target", "0"], "--bpp-target must be a positive number of bits per pixel, not 0"),
    (["--bpp-target", "-1"], "--bpp-target must be a positive number of bits per pixel, not -1"),
    (["--bpp-target", "inf"], "--bpp-target must be a positive number of bits per pixel, not inf"),
    (["--rate", "3", "--bpp-target", "0.5"], "pass --rate or --bpp-target, not both"),
    (["--codec", "mbt2018-mean", "--rate", "2"], "codec mbt2018-mean has fixed quality levels; --rate needs"),
    (["--codec", "nope"], "'nope' is not one of"),
]


@pytest.mark.parametrize("args, message", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_exit_2_before_any_model_loads(args, message, photo, tmp_path, no_model):
    r = run("encode", photo, *args, "-o", tmp_path / "x.cnk")
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "x.cnk").exists()
    r = CliRunner().invoke(main, ["batch", "encode", "--input", str(photo.parent), "--output", str(tmp_path / "b"),
                                  *args])
    assert r.exit_code == 2 and message in r.stderr, r.stderr


def test_eval_qualities_beyond_the_codec_is_a_usage_error(photo, tmp_path, no_model):
    r = run("eval", "--data", photo.parent, "-o", tmp_path / "report", "--qualities", "9")
    assert r.exit_code == 2 and "codec mbt2018-mean-vbr has quality levels 1..8, not 9" in r.stderr
    r = run("complexity", "--codec", "cheng2020-anchor", "-q", "7")
    assert r.exit_code == 2 and "codec cheng2020-anchor has quality levels 1..6, not 7" in r.stderr


def test_usage_errors_do_not_import_torch(photo):
    """`comneck encode photo.png -q 99` answers before torch (seconds to import) is even imported."""
    code = ("import sys; from click.testing import CliRunner; from comneck_cli.cli import main; "
            f"r = CliRunner().invoke(main, ['encode', {str(photo)!r}, '-q', '99']); "
            "print(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "False"], out.stderr


def test_an_existing_or_unwritable_output_is_refused_before_loading(photo, tmp_path, no_model, monkeypatch):
    (tmp_path / "x.cnk").write_bytes(b"keep")
    exists = f"{tmp_path / 'x.cnk'} already exists; pass --force to overwrite it"
    r = run("encode", photo, "-o", tmp_path / "x.cnk")
    assert r.exit_code == 1 and r.stderr == f"comneck: error: {exists}\n"
    assert (tmp_path / "x.cnk").read_bytes() == b"keep"
    monkeypatch.setattr(features.FeatureExtractor, "for_clip", no_model)
    (tmp_path / "x.pt").write_bytes(b"keep")  # a features file type: x.cnk is a usage error first (#32.4)
    r = run("features", photo, "--via", "uncompressed", "-o", tmp_path / "x.pt")
    assert r.exit_code == 1 and r.stderr == f"comneck: error: {exists.replace('x.cnk', 'x.pt')}\n"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if not os.access(locked, os.W_OK):  # root writes anywhere
            r = run("encode", photo, "-o", locked / "sub" / "x.cnk")
            assert r.exit_code == 1 and f"{locked} is not a writable folder" in r.stderr
    finally:
        locked.chmod(0o700)


def test_the_torch_free_table_is_the_codecs_table():
    assert list(CODEC_LEVELS) == list(codecs.CODECS)
    assert {n for n, s in codecs.CODECS.items() if s.variable_rate} == set(VARIABLE_RATE_CODECS)
    from compressai.zoo.image import cfgs

    for name, spec in codecs.CODECS.items():  # zoo sizes are CompressAI's own table, not a copy
        if spec.zoo:
            assert {q: tuple(c.values()) for q, c in spec.qualities.items()} == cfgs[name]


# --------------------------------------------------------------------------- item 2: unreachable bpp targets
@pytest.fixture
def vbr_file(tmp_path) -> Path:
    # Random weights code every rate to the same few bytes: 100 bpp is beyond the highest rate.
    return make_codec_file(tmp_path, "mbt2018-mean-vbr")


def test_an_unreachable_bpp_target_warns_and_batch_resume_keeps_it(photo, tmp_path, vbr_file):
    vbr = ["--codec", "mbt2018-mean-vbr", "--weights", vbr_file]
    r = run("encode", photo, *vbr, "--bpp-target", "100", "-o", tmp_path / "x.cnk")
    assert r.exit_code == 0, r.stderr
    record = unpack((tmp_path / "x.cnk").read_bytes())
    assert record.rate == 8000
    assert r.stderr == (f"comneck: warning: {photo}: 100 bpp is out of reach: mbt2018-mean-vbr's highest rate (8) "
                        f"gives {record.bits_per_pixel:.3f} bpp; wrote that record\n")
    out = tmp_path / "batch"
    batch = ["batch", "encode", "--input", photo.parent, "--output", out, *vbr, "--bpp-target", "100"]
    assert run(*batch).exit_code == 0
    stamp = (out / "photo.cnk").stat().st_mtime_ns
    r = run(*batch)
    assert r.exit_code == 0 and "0 done, 1 skipped" in r.stderr, r.stderr  # not redone on every rerun
    assert (out / "photo.cnk").stat().st_mtime_ns == stamp


def test_bpp_out_of_reach_at_both_ends():
    spec = codecs.get_spec("mbt2018-mean-vbr")
    assert codecs.bpp_out_of_reach(spec, 8000, 2.0, 100) == \
        "100 bpp is out of reach: mbt2018-mean-vbr's highest rate (8) gives 2.000 bpp"
    assert codecs.bpp_out_of_reach(spec, 1000, 0.28, 0.01) == \
        "0.01 bpp is out of reach: mbt2018-mean-vbr's lowest rate (1) gives 0.280 bpp"
    assert codecs.bpp_out_of_reach(spec, 1000, 0.28, 1.0) is None  # the lowest rate below a target: a miss
    assert codecs.bpp_out_of_reach(spec, 4500, 0.5, 100) is None


# --------------------------------------------------------------------------- item 7: offline CLIP
@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_uncached_clip_fails_at_once_in_one_line(offline, photo, tmp_path, monkeypatch):
    import open_clip
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if not offline:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # conftest refuses the connection

    def no_download(*args, **kwargs):
        raise AssertionError("open_clip was asked to download")

    monkeypatch.setattr(open_clip, "create_model", no_download)
    start = time.monotonic()
    r = run("features", photo, "--via", "uncompressed", "-o", tmp_path / "f.pt")
    assert time.monotonic() - start < 5
    why = "HF_HUB_OFFLINE is set" if offline else "127.0.0.1 is unreachable: tests must not use the network"
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"comneck: error: {photo}: CLIP weights ViT-L-14/openai are not in the local cache "
                               f"and cannot be downloaded ({why}")
    assert "comneck weights import clip-vit-l-14-openai FILE" in r.stderr


# --------------------------------------------------------------------------- item 11: weights import checks the file
def test_weights_import_refuses_what_is_not_that_codec(tmp_path, codec_files):
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    r = run("weights", "import", "mbt2018-mean-q3", notes)
    assert r.exit_code == 1 and r.stderr.startswith(f"comneck: error: cannot load codec weights {notes}: not a plain "
                                                    "tensor checkpoint (UnpicklingError)")
    r = run("weights", "import", "mbt2018-mean-q1", codec_files["bmshj2018-hyperprior"])
    assert r.exit_code == 1 and "hold codec 'bmshj2018-hyperprior', not 'mbt2018-mean'" in r.stderr
    r = run("weights", "import", "mbt2018-mean-q3", codec_files["mbt2018-mean"])  # trained for quality 1
    assert r.exit_code == 1 and "import them as mbt2018-mean-q1" in r.stderr
    assert registry.lookup("mbt2018-mean-q3") is None and registry.lookup("mbt2018-mean-q1") is None
    assert run("weights", "import", "mbt2018-mean-q1", codec_files["mbt2018-mean"]).exit_code == 0


# --------------------------------------------------------------------------- item 13: a broken Ray says why
def test_a_ray_that_fails_to_import_shows_the_reason(photo, tmp_path, monkeypatch):
    import importlib.abc

    class BrokenRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ray":
                raise ImportError("numpy.core.multiarray failed to import")
            return None

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenRay(), *sys.meta_path])
    r = run("batch", "encode", "--input", photo.parent, "--output", tmp_path / "o", "--engine", "ray")
    assert r.exit_code == 1
    assert r.stderr == ("comneck: error: --engine ray: Ray is installed but importing it failed (ImportError: "
                        "numpy.core.multiarray failed to import); fix that installation, or use --engine local\n")


# --------------------------------------------------------------------------- item 14: sizes from the file
def test_codecs_and_complexity_report_the_registered_files_size(tiny_clip_file, codec_files):
    import open_clip
    from compressai.registry import MODELS

    listing = [line for line in run("codecs").stdout.splitlines() if line.startswith(DEFAULT_CODEC)]
    assert len(listing) == 1 and "N=128" in listing[0] and "M=192 " in listing[0], listing  # the shipped file
    open_clip.add_model_config(Path(__file__).parent / "tiny_configs")

    def g_s_params(codec, *options):
        r = run("complexity", "--codec", codec, *options, "--clip", TINY_CLIP, "--size", "64", "--json")
        assert r.exit_code == 0, r.stderr
        return {row["component"]: row for row in json.loads(r.stdout)}["codec synthesis g_s"]["params"]

    def count(model):
        return sum(p.numel() for p in model.g_s.parameters())

    assert g_s_params(DEFAULT_CODEC) == count(MODELS[DEFAULT_CODEC](N=128, M=192))
    assert g_s_params("mbt2018-mean", "-q", "1") == count(MODELS["mbt2018-mean"](N=128, M=192))  # the zoo's
    registry.import_file("mbt2018-mean-q1", codec_files["mbt2018-mean"], "codec")
    assert g_s_params("mbt2018-mean", "-q", "1") == count(MODELS["mbt2018-mean"](N=8, M=12))  # the file's


def test_reference_features_record_their_clip(photo, tmp_path, tiny_clip_file):
    r = run("features", photo, "--via", "uncompressed", "--clip", TINY_CLIP, "--clip-tag", "test",
            "--clip-weights", tiny_clip_file, "-o", tmp_path / "f.pt")
    assert r.exit_code == 0, r.stderr
    meta = torch.load(tmp_path / "f.pt", weights_only=True)["metadata"]
    assert (meta["clip_model"], meta["clip_tag"]) == (TINY_CLIP, "test")


# --------------------------------------------------------------------------- item 12: eval's default codec
def test_eval_defaults_to_the_shipped_codec():
    from comneck_cli.cli.eval_commands import eval_command

    assert next(p for p in eval_command.params if p.name == "codec").default == DEFAULT_CODEC
