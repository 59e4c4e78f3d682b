"""Issue #33, items 1 and 2 (FIFOs in batch inputs): an output never replaces an input of the same run or a file that
is not a regular file, with or without --force; `batch` takes an existing file it did not write for a clash, not for
finished work; and a FIFO among a batch job's inputs is skipped, never opened (opening it would block for ever)."""

from __future__ import annotations

import os
import stat
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from comneck_cli.cli.batch_commands import batch

from .test_hostile_io import errors, mbt, run  # noqa: F401 - mbt is a fixture


def batch_run(*args):
    result = CliRunner().invoke(batch, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture
def photo(tmp_path, photos):
    """A 64×64 crop (the tiny codec's smallest padded size: fast)."""
    path = tmp_path / "a.png"
    Image.fromarray(np.asarray(Image.open(photos["astronaut"]).convert("RGB"))[100:164, 200:264]).save(path)
    return path


class FifoWatch:
    """Detects any reader of a FIFO without ever blocking the test: a non-blocking open for writing succeeds only
    while someone has it open for reading; the watcher then closes it, so that reader gets EOF instead of hanging."""

    def __init__(self, path):
        self.path, self.opened, self._stop = path, False, threading.Event()
        os.mkfifo(path)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.is_set():
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
                self.opened = True
            except OSError:  # ENXIO: no reader
                pass
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        self._thread.join()
        assert stat.S_ISFIFO(os.lstat(self.path).st_mode), "the FIFO was replaced"
        return self.opened


# --------------------------------------------------------------------------- single-file commands
@pytest.mark.parametrize("force", [["--force"], []])
def test_encode_never_writes_its_stream_over_an_input_even_with_force(photo, tmp_path, mbt, force):
    """Without --force too, the refusal names the input: "pass --force" would send the user to a second refusal."""
    other = tmp_path / "b.png"
    other.write_bytes(photo.read_bytes())
    before = photo.read_bytes()
    r = run("encode", photo, other, "-o", photo, *force, *mbt)
    assert r.exit_code == 1
    assert errors(r) == [f"comneck: error: {photo} is also an input of this run ({photo}); an output never "
                         "replaces an input, with or without --force: choose another name"]
    assert photo.read_bytes() == before


def test_an_output_beside_its_input_that_is_the_input_is_refused(photo, tmp_path, mbt):
    """A PNG named x.cnk: `encode x.cnk` would write x.cnk over itself; --force must not make that happen."""
    misnamed = tmp_path / "x.cnk"
    misnamed.write_bytes(photo.read_bytes())
    r = run("encode", misnamed, "--force", *mbt)
    assert r.exit_code == 1
    assert errors(r) == [f"comneck: error: {misnamed}: its output {misnamed} is an input of this run ({misnamed}); "
                         "an output never replaces an input: choose another output"]
    assert misnamed.read_bytes() == photo.read_bytes()


def test_decode_never_writes_over_its_input(photo, tmp_path, mbt):
    """A record named like an image (r.png) decoded to its own name, spelled another way."""
    assert run("encode", photo, *mbt).exit_code == 0
    record = tmp_path / "r.png"
    record.write_bytes(photo.with_suffix(".cnk").read_bytes())
    r = run("decode", record, "-o", tmp_path / "." / "r.png", "--force", "--weights", mbt[-1])
    assert r.exit_code == 1
    assert errors(r) == [f"comneck: error: {record}: its output {tmp_path / '.' / 'r.png'} is an input of this run "
                         f"({record}); an output never replaces an input: choose another output"]
    assert record.read_bytes() == photo.with_suffix(".cnk").read_bytes()


def test_outputs_never_replace_a_fifo_even_with_force(photo, tmp_path, mbt):
    fifo = tmp_path / "out.cnk"
    os.mkfifo(fifo)
    r = run("encode", photo, "-o", fifo, "--force", *mbt)
    assert r.exit_code == 1
    assert errors(r) == [f"comneck: error: {fifo} exists and is not a regular file; outputs never replace a "
                         "device, FIFO, socket or folder, with or without --force: choose another name"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


# --------------------------------------------------------------------------- batch
def test_batch_decode_into_its_input_folder_keeps_the_users_photo(photo, tmp_path, mbt):
    """`batch decode --input d --output d` with d/a.png (the photo, of the record's size) beside d/a.cnk: the photo
    is not 'skipped' as finished work, and not replaced; a later run into a fresh folder resumes as before."""
    assert run("encode", photo, *mbt).exit_code == 0
    before = photo.read_bytes()
    args = ["decode", "--input", tmp_path, "--output", tmp_path, "--weights", mbt[-1]]
    r = batch_run(*args)
    assert r.exit_code == 1, r.stderr
    assert errors(r) == [f"comneck: error: {photo.with_suffix('.cnk')}: {photo} exists and was not written by a "
                         "batch job; move it away, or pass --force to replace it"]
    assert "0 done, 0 skipped, 1 failed" in r.stderr
    assert photo.read_bytes() == before

    out = tmp_path / "out"
    args = ["decode", "--input", tmp_path, "--output", out, "--weights", mbt[-1]]
    assert "1 done, 0 skipped, 0 failed" in batch_run(*args).stderr
    assert "0 done, 1 skipped, 0 failed" in batch_run(*args).stderr  # its own output: finished work


def test_batch_never_replaces_a_non_regular_output_or_a_listed_input(photo, tmp_path, mbt):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "a.cnk")
    r = batch_run("encode", "--input", tmp_path, "--output", out, "--force", *mbt)
    assert r.exit_code == 1 and "is not a regular file" in r.stderr
    assert stat.S_ISFIFO(os.lstat(out / "a.cnk").st_mode)

    # A listed image named like its own output (a PNG called x.cnk, coded into its own folder).
    misnamed = tmp_path / "x.cnk"
    misnamed.write_bytes(photo.read_bytes())
    listing = tmp_path / "list.txt"
    listing.write_text(f"{misnamed}\n")
    r = batch_run("encode", "--input", listing, "--relative-to", tmp_path, "--output", tmp_path, "--force", *mbt)
    assert r.exit_code == 1 and "is an input of this run" in r.stderr
    assert misnamed.read_bytes() == photo.read_bytes()


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_batch_skips_fifos_in_its_input_folder_and_refuses_listed_ones(command, photo, tmp_path, mbt):
    assert run("encode", photo, *mbt).exit_code == 0  # a.cnk for decode
    suffix = ".png" if command == "encode" else ".cnk"
    options = mbt if command == "encode" else ["--weights", mbt[-1]]
    watch = FifoWatch(tmp_path / f"pipe{suffix}")
    try:
        r = batch_run(command, "--input", tmp_path, "--output", tmp_path / "out", *options)
        listing = tmp_path / "list.txt"
        listing.write_text(f"{watch.path}\n")
        listed = batch_run(command, "--input", listing, "--relative-to", tmp_path, "--output", tmp_path / "out2",
                     *options)
    finally:
        opened = watch.stop()
    assert not opened, "a FIFO input was opened"
    assert r.exit_code == 0 and "1 done, 0 skipped, 0 failed" in r.stderr
    assert listed.exit_code == 1
    assert errors(listed) == [f"comneck: error: {watch.path}: is not a regular file (a FIFO, socket or device); "
                              "list only files"]
