"""The command line as a user runs it: round trips on shipped photos, pipes, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import click
from click.testing import CliRunner
from PIL import Image

from comneck_cli.cli import main
from comneck_cli.formats import Record, pack, unpack


def run(*args, input=None):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture
def work(tmp_path, photos):
    for key in ("chelsea", "rocket", "camera"):
        shutil.copy(photos[key], tmp_path)
    return tmp_path


@pytest.fixture
def mbt(codec_files):
    return ["--codec", "mbt2018-mean", "-q", "1", "--weights", codec_files["mbt2018-mean"]]


def test_encode_decode_round_trip_beside_inputs(work, mbt, codec_files):
    r = run("encode", work / "chelsea.png", work / "rocket.jpg", *mbt, "--quiet")
    assert r.exit_code == 0, r.stderr
    assert (work / "chelsea.cnk").is_file() and (work / "rocket.cnk").is_file()
    r = run("decode", work / "chelsea.cnk", "-o", work / "out.webp", "--weights", codec_files["mbt2018-mean"])
    assert r.exit_code == 0, r.stderr
    with Image.open(work / "out.webp") as img:
        assert img.format == "WEBP" and img.size == (451, 300)


def test_decode_matches_library_decode(work, mbt, codec_files):
    from comneck_cli import decode, load_codec

    original = (work / "camera.png").read_bytes()
    run("encode", work / "camera.png", *mbt)
    r = run("decode", work / "camera.cnk", "--weights", codec_files["mbt2018-mean"])
    assert r.exit_code == 0 and (work / "camera.decoded.png").is_file()  # the default name is never the source's
    assert (work / "camera.png").read_bytes() == original
    run("decode", work / "camera.cnk", "-o", work / "camera_hat.png", "--weights", codec_files["mbt2018-mean"])
    codec = load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    expected = decode(unpack((work / "camera.cnk").read_bytes()), codec)
    assert np.array_equal(np.asarray(Image.open(work / "camera_hat.png")), expected)


def test_pipes_and_concatenated_streams(work, mbt, codec_files):
    a = run("encode", "-", *mbt, "-o", "-", input=(work / "chelsea.png").read_bytes())
    b = run("encode", "-", *mbt, "-o", "-", input=(work / "camera.png").read_bytes())
    assert a.exit_code == b.exit_code == 0
    stream = a.stdout_bytes + b.stdout_bytes  # `cat a.cnk b.cnk`
    r = run("decode", "-", "-o", f"{work / 'out'}/", "--weights", codec_files["mbt2018-mean"], input=stream)
    assert r.exit_code == 0, r.stderr
    sizes = sorted(Image.open(p).size for p in (work / "out").iterdir())
    assert sizes == [(451, 300), (512, 512)]
    png = run("decode", "-", "--weights", codec_files["mbt2018-mean"], input=a.stdout_bytes)
    assert png.stdout_bytes.startswith(b"\x89PNG")


def test_many_inputs_to_one_file_make_a_stream(work, mbt):
    r = run("encode", work / "chelsea.png", work / "camera.png", *mbt, "-o", work / "all.cnk")
    assert r.exit_code == 0
    info = json.loads(run("info", work / "all.cnk", "--json").stdout)
    assert [(i["width"], i["height"]) for i in info] == [(451, 300), (512, 512)]


def test_info_reports_sizes_consistently(work, mbt):
    run("encode", work / "rocket.jpg", *mbt)
    path = work / "rocket.cnk"
    [row] = json.loads(run("info", path, "--json").stdout)
    size = path.stat().st_size
    assert row["total_bytes"] == size
    assert row["overhead_bytes"] == size - sum(row["strings"]) == size - row["payload_bytes"]
    assert row["bpp"] == pytest.approx(8 * size / (row["width"] * row["height"]))
    assert row["codec"] == "mbt2018-mean" and row["quality"] == 1
    table = run("info", path)
    assert "mbt2018-mean" in table.stdout and "overhead" in table.stdout


def test_info_and_help_do_not_import_torch(work, mbt):
    run("encode", work / "rocket.jpg", *mbt)
    code = (
        "import sys\nfrom comneck_cli.cli import main\n"
        "for args in (['--help'], ['info', sys.argv[1]]):\n"
        "    try:\n        main(args)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code, str(work / "rocket.cnk")], check=True, capture_output=True)


def test_a_bad_input_fails_alone(work, mbt):
    (work / "notes.png").write_text("not an image")
    r = run("encode", work / "notes.png", work / "camera.png", *mbt, "-o", f"{work / 'out'}/")
    assert r.exit_code == 1
    assert r.stderr.count("comneck: error:") == 1 and "notes.png: not a readable image" in r.stderr
    assert (work / "out" / "camera.cnk").is_file()
    r = run("encode", work / "notes.png", work / "rocket.jpg", *mbt, "--fail-fast")
    assert r.exit_code == 1 and not (work / "rocket.cnk").exists()


def test_existing_output_needs_force(work, mbt):
    target = work / "camera.cnk"
    target.write_bytes(b"precious")
    r = run("encode", work / "camera.png", *mbt)
    assert r.exit_code == 1 and "already exists; pass --force" in r.stderr
    assert target.read_bytes() == b"precious"
    assert run("encode", work / "camera.png", *mbt, "--force").exit_code == 0
    assert target.read_bytes().startswith(b"CN")


@pytest.fixture
def good_cnk(work, mbt) -> Path:
    run("encode", work / "rocket.jpg", *mbt)
    return work / "rocket.cnk"


def _decode_error(path, codec_files) -> str:
    r = run("decode", path, "-o", path.with_suffix(".png"), "--weights", codec_files["mbt2018-mean"])
    assert r.exit_code == 1
    assert not path.with_suffix(".png").exists(), "partial output left behind"
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("comneck: error: ")
    return lines[0]


@pytest.mark.parametrize("cut", [1, 3, 9, 20, -5, -1])
def test_truncated_cnk(good_cnk, codec_files, cut):
    data = good_cnk.read_bytes()
    good_cnk.write_bytes(data[:cut] if cut > 0 else data[:cut])
    assert "truncated" in _decode_error(good_cnk, codec_files)


def test_flipped_byte_wrong_magic_future_version(good_cnk, codec_files):
    data = bytearray(good_cnk.read_bytes())
    data[len(data) // 2] ^= 0x40
    good_cnk.write_bytes(bytes(data))
    assert "CRC" in _decode_error(good_cnk, codec_files)
    good_cnk.write_bytes(b"XY" + bytes(data[2:]))
    assert "not a .cnk file" in _decode_error(good_cnk, codec_files)
    fresh = bytearray(data)
    fresh[len(data) // 2] ^= 0x40
    fresh[2] = 0x20
    good_cnk.write_bytes(bytes(fresh))
    assert "version 2" in _decode_error(good_cnk, codec_files)


def test_unknown_codec_id_and_wrong_weights(good_cnk, codec_files, other_weights):
    record = unpack(good_cnk.read_bytes())
    fields = {k: getattr(record, k) for k in ("quality", "weights_digest", "height", "width", "strings")}
    good_cnk.write_bytes(pack(Record(codec_id=200, **fields)))
    assert "codec id 200" in _decode_error(good_cnk, codec_files)
    good_cnk.write_bytes(pack(record))
    r = run("decode", good_cnk, "--weights", other_weights)
    assert r.exit_code == 1 and "decode with the weights that encoded it" in r.stderr


def test_usage_and_option_errors(work, mbt):
    assert run("encode", work / "camera.png", "--codec", "elic2022-official", "-q", "7").exit_code == 2
    r = run("encode", work / "camera.png", "--codec", "nope")
    assert r.exit_code == 2 and "'nope' is not one of" in r.stderr
    assert run("encode", work / "camera.png", "-q", "0").exit_code == 2
    assert run("encode").exit_code == 2
    if not __import__("torch").cuda.is_available():
        r = run("encode", work / "camera.png", *mbt, "--device", "cuda")
        assert r.exit_code == 1 and "no CUDA device" in r.stderr


def test_weights_import_and_list(codec_files, work):
    r = run("weights", "import", "mbt2018-mean-q1", codec_files["mbt2018-mean"])
    assert r.exit_code == 0
    listing = {e["name"]: e for e in json.loads(run("weights", "list", "--json").stdout)}
    assert listing.keys() == {"mbt2018-mean-q1", "mbt2018-mean-vbr"}  # the import and the shipped default codec
    assert listing["mbt2018-mean-vbr"]["origin"] == "shipped" and listing["mbt2018-mean-q1"]["origin"] == "user"
    # Registered: encode and decode need no --weights.
    assert run("encode", work / "camera.png", "--codec", "mbt2018-mean", "-q", "1").exit_code == 0
    assert run("decode", work / "camera.cnk", "-o", work / "c.png").exit_code == 0


def test_machine_only_records_are_refused_by_decode(good_cnk, codec_files):
    record = unpack(good_cnk.read_bytes())
    fields = {k: getattr(record, k) for k in ("codec_id", "quality", "weights_digest", "height", "width", "strings")}
    good_cnk.write_bytes(pack(Record(machine_only=True, **fields)))
    assert "machines only" in _decode_error(good_cnk, codec_files)


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "comneck_cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "encode" in r.stdout


def test_batched_encoding_decodes_like_single(work, mbt, codec_files):
    inputs = [work / "chelsea.png", work / "camera.png", work / "rocket.jpg"]
    assert run("encode", *inputs, *mbt, "--batch-size", "3", "-o", work / "batch.cnk").exit_code == 0
    assert run("encode", *inputs, *mbt, "-o", work / "single.cnk").exit_code == 0
    from comneck_cli import decode, load_codec
    from comneck_cli.formats import read_file

    codec = load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    batch, single = read_file(work / "batch.cnk"), read_file(work / "single.cnk")
    assert [(r.width, r.height) for r in batch] == [(451, 300), (512, 512), (640, 427)]
    for a, b in zip(batch, single):
        assert decode(a, codec).shape == decode(b, codec).shape


# --------------------------------------------------------------------------- the Click layer over the library
def test_library_errors_name_flags_and_usage_errors_exit_2(work, mbt):
    """The library names parameters (`semantic`); the CLI prints the running command's flags, and a library
    UsageError exits 2 like Click's own, before any model loads."""
    r = run("encode", work / "camera.png", *mbt, "--semantic-strength", "2", "-o", work / "x.cnk")
    assert r.exit_code == 2 and "--semantic-strength needs --semantic" in r.stderr and "`" not in r.stderr
    assert not (work / "x.cnk").exists()
    from comneck_cli.cli.batch_commands import batch
    from comneck_cli.cli.plumbing import flag

    with click.Context(batch.commands["encode"]):
        assert flag("num_gpus") == "--num-gpus-per-worker" and flag("clip_model") == "--clip"
        assert flag("max_pixels") == "--max-pixels"
    with click.Context(click.Command("x", params=[click.Option(["--clip-model", "clip_model"])])):
        assert flag("clip_model") == "--clip-model"  # `comneck train` spells it so


def test_encode_files_reports_and_progresses_without_the_cli(work, codec_files):
    """coding.files.encode_files is the library behind `comneck encode`: planned outputs, per-input failures to
    the report, on_progress(done, total), no printing."""
    from comneck_cli import coding as api
    from comneck_cli.coding.files import encode_files

    class Report:
        def __init__(self):
            self.warnings, self.failures = [], []

        def warn(self, text):
            self.warnings.append(text)

        def fail(self, label, exc):
            self.failures.append((label, exc.render(lambda p: f"<{p}>")))

    (work / "rocket.cnk").write_bytes(b"")  # exists: refused without force
    (work / "bad.png").write_bytes(b"not an image")
    progress, report = [], Report()
    codec = api.load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    names = [str(work / n) for n in ("camera.png", "rocket.jpg", "bad.png")]
    encode_files(names, None, lambda: api.ImageEncoder(codec), report, on_progress=lambda d, t: progress.append((d, t)))
    assert (work / "camera.cnk").stat().st_size > 0 and (work / "rocket.cnk").stat().st_size == 0
    assert report.failures[0] == (names[1], f"{work / 'rocket.cnk'} already exists; pass <force> to overwrite it")
    assert report.failures[1][0] == names[2] and "not a readable image" in report.failures[1][1]
    assert sorted(progress) == [(1, 3), (2, 3), (3, 3)]


def test_library_text_reaching_the_cli_names_the_commands_flags():
    """eval's skip reasons and failures arrive as text: their backticked parameters are spelled as the command's
    flags, other backticked words are left alone."""
    import click

    from comneck_cli.cli.plumbing import spell_params

    @click.command()
    @click.option("--clip", "clip_model")
    @click.option("--postprocess")
    def command(clip_model, postprocess):
        click.echo(spell_params("pass `postprocess` FILE or `clip_model`; see `comneck weights` and `other`"))

    out = CliRunner().invoke(command, []).output
    assert out == "pass --postprocess FILE or --clip; see `comneck weights` and `other`\n"
