"""`comneck batch`: folders and lists, resumable, one implementation for the local engine and Ray workers."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from comneck_cli import coding as api
from comneck_cli.coding import files as files_module
from comneck_cli.cli.batch_commands import batch
from comneck_cli.formats import read_file, unpack

from .conftest import skimage_photo

# Ray Data's own context copies warn about its deprecated fields; nothing comneck does.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

# 24 crops of shipped photos, 64×64 up to 128×96, PNG and JPEG, in nested folders.
SIZES = [(64, 64), (96, 64), (64, 96), (128, 96), (96, 128), (80, 112)]  # (height, width)
PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "retina.jpg"]
FOLDERS = ["", "a", "a/b"]


def run(*args, input=None):
    result = CliRunner().invoke(batch, [str(a) for a in args], input=input, catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result


def summary(result) -> str:
    return [line for line in result.stderr.splitlines() if line.startswith("comneck: batch")][-1]


def files(folder: Path, suffix: str) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob(f"*{suffix}"))}


def mtimes(folder: Path, suffix: str) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob(f"*{suffix}")}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """24 small images and one truncated PNG (a/corrupt.png)."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(24):
        photo = np.asarray(Image.open(skimage_photo(PHOTOS[i % len(PHOTOS)])).convert("RGB"))
        height, width = SIZES[i % len(SIZES)]
        top, left = 17 * i % (photo.shape[0] - height), 29 * i % (photo.shape[1] - width)
        crop = Image.fromarray(photo[top : top + height, left : left + width])
        folder = root / FOLDERS[i // len(SIZES) % len(FOLDERS)]
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / (f"img{i:02d}.jpg" if i % 4 == 3 else f"img{i:02d}.png"), quality=90)
    (root / "a" / "corrupt.png").write_bytes((root / "img00.png").read_bytes()[:120])
    return root


@pytest.fixture(scope="module")
def mbt(codec_files):
    return ["--codec", "mbt2018-mean", "-q", "1", "--weights", codec_files["mbt2018-mean"]]


@pytest.fixture(scope="module")
def encoded(photo_dir, mbt, tmp_path_factory) -> Path:
    """The local engine's .cnk outputs for photo_dir: what every other run is compared with."""
    out = tmp_path_factory.mktemp("encoded")
    r = run("encode", "--input", photo_dir, "--output", out, *mbt, "--batch-size", "4")
    assert r.exit_code == 1, r.stderr  # the corrupt PNG
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'comneck[ray]')")
    pytest.importorskip("ray.data", reason="ray[data] is not installed")
    configs = str(Path(__file__).parent / "tiny_configs")

    def register_tiny_clip():
        """Ray's workers do not share this process's open_clip registry: register the tiny CLIP there too,
        once open_clip is imported (importing it in every worker up front would slow every test down)."""
        import importlib.abc
        import importlib.util

        class AfterOpenClip(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name != "open_clip":
                    return None
                sys.meta_path.remove(self)
                spec = importlib.util.find_spec(name)
                run_module = spec.loader.exec_module

                def exec_module(module):
                    run_module(module)
                    module.add_model_config(configs)

                spec.loader.exec_module = exec_module
                return spec

        sys.meta_path.insert(0, AfterOpenClip())

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             runtime_env={"worker_process_setup_hook": register_tiny_clip})
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------- local engine
def test_encode_mirrors_paths_and_records_failures(encoded, photo_dir, codec_files):
    outputs = files(encoded, ".cnk")
    assert len(outputs) == 24
    assert "a/b/img14.cnk" in outputs and "img03.cnk" in outputs  # a/b/img14.png, img03.jpg
    errors = [json.loads(line) for line in (encoded / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"path": str(photo_dir / "a" / "corrupt.png"), "reason": errors[0]["reason"]}]
    assert "not a readable image" in errors[0]["reason"]
    codec = api.load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    record = unpack(outputs["a/img11.cnk"])
    assert (record.height, record.width) == SIZES[5]
    decoded = api.decode(record, codec)
    assert decoded.shape == (*SIZES[5], 3)


def test_second_run_does_no_work_and_truncated_or_stale_outputs_are_redone(encoded, photo_dir, mbt, tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(encoded, out)
    calls = []
    real = files_module.encode_images
    monkeypatch.setattr(files_module, "encode_images", lambda images, *args: calls.append(len(images)) or
                        real(images, *args))
    r = run("encode", "--input", photo_dir, "--output", out, *mbt)
    assert r.exit_code == 1 and summary(r).startswith("comneck: batch encode: 0 done, 24 skipped, 1 failed")
    assert sum(calls) == 0
    # An interrupted copy left a truncated file; another output belongs to a different image (stale).
    truncated, stale = out / "a" / "img07.cnk", out / "img03.cnk"
    truncated.write_bytes(truncated.read_bytes()[:-7])
    stale.write_bytes((out / "img00.cnk").read_bytes())
    r = run("encode", "--input", photo_dir, "--output", out, *mbt)
    assert summary(r).startswith("comneck: batch encode: 2 done, 22 skipped, 1 failed")
    assert sum(calls) == 2
    assert files(out, ".cnk") == files(encoded, ".cnk")
    # Weights that do not fit are one sentence before any input is tried (errors.jsonl is left alone).
    r = run("encode", "--input", photo_dir, "--output", out, *mbt[:2], "-q", "2", *mbt[4:])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "trained for mbt2018-mean quality 1" in r.stderr
    assert (out / "errors.jsonl").is_file()
    # --force redoes valid outputs too.
    r = run("encode", "--input", photo_dir, "--output", out, *mbt, "--force")
    assert summary(r).startswith("comneck: batch encode: 24 done, 0 skipped, 1 failed")


def test_lists_stdin_relative_paths_and_clashes(photo_dir, mbt, tmp_path, monkeypatch):
    monkeypatch.chdir(photo_dir)
    listing = tmp_path / "list.txt"
    listing.write_text("img00.png\n\n# a comment\na/b/img14.png\nmissing.png\n/elsewhere/x.png\n")
    r = run("encode", "--input", listing, "--output", tmp_path / "o1", *mbt)
    assert r.exit_code == 1
    assert sorted(files(tmp_path / "o1", ".cnk")) == ["a/b/img14.cnk", "img00.cnk"]
    errors = {e["path"]: e["reason"] for e in map(json.loads, (tmp_path / "o1" / "errors.jsonl").open())}
    assert set(errors) == {"missing.png", "/elsewhere/x.png"}
    assert "no such file" in errors["missing.png"] and "--relative-to" in errors["/elsewhere/x.png"]
    # stdin, absolute paths, mirrored relative to --relative-to; two inputs that would share an output.
    shutil.copy(photo_dir / "img00.png", tmp_path / "img00.jpg")
    shutil.copy(photo_dir / "img00.png", tmp_path / "img00.png")
    stdin = f"{tmp_path / 'img00.png'}\n{tmp_path / 'img00.jpg'}\n"
    r = run("encode", "--input", "-", "--output", tmp_path / "o2", "--relative-to", tmp_path, *mbt, input=stdin)
    assert r.exit_code == 1 and "would write the same output as" in r.stderr
    assert sorted(files(tmp_path / "o2", ".cnk")) == ["img00.cnk"]
    r = run("encode", "--input", photo_dir / "img00.png", "--output", tmp_path / "o3", *mbt)
    assert r.exit_code == 1 and "neither a folder nor a text file" in r.stderr


def test_decode_and_features_resume_by_content(encoded, codec_files, neck_file, tiny_clip_file, tmp_path):
    weights = ["--weights", codec_files["mbt2018-mean"]]
    dec = tmp_path / "dec"
    r = run("decode", "--input", encoded, "--output", dec, *weights)
    assert r.exit_code == 0 and not (dec / "errors.jsonl").exists()
    codec = api.load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    expected = api.decode(read_file(encoded / "a" / "img11.cnk")[0], codec)
    assert np.array_equal(np.asarray(Image.open(dec / "a" / "img11.png")), expected)
    png = dec / "img00.png"
    png.write_bytes(png.read_bytes()[:-40])
    before = mtimes(dec, ".png")
    r = run("decode", "--input", encoded, "--output", dec, *weights)
    assert summary(r) == "comneck: batch decode: 1 done, 23 skipped, 0 failed"
    after = mtimes(dec, ".png")
    assert [k for k in after if after[k] != before[k]] == ["img00.png"]
    # Features of the 64×64 crops (the tiny neck's 4×4 grid); other settings make a file stale.
    small = tmp_path / "small"
    for rel in ("img00.cnk", "a/b/img12.cnk"):
        (small / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(encoded / rel, small / rel)
    common = ["--neck", neck_file, "--clip-weights", tiny_clip_file, *weights]
    feats = tmp_path / "feats"
    r = run("features", "--input", small, "--output", feats, *common)
    assert r.exit_code == 0, r.stderr
    saved = torch.load(feats / "a" / "b" / "img12.pt", weights_only=True)
    assert saved["features"].shape == (1, 16, 64) and saved["metadata"]["select"] == "patch"
    r = run("features", "--input", small, "--output", feats, *common)
    assert summary(r) == "comneck: batch features: 0 done, 2 skipped, 0 failed"
    r = run("features", "--input", small, "--output", feats, *common, "--select", "cls")
    assert summary(r) == "comneck: batch features: 2 done, 0 skipped, 0 failed"
    assert torch.load(feats / "img00.pt", weights_only=True)["features"].shape == (1, 64)


def test_max_pixels_refuses_large_inputs_one_by_one(photo_dir, mbt, tmp_path):
    r = run("encode", "--input", photo_dir, "--output", tmp_path, *mbt, "--max-pixels", 64 * 64)
    assert summary(r).startswith("comneck: batch encode: 4 done, 0 skipped, 21 failed")  # only 64×64 fit
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert sum("pixels" in e["reason"] for e in errors) == 20


def test_ray_options_and_a_missing_ray(photo_dir, mbt, tmp_path, monkeypatch):
    r = run("encode", "--input", photo_dir, "--output", tmp_path, *mbt, "--num-gpus-per-worker", "1")
    assert r.exit_code == 2 and "only apply to --engine ray" in r.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # as if `pip install 'comneck[ray]'` had not been run
    r = run("encode", "--input", photo_dir, "--output", tmp_path / "o", *mbt, "--engine", "ray")
    assert r.exit_code == 1
    assert r.stderr == "comneck: error: --engine ray needs Ray, which is not installed: pip install 'comneck[ray]'\n"


# --------------------------------------------------------------------------- Ray engine
@pytest.mark.slow
def test_ray_outputs_are_byte_identical_to_local(ray_cluster, encoded, photo_dir, mbt, codec_files, tmp_path):
    out = tmp_path / "ray"
    r = run("encode", "--input", photo_dir, "--output", out, *mbt, "--batch-size", "4", "--engine", "ray")
    assert r.exit_code == 1, r.stderr
    assert summary(r).startswith("comneck: batch encode: 24 done, 0 skipped, 1 failed")
    assert files(out, ".cnk") == files(encoded, ".cnk")
    assert (out / "errors.jsonl").read_text() == (encoded / "errors.jsonl").read_text()
    weights = ["--weights", codec_files["mbt2018-mean"]]
    run("decode", "--input", encoded, "--output", tmp_path / "dec_local", *weights)
    r = run("decode", "--input", encoded, "--output", tmp_path / "dec_ray", *weights, "--engine", "ray",
            "--workers", "2")
    assert r.exit_code == 0, r.stderr
    local, remote = files(tmp_path / "dec_local", ".png"), files(tmp_path / "dec_ray", ".png")
    assert len(local) == 24 and remote == local


@pytest.mark.slow
def test_ray_resumes_and_redoes_a_truncated_output(ray_cluster, encoded, photo_dir, mbt, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(encoded, out)
    victim = out / "a" / "b" / "img13.cnk"
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    before = mtimes(out, ".cnk")
    r = run("encode", "--input", photo_dir, "--output", out, *mbt, "--batch-size", "4", "--engine", "ray")
    assert summary(r).startswith("comneck: batch encode: 1 done, 23 skipped, 1 failed")
    after = mtimes(out, ".cnk")
    assert [k for k in after if after[k] != before[k]] == ["a/b/img13.cnk"]
    assert files(out, ".cnk") == files(encoded, ".cnk")


@pytest.mark.slow
def test_ray_features_equal_local(ray_cluster, encoded, codec_files, neck_file, tiny_clip_file, tmp_path):
    small = tmp_path / "small"
    for rel in ("img00.cnk", "a/img06.cnk", "a/b/img12.cnk", "img18.cnk"):  # the 64×64 crops
        (small / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(encoded / rel, small / rel)
    common = ["--input", small, "--neck", neck_file, "--clip-weights", tiny_clip_file,
              "--weights", codec_files["mbt2018-mean"], "--batch-size", "2"]
    run("features", "--output", tmp_path / "local", *common)
    r = run("features", "--output", tmp_path / "ray", *common, "--engine", "ray")
    assert r.exit_code == 0, r.stderr
    for path in sorted((tmp_path / "local").rglob("*.pt")):
        local = torch.load(path, weights_only=True)
        remote = torch.load(tmp_path / "ray" / path.relative_to(tmp_path / "local"), weights_only=True)
        assert torch.equal(remote["features"], local["features"]) and remote["metadata"] == local["metadata"]
    assert len(list((tmp_path / "ray").rglob("*.pt"))) == 4


def test_bmp_inputs_and_flags_in_the_failure_reasons(mbt, tmp_path):
    """A folder's .bmp images are inputs (io.images.IMAGE_SUFFIXES, the one list); a worker's library error names
    `max_pixels`, and the line and errors.jsonl say --max-pixels."""
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(src / "small.bmp")
    Image.new("RGB", (80, 80), (30, 200, 30)).save(src / "large.png")
    r = run("encode", "--input", src, "--output", tmp_path / "out", *mbt, "--max-pixels", 64 * 64)
    assert summary(r).startswith("comneck: batch encode: 1 done, 0 skipped, 1 failed")
    assert (tmp_path / "out" / "small.cnk").is_file()
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert "raise --max-pixels" in errors[0]["reason"] and "raise --max-pixels" in r.stderr
    assert "`" not in r.stderr + errors[0]["reason"]
