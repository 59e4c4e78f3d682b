"""Issue #23: what a new user meets on a fresh clone, offline, following the README. One test per defect."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from comneck_cli.cli import main
from comneck_cli.formats import CnkError, read_file, unpack

from .conftest import TINY_CLIP

# A path under sysfs: creating anything there fails for root too, with or without privileges (EPERM or EROFS).
UNWRITABLE = Path("/sys/comneck-new-user/out")


def run(*args, input=None):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture
def mbt(codec_files):
    return ["--codec", "mbt2018-mean", "-q", "1", "--weights", codec_files["mbt2018-mean"]]


@pytest.fixture
def photo(tmp_path, photos) -> Path:
    """A 64×64 crop (the tiny models take it in milliseconds), as photo.png in its own folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    pixels = np.asarray(Image.open(photos["chelsea"]).convert("RGB"))[50:114, 100:164]
    Image.fromarray(pixels).save(folder / "photo.png")
    return folder / "photo.png"


@pytest.fixture
def eval_data(tmp_path, photo) -> Path:
    root = tmp_path / "data"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        Image.open(photo).save(root / label / "0.png")
    return root


# --------------------------------------------------------------------------- 1: unwritable output folders
@pytest.mark.parametrize("command", ["batch encode", "batch decode", "eval"])
def test_an_output_folder_that_cannot_be_created_is_one_error_line(command, photo, mbt, eval_data):
    if command == "eval":
        args = ["eval", "--data", eval_data, "-o", UNWRITABLE]
    else:
        if command == "batch decode":
            assert run("encode", photo, *mbt).exit_code == 0
        args = [*command.split(), "--input", photo.parent, "--output", UNWRITABLE, *mbt[-2:]]
    r = run(*args)
    assert r.exit_code == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"comneck: error: cannot create folder {UNWRITABLE}: "), lines
    assert not UNWRITABLE.exists()


# --------------------------------------------------------------------------- 3: file modes follow the umask
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_kind_of_output_gets_the_mode_open_would_give(mask, tmp_path, photo, mbt, eval_data, tiny_clip_file):
    clip = ["--clip", TINY_CLIP, "--clip-tag", "test", "--clip-weights", tiny_clip_file]
    previous = os.umask(mask)
    try:
        assert run("encode", photo, *mbt, "-o", tmp_path / "a.cnk").exit_code == 0
        assert run("decode", tmp_path / "a.cnk", "-o", tmp_path / "a.png", *mbt[-2:]).exit_code == 0
        r = run("features", photo, "--via", "uncompressed", *clip, "-o", tmp_path / "a.pt")
        assert r.exit_code == 0, r.stderr
        r = run("eval", "--data", eval_data, "-o", tmp_path / "report", "--methods", "uncompressed", *clip)
        assert r.exit_code == 0, r.stderr
    finally:
        os.umask(previous)
    outputs = [tmp_path / "a.cnk", tmp_path / "a.png", tmp_path / "a.pt", *sorted((tmp_path / "report").iterdir())]
    assert {p.name for p in outputs} >= {"summary.md", "points.json", "points.jsonl"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in outputs} == {p.name: oct(0o666 & ~mask) for p in outputs}



def test_training_outputs_get_the_mode_open_would_give(tmp_path):
    """Exported codecs and checkpoints are outputs too (they were written 0600 through mkstemp)."""
    from compressai.registry import MODELS

    from comneck_cli.train import checkpoint, export

    model = MODELS["bmshj2018-factorized"](N=8, M=8).eval()
    previous = os.umask(0o022)
    try:
        export.write_codec(model, tmp_path / "codec.safetensors", "bmshj2018-factorized", 1, {"N": 8, "M": 8})
        checkpoint.save(tmp_path / "checkpoint.pt", {"step": 1})
    finally:
        os.umask(previous)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {
        "codec.safetensors": "0o644", "checkpoint.pt": "0o644"}

# --------------------------------------------------------------------------- 4: decode never takes the photo's name
def test_decode_beside_the_photo_never_touches_it(photo, mbt):
    original = photo.read_bytes()
    assert run("encode", photo, *mbt).exit_code == 0
    for extra in ([], ["--force"]):  # following the advice of a second run must not destroy the photo either
        r = run("decode", photo.with_suffix(".cnk"), *mbt[-2:], *extra)
        assert r.exit_code == 0, r.stderr
        assert photo.read_bytes() == original
    decoded = photo.with_name("photo.decoded.png")
    assert np.asarray(Image.open(decoded)).shape == (64, 64, 3)
    assert sorted(p.name for p in photo.parent.iterdir()) == ["photo.cnk", "photo.decoded.png", "photo.png"]


# --------------------------------------------------------------------------- 5: info on an empty file
def test_info_of_an_empty_file_fails_as_decode_does(tmp_path):
    empty = tmp_path / "empty.cnk"
    empty.write_bytes(b"")
    r = run("info", empty)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == f"comneck: error: {empty}: no records in file (empty input)\n"


# --------------------------------------------------------------------------- 8: an interrupted batch decode
def test_interrupted_batch_decode_counts_the_images_it_wrote(tmp_path, photo, mbt, monkeypatch):
    from comneck_cli.coding import files

    coded = tmp_path / "coded"
    assert run("batch", "encode", "--input", photo.parent, "--output", coded, *mbt, "--quiet").exit_code == 0
    for n in range(1, 5):  # five one-record files: one chunk of the default --batch-size 8
        (coded / f"copy{n}.cnk").write_bytes((coded / "photo.cnk").read_bytes())
    real, calls = files.decode_record_bytes, []

    def interrupted_on_the_fourth(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(files, "decode_record_bytes", interrupted_on_the_fourth)
    out = tmp_path / "decoded"
    r = run("batch", "decode", "--input", coded, "--output", out, *mbt[-2:])
    assert r.exit_code == 130
    assert "comneck: batch decode: 3 done, 0 skipped, 0 failed" in r.stderr.splitlines()
    assert len(list(out.glob("*.png"))) == 3


# --------------------------------------------------------------------------- 9, 10: stdin and --max-pixels messages
def test_empty_stdin_is_named_not_an_object_repr(mbt):
    r = run("encode", "-", *mbt, "-o", "-", input=b"")
    assert r.exit_code == 1
    assert r.stderr == "comneck: error: stdin: not a readable image (empty input)\n"


def test_max_pixels_error_names_the_limit_the_user_set(tmp_path, mbt):
    Image.new("RGB", (30, 10), (9, 9, 9)).save(tmp_path / "wide.png")  # 300 pixels: over twice the limit
    r = run("encode", tmp_path / "wide.png", *mbt, "--max-pixels", "100")
    assert r.exit_code == 1
    message = r.stderr.replace(str(tmp_path), "")  # pytest's temp folder names are numbered ("pytest-200")
    assert "over the limit of 100 pixels" in message and "200" not in message, r.stderr


# --------------------------------------------------------------------------- 14: help, terminals, messages, README
def test_help_texts_say_what_each_command_does():
    batch_decode = run("batch", "decode", "--help").stdout
    assert "decode: a/b.cnk -> OUT/a/b.png" in " ".join(batch_decode.split())
    for command in ("decode", "features"):  # neither runs the analysis transform
        assert "g_a" not in run(command, "--help").stdout


# A terminal as stdout is a usage error since issue #32: tests/test_new_user_c.py.


def test_a_truncated_record_counts_every_missing_byte(tmp_path, photo, mbt):
    assert run("encode", photo, *mbt, "-o", tmp_path / "a.cnk").exit_code == 0
    data = (tmp_path / "a.cnk").read_bytes()
    assert len(read_file(tmp_path / "a.cnk")[0].strings[0]) > 2  # the cut below falls inside the first string
    cut = len(data) - sum(len(s) for s in unpack(data).strings) - 4 + 1
    with pytest.raises(CnkError, match=rf"expected {len(data) - cut} more bytes at byte {cut} of the record"):
        unpack(data[:cut])


def test_readme_names_fail_fast_only_where_it_is_taken():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    takes = {tuple(c.split()): "--fail-fast" in run(*c.split(), "--help").stdout
             for c in ("encode", "decode", "features", "batch encode", "batch decode", "batch features", "eval")}
    assert takes == {("encode",): True, ("decode",): True, ("features",): True, ("batch", "encode"): False,
                     ("batch", "decode"): False, ("batch", "features"): False, ("eval",): False}
    assert "Every data command takes" not in readme  # batch and eval are data commands too
    assert "`comneck encode`, `decode` and `features` take" in readme
    assert "unless `--fail-fast`" not in readme.split("Batch jobs", 1)[1].split("\n")[0]
