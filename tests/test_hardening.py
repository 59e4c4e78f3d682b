"""Hostile inputs, interruptions, concurrent writers, device and disk faults: one clear line, no partial files."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from comneck_cli.cli import main
from comneck_cli.formats import CnkError, read_file, unpack
from comneck_cli.formats.varint import encode_varint


def run(*args, input=None):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- hostile .cnk headers
def header(height: int, width: int, lengths: list[int]) -> bytes:
    body = b"CN\x10\x00\x04\x01" + b"\xde\xad\xbe\xef" + encode_varint(height) + encode_varint(width)
    body += bytes([len(lengths)]) + b"".join(encode_varint(n) for n in lengths)
    return body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    height=st.integers(1, 2**34), width=st.integers(1, 2**34),
    lengths=st.lists(st.integers(0, 2**34), min_size=1, max_size=255),
)
def test_huge_claims_are_refused_with_bounded_memory(height, width, lengths):
    """Whatever sizes a header claims, the reader fails with CnkError long before allocating them."""
    data = header(height, width, lengths)  # no strings follow: a liar or a truncation
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CnkError):
        unpack(data)
    # Peak RSS (KiB) grows by far less than any claimed size: nothing was allocated for them.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024


def test_reader_under_an_address_space_limit(tmp_path):
    """In a child limited to 1 GiB of address space, a record claiming 2^34-byte strings is refused cleanly."""
    bomb = tmp_path / "bomb.cnk"
    bomb.write_bytes(header(300, 400, [2**33, 2**33]) + b"\0" * 100)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from formats import CnkError, Limits, read_file\n"
        "try:\n    read_file(sys.argv[1], Limits(max_record_bytes=1 << 40))\n"
        "except CnkError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "refused: " in out.stdout and "truncated" in out.stdout


def test_limits_are_configurable_by_option_and_environment(tmp_path, codec_files, monkeypatch):
    img = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (9, 9, 9)).save(img)
    w = ["--codec", "mbt2018-mean", "-q", "1", "--weights", codec_files["mbt2018-mean"]]
    r = run("encode", img, *w, "--max-pixels", "50000")
    assert r.exit_code == 1 and "over the limit of 50000 pixels" in r.stderr and "--max-pixels" in r.stderr
    assert run("encode", img, *w).exit_code == 0
    monkeypatch.setenv("COMNECK_MAX_PIXELS", "1000")
    r = run("decode", tmp_path / "wide.cnk", "-o", tmp_path / "x.png", "--weights", codec_files["mbt2018-mean"])
    assert r.exit_code == 1 and "over the limit of 1000 pixels" in r.stderr
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- hostile images
def png_with_size(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims width×height but whose pixel data is a few bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "name,data,expected",
    [
        ("bomb.png", png_with_size(100_000, 100_000), "decompression-bomb protection"),
        ("bomb2.png", png_with_size(10_000, 10_000), "over the limit of 89478485 pixels"),
        ("zero.png", png_with_size(0, 10), "not a readable image"),
        ("trunc.png", None, "not a readable image"),
    ],
)
def test_hostile_images_are_one_line(tmp_path, codec_files, photos, name, data, expected):
    if data is None:
        full = photos["coffee"].read_bytes()
        data = full[: len(full) // 3]
    (tmp_path / name).write_bytes(data)
    r = run("encode", tmp_path / name, "--codec", "mbt2018-mean", "-q", "1", "--weights", codec_files["mbt2018-mean"])
    assert r.exit_code == 1 and expected in r.stderr
    assert not (tmp_path / name).with_suffix(".cnk").exists()


def test_one_pixel_image_round_trips(tmp_path, codec_files):
    Image.new("RGB", (1, 1), (200, 10, 30)).save(tmp_path / "dot.png")
    w = ["--weights", codec_files["mbt2018-mean"]]
    assert run("encode", tmp_path / "dot.png", "--codec", "mbt2018-mean", "-q", "1", *w).exit_code == 0
    assert run("decode", tmp_path / "dot.cnk", "-o", tmp_path / "dot_hat.png", *w).exit_code == 0
    assert Image.open(tmp_path / "dot_hat.png").size == (1, 1)


# --------------------------------------------------------------------------- interruption and concurrency
@pytest.fixture(scope="module")
def many_images(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("many")
    base = np.asarray(Image.open(photos["astronaut"]).convert("RGB"))
    for i in range(40):
        Image.fromarray(np.roll(base, 7 * i, axis=1)).save(folder / f"img{i:02d}.png")
    return sorted(folder.glob("*.png"))


def comneck(*args) -> list[str]:
    return [sys.executable, "-m", "comneck_cli", *map(str, args)]


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_leaves_no_partial_output(tmp_path, many_images, codec_files, sig, code):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        comneck("encode", *many_images, "--codec", "cheng2020-anchor", "-q", "1",
                "--weights", codec_files["cheng2020-anchor"], "-o", f"{out}/"),
        stderr=subprocess.PIPE, text=True, env={**os.environ, "COMNECK_HOME": str(tmp_path / "home")},
    )
    deadline = time.monotonic() + 120
    while not (out.exists() and any(out.glob("*.cnk"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert leftovers(out) == []
    written = sorted(out.glob("*.cnk"))
    assert 0 < len(written) < len(many_images)
    for path in written:  # every file that exists is complete
        assert len(read_file(path)) == 1


@pytest.mark.slow
def test_two_writers_never_corrupt_a_file(tmp_path, many_images, codec_files):
    out = tmp_path / "shared"
    args = ["--codec", "mbt2018-mean", "-q", "1", "--weights", codec_files["mbt2018-mean"], "-o", f"{out}/", "--quiet"]
    env = {**os.environ, "COMNECK_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen(comneck("encode", *many_images[:20], *args), stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode in (0, 1) for p in procs), errs
    assert "Traceback" not in "".join(errs)
    assert leftovers(out) == []
    files = sorted(out.glob("*.cnk"))
    assert len(files) == 20
    for path in files:
        assert len(read_file(path)) == 1
    # Whoever lost a race said so instead of overwriting.
    assert all(line.endswith("already exists; pass --force to overwrite it")
               for e in errs for line in e.splitlines() if line.startswith("comneck: error:"))


# --------------------------------------------------------------------------- device and disk faults
def test_cuda_out_of_memory_retries_smaller_batches(tmp_path, photos, codec_files, monkeypatch):
    from comneck_cli.codecs import Codec

    real = Codec.compress_batch
    sizes = []

    def picky(self, x):
        sizes.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, x)

    monkeypatch.setattr(Codec, "compress_batch", picky)
    for i in range(4):
        Image.fromarray(np.asarray(Image.open(photos["coffee"]))[:64, i * 64 : i * 64 + 64]).save(tmp_path / f"t{i}.png")
    inputs = sorted(tmp_path.glob("t*.png"))
    w = ["--codec", "mbt2018-mean", "-q", "1", "--weights", codec_files["mbt2018-mean"]]
    r = run("encode", *inputs, *w, "--batch-size", "4", "-o", f"{tmp_path / 'o'}/")
    assert r.exit_code == 0, r.stderr
    assert sizes[:3] == [4, 2, 1] and len(list((tmp_path / "o").glob("*.cnk"))) == 4

    def hopeless(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Codec, "compress_batch", hopeless)
    r = run("encode", inputs[0], *w, "-o", tmp_path / "none.cnk")
    assert r.exit_code == 1 and "out of GPU memory on" in r.stderr and "t0.png (64×64)" in r.stderr


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmp_path, photos, codec_files, monkeypatch):
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    shutil.copy(photos["camera"], tmp_path)
    r = run("encode", tmp_path / "camera.png", "--codec", "mbt2018-mean", "-q", "1",
            "--weights", codec_files["mbt2018-mean"])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert r.exit_code == 1
    assert f"cannot write {tmp_path / 'camera.cnk'}: No space left on device" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["camera.png"]


def test_real_full_filesystem(tmp_path, photos, codec_files):
    """A 16 KiB tmpfs, where the machine lets us mount one (root in a sandbox usually can)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with open(mnt / "filler", "wb", buffering=0) as f:  # fill the file system to the last byte
            try:
                while True:
                    f.write(b"\0" * 1024)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        coded = run("encode", photos["astronaut"], "--codec", "mbt2018-mean", "-q", "1",
                    "--weights", codec_files["mbt2018-mean"], "-o", tmp_path / "a.cnk")
        assert coded.exit_code == 0
        r = run("decode", tmp_path / "a.cnk", "-o", mnt / "a.png", "--weights", codec_files["mbt2018-mean"])
        assert r.exit_code == 1 and "No space left on device" in r.stderr and str(mnt / "a.png") in r.stderr
        assert leftovers(mnt) == [] and not (mnt / "a.png").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
