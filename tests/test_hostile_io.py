"""Issue #22, items 3 and 6: outputs of one run never collide, and crafted inputs give one error line, never a
traceback. Every input is generated here from its description in the issue."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from comneck_cli.io import outputs
from comneck_cli.cli import main
from comneck_cli.errors import ComneckError
from comneck_cli.io.images import read_image
from comneck_cli.formats import CnkError, Record, container, pack, read_file


def run(*args, input=None, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, env=env, catch_exceptions=False)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    return result


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("comneck: error:")]


@pytest.fixture
def mbt(codec_files):
    return ["--codec", "mbt2018-mean", "-q", "1", "--weights", codec_files["mbt2018-mean"]]


def noise(path: Path, height: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)).save(path)
    return path


def sizes(path: Path) -> list[tuple[int, int]]:
    return [(r.height, r.width) for r in read_file(path)]


# --------------------------------------------------------------------------- item 3: one run, no collisions
def test_clashes_refuse_the_later_claim_and_name_the_earlier():
    claims = [("x/p.png", [Path("o/p.cnk")]), ("y/p.png", [Path("o/p.cnk")]), ("z.png", [Path("o/z.cnk")]),
              ("a.cnk", [Path("o/a_0001.png"), Path("o/a_0002.png")]), ("a_0002.cnk", [Path("o/a_0002.png")])]
    assert outputs.clashes(claims) == {
        1: "would write the same output as x/p.png (o/p.cnk); rename one of them",
        4: "would write the same output as a.cnk (o/a_0002.png); rename one of them",
    }


def test_clashes_ignore_case_where_the_file_system_does(monkeypatch):
    claims = [("P.png", [Path("o/P.cnk")]), ("p.png", [Path("o/p.cnk")])]
    assert outputs.clashes(claims) == {}  # this machine's file system tells P.cnk from p.cnk
    monkeypatch.setattr(outputs, "_ignores_case", lambda folder: True)  # macOS, Windows
    assert list(outputs.clashes(claims)) == [1]


def test_encode_never_lets_a_second_input_replace_the_first(tmp_path, monkeypatch, mbt):
    """`encode x/p.png y/p.png -o o/ --force` wrote one file, the second input's."""
    monkeypatch.chdir(tmp_path)
    noise(tmp_path / "x" / "p.png", 64, 64)
    noise(tmp_path / "y" / "p.png", 48, 80, seed=1)
    r = run("encode", "x/p.png", "y/p.png", "-o", "o/", "--force", *mbt)
    assert r.exit_code == 1
    assert errors(r) == ["comneck: error: y/p.png: would write the same output as x/p.png (o/p.cnk); "
                         "rename one of them"]
    assert sizes(tmp_path / "o" / "p.cnk") == [(64, 64)]  # x/p.png's record, not replaced
    # Beside the inputs, p.png and p.jpg both make p.cnk.
    noise(tmp_path / "q.png", 64, 64)
    Image.open(tmp_path / "q.png").save(tmp_path / "q.jpg")
    r = run("encode", "q.png", "q.jpg", *mbt)
    assert r.exit_code == 1 and "q.jpg: would write the same output as q.png" in r.stderr
    assert len(read_file(tmp_path / "q.cnk")) == 1


@pytest.fixture
def stream_beside_numbered(tmp_path, mbt) -> Path:
    """`a.cnk`, a stream of two records (64×64 and 48×80), beside `a_0001.cnk`, one record (32×96)."""
    folder = tmp_path / "in"
    images = [noise(tmp_path / "img" / f"{i}.png", h, w, seed=i) for i, (h, w) in enumerate([(64, 64), (48, 80),
                                                                                             (32, 96)])]
    assert run("encode", images[0], images[1], "-o", folder / "a.cnk", *mbt).exit_code == 0
    assert run("encode", images[2], "-o", folder / "a_0001.cnk", *mbt).exit_code == 0
    return folder


def test_decode_numbering_never_takes_another_inputs_name(stream_beside_numbered, tmp_path, codec_files):
    folder = stream_beside_numbered
    out = tmp_path / "out"
    r = run("decode", folder / "a.cnk", folder / "a_0001.cnk", "-o", f"{out}/", "--weights",
            codec_files["mbt2018-mean"])
    assert r.exit_code == 1
    assert errors(r) == [f"comneck: error: {folder / 'a_0001.cnk'}: would write the same output as "
                         f"{folder / 'a.cnk'} record 1 ({out / 'a_0001.png'}); rename one of them"]
    assert sorted(p.name for p in out.iterdir()) == ["a_0001.png", "a_0002.png"]
    assert Image.open(out / "a_0001.png").size == (64, 64)  # a.cnk's record 1, not a_0001.cnk's 96×32


def test_batch_decode_reports_the_collision_instead_of_losing_a_record(stream_beside_numbered, tmp_path,
                                                                        codec_files):
    """4 records in, 3 outputs out, and `batch decode` said it succeeded."""
    from comneck_cli.cli.batch_commands import batch

    out = tmp_path / "out"
    args = ["decode", "--input", stream_beside_numbered, "--output", out, "--weights", codec_files["mbt2018-mean"]]
    for attempt in range(2):  # the refusal is the same on a resumed run, and a.cnk's outputs are kept
        r = CliRunner().invoke(batch, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 1 and "Traceback" not in r.stderr
        assert f"{attempt == 0:d} done, {attempt:d} skipped, 1 failed" in r.stderr
        # (the hidden .comneck-batch-written lists what batch wrote, for the next resume)
        assert sorted(p.name for p in out.iterdir() if p.name[0] != ".") == ["a_0001.png", "a_0002.png", "errors.jsonl"]
        assert Image.open(out / "a_0001.png").size == (64, 64)
        (error,) = [json.loads(line) for line in (out / "errors.jsonl").open()]
        assert error["path"].endswith("a_0001.cnk")
        assert error["reason"].startswith(f"would write the same output as {stream_beside_numbered / 'a.cnk'}"[:40])


# --------------------------------------------------------------------------- item 6: one line, no traceback
def test_info_reports_a_lone_surrogate_and_keeps_the_other_rows(tmp_path, monkeypatch):
    good = Record(codec_id=4, quality=1, weights_digest=b"\xde\xad\xbe\xef", height=16, width=16,
                  strings=(b"\x01", b"\x02"), metadata={"k": "v"})
    (tmp_path / "good.cnk").write_bytes(pack(good))
    # A writer that escapes non-ASCII (JSON's "\ud800") can put a lone surrogate into valid UTF-8 bytes.
    with monkeypatch.context() as m:
        m.setattr(container, "_metadata_json", lambda meta: json.dumps(meta, separators=(",", ":")))
        bad = pack(Record(codec_id=4, quality=1, weights_digest=b"\xde\xad\xbe\xef", height=16, width=16,
                          strings=(b"\x01", b"\x02"), metadata={"k": "\ud800"}))
    assert b'"\\ud800"' in bad
    (tmp_path / "bad.cnk").write_bytes(bad)
    files = [tmp_path / "good.cnk", tmp_path / "bad.cnk", tmp_path / "good.cnk"]
    r = run("info", "--json", *files)
    assert r.exit_code == 1
    assert [row["file"] for row in json.loads(r.stdout)] == [str(files[0]), str(files[2])]
    (line,) = errors(r)
    assert line.startswith(f"comneck: error: {files[1]}: ") and "lone UTF-16 surrogate ('\\ud800')" in line
    r = run("info", *files)  # the table too
    assert r.exit_code == 1 and r.stdout.count("good.cnk") == 2 and len(errors(r)) == 1
    with pytest.raises(CnkError, match="lone UTF-16 surrogate"):  # and no writer can make one
        Record(codec_id=4, quality=1, weights_digest=b"\0" * 4, height=1, width=1, strings=(b"",),
               metadata={"k": "\udfff"})


def test_batch_list_naming_a_folder(tmp_path, monkeypatch, mbt):
    from comneck_cli.cli.batch_commands import batch

    monkeypatch.chdir(tmp_path)
    noise(tmp_path / "p.png", 64, 64)
    (tmp_path / "list.txt").write_text(".\np.png\n")
    r = CliRunner().invoke(batch, ["encode", "--input", "list.txt", "--output", "out", *map(str, mbt)],
                           catch_exceptions=False)
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert "comneck: error: .: is a folder, not a file; list the files in it, or give the folder itself as --input" \
        in r.stderr
    assert "1 done, 0 skipped, 1 failed" in r.stderr and (tmp_path / "out" / "p.cnk").is_file()


@pytest.mark.parametrize("manifest", ["[]", '{"x": 1}', '{"x": {"file": "f", "sha256": "s", "kind": "codec", '
                                                         '"info": 3}}'])
def test_a_damaged_user_manifest_is_one_line(manifest, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "manifest.json").write_text(manifest)
    monkeypatch.setenv("COMNECK_HOME", str(home))
    noise(tmp_path / "p.png", 64, 64)
    for args in (["encode", tmp_path / "p.png"], ["weights", "list"]):  # the shipped codec, the listing
        r = run(*args)
        assert r.exit_code == 1
        assert errors(r) == [f"comneck: error: weights manifest {home / 'weights' / 'manifest.json'} is damaged "
                             + errors(r)[0].split(" is damaged ", 1)[1]]
        assert errors(r)[0].endswith("; fix or delete it")
    assert not (tmp_path / "p.cnk").exists()


@pytest.mark.parametrize("config", ["{", '{"N": 1.5, "M": 12}', "[]", '{"N": true, "M": 12}'])
def test_a_damaged_codec_config_is_one_line(config, codec_files, tmp_path):
    source = codec_files["mbt2018-mean"]
    with safe_open(str(source), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    weights = tmp_path / "codec.safetensors"
    save_file(state, str(weights), {**meta, "config": config})
    noise(tmp_path / "p.png", 64, 64)
    r = run("encode", tmp_path / "p.png", "--codec", "mbt2018-mean", "-q", "1", "--weights", weights)
    assert r.exit_code == 1
    assert errors(r) == [f"comneck: error: weights {weights} carry a damaged codec config {config!r} (not a JSON "
                         f"object of sizes, whole numbers or lists of them); export or import the file again"]


def test_write_stdout_into_a_full_device(monkeypatch):
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        with pytest.raises(ComneckError, match="^cannot write to stdout: No space left on device$"):
            outputs.write_stdout(b"x" * 100_000)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["encode", "decode"])
def test_dash_o_into_a_full_device(command, tmp_path, codec_files):
    """The real process, its real stdout: one line, exit 1, and nothing more at exit (Python's final flush)."""
    weights = codec_files["mbt2018-mean"]
    source = noise(tmp_path / "p.png", 64, 64)
    if command == "decode":
        assert run("encode", source, "--codec", "mbt2018-mean", "-q", "1", "--weights", weights).exit_code == 0
        source = tmp_path / "p.cnk"
    args = [command, source, "-o", "-", "--weights", weights] + (["--codec", "mbt2018-mean", "-q", "1"]
                                                                  if command == "encode" else [])
    with open("/dev/full", "wb") as full:
        r = subprocess.run([sys.executable, "-m", "comneck_cli", *map(str, args)], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].endswith("cannot write to stdout: No space left on device")
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr


def test_raised_max_pixels_over_this_machines_memory(tmp_path):
    """`--max-pixels 10000000000` lets a 60000×60000 PNG header through; its pixels do not fit in memory."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = tmp_path / "huge.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(bytes(4 * 180001))) + chunk(b"IEND", b""))
    # In a child capped at 2 GiB of address space: the image needs 14 GiB, so the allocation fails for certain.
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from comneck_cli.errors import ComneckError
        from comneck_cli.io.images import read_image
        try:
            read_image({str(png)!r}, "huge.png", max_pixels=10_000_000_000)
        except ComneckError as exc:  # the library names `max_pixels`; the command line says its flag
            print(exc.render(lambda param: "--" + param.replace("_", "-")))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == ("huge.png: not enough memory to decode this image; lower --max-pixels to refuse such images "
                        "before decoding, or use a machine with more memory\n")


def test_a_malformed_environment_limit_on_encode(tmp_path, mbt):
    noise(tmp_path / "p.png", 64, 64)
    r = run("encode", tmp_path / "p.png", *mbt, env={"COMNECK_MAX_PIXELS": "abc"})
    assert r.exit_code == 1
    assert errors(r) == ["comneck: error: environment variable COMNECK_MAX_PIXELS must be a positive integer, got "
                         "'abc'; fix or unset it"]
    assert not (tmp_path / "p.cnk").exists()


def test_weights_import_with_a_long_name_or_a_home_that_is_a_file(codec_files, tmp_path, monkeypatch):
    source = codec_files["mbt2018-mean"]
    r = run("weights", "import", "a" * 300, source, "--kind", "neck")
    assert r.exit_code == 1
    assert errors(r) == [f"comneck: error: invalid weights name {'a' * 40!r}…: use up to 128 letters, digits, '-', "
                         f"'_' and '.', not starting with '.'"]
    (tmp_path / "home").write_text("not a folder")
    monkeypatch.setenv("COMNECK_HOME", str(tmp_path / "home"))
    r = run("weights", "import", "x", source, "--kind", "neck")
    assert r.exit_code == 1
    assert errors(r) == [f"comneck: error: cannot write to the user registry {tmp_path / 'home' / 'weights'} (Not a "
                         f"directory); set COMNECK_HOME to a writable folder"]
    assert (tmp_path / "home").read_text() == "not a folder"


def test_a_float_tiff_with_nan_warns_in_words_not_numpys(tmp_path):
    samples = np.full((20, 30), 100.0, np.float32)
    samples[3, 4] = np.nan
    Image.fromarray(samples, "F").save(tmp_path / "nan.tif")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(tmp_path / "nan.tif", "nan.tif")
    assert [str(w.message) for w in caught] == ["nan.tif: F samples reduced to 8 bits", "nan.tif: NaN samples set to 0"]
    assert image[3, 4].tolist() == [0, 0, 0] and image[0, 0].tolist() == [100, 100, 100]
