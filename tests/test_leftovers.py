"""Four defects of the last review: the container's pixel-limit sentence names `max_pixels` (the CLI says
--max-pixels); `eval`'s report spells flags as stderr does; a d2/d3 record finds its registered codec by digest;
registry files get the mode open() would give."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from comneck_cli import weights as registry
from comneck_cli.cli import main
from comneck_cli.errors import InputError
from comneck_cli.formats import CnkError, Limits, Record, pack, read_file

from .conftest import TINY_CLIP, TINY_CODECS


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result


# --------------------------------------------------------------------------- 1: `max_pixels`, not --max-pixels
def test_the_pixel_limit_names_the_parameter_through_every_wrapper(tmp_path):
    """The container speaks in parameters; the sentence keeps naming `max_pixels` when the reader, the file reader
    and io.images wrap it, and the command line shows the flag."""
    sentence = "over the limit of 100 pixels; if the file is trusted, raise `max_pixels` or COMNECK_MAX_PIXELS"
    with pytest.raises(CnkError) as direct:
        Limits(max_pixels=100).check_image(20, 20, "x")
    assert str(direct.value) == f"x: 20×20 image (400 pixels), {sentence}" and direct.value.params == ("max_pixels",)
    record = Record(codec_id=1, quality=1, weights_digest=bytes(4), height=20, width=20, strings=(b"",))
    (tmp_path / "a.cnk").write_bytes(pack(record))
    with pytest.raises(CnkError) as wrapped:
        read_file(tmp_path / "a.cnk", Limits(max_pixels=100))
    assert str(wrapped.value).endswith(sentence) and wrapped.value.params == ("max_pixels",)
    from comneck_cli.io.images import check_size

    with pytest.raises(InputError) as image:
        check_size(20, 20, "x.png", Limits(max_pixels=100))
    assert str(image.value).endswith(sentence) and image.value.params == ("max_pixels",)
    flagged = "raise --max-pixels or COMNECK_MAX_PIXELS"
    r = run("decode", tmp_path / "a.cnk", "--max-pixels", "100", "-o", tmp_path / "a.png")
    assert r.exit_code == 1 and flagged in r.stderr and "`" not in r.stderr
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.cnk").write_bytes(pack(record))
    r = run("batch", "decode", "--input", tmp_path / "in", "--output", tmp_path / "out", "--max-pixels", "100")
    reason = json.loads((tmp_path / "out" / "errors.jsonl").read_text())["reason"]
    assert r.exit_code == 1 and flagged in r.stderr and flagged in reason and "`" not in r.stderr + reason
    r = CliRunner().invoke(main, ["info", str(tmp_path / "a.cnk")], env={"COMNECK_MAX_PIXELS": "100"})
    assert r.exit_code == 1 and flagged in r.stderr and "`" not in r.stderr


# --------------------------------------------------------------------------- 2: the report says flags
def test_eval_report_spells_skip_reasons_as_stderr_does(tmp_path, photos, codec_files, tiny_clip_file):
    data = tmp_path / "data"
    data.mkdir()
    Image.open(photos["coffee"]).convert("RGB").crop((0, 0, 64, 64)).save(data / "coffee.png")
    out = tmp_path / "report"
    r = run("eval", "--data", data, "-o", out, "--codec", "mbt2018-mean", "--qualities", "1", "--weights",
            f"q1={codec_files['mbt2018-mean']}", "--size", "64", "--methods", "reconstruction,postprocess", "--clip", TINY_CLIP, "--clip-tag", "test",
            "--clip-weights", tiny_clip_file)
    assert r.exit_code == 0, r.stderr
    said = next(line for line in r.stderr.splitlines() if "postprocess skipped" in line)
    reason = said.split("skipped: ", 1)[1]
    assert "pass --postprocess FILE" in reason
    summary = (out / "summary.md").read_text()
    assert f"**postprocess** skipped: {reason}" in summary and "`postprocess`" not in summary
    assert "`postprocess`" not in (out / "points.json").read_text()


# --------------------------------------------------------------------------- 3: a d2/d3 record finds its codec
def _machine_codec(folder):
    """A tiny mbt2018-mean flagged machine-only, as `weights import-comneck` flags a d3 release."""
    from compressai.registry import MODELS

    from comneck_cli.codecs import save_codec

    torch.manual_seed(3)
    path = folder / "d3.safetensors"
    save_codec(MODELS["mbt2018-mean"](**TINY_CODECS["mbt2018-mean"]).eval(), path, "mbt2018-mean", 1,
               TINY_CODECS["mbt2018-mean"], machine_only=True)
    return path


def test_decode_and_features_find_the_registered_codec_of_the_records_digest(tmp_path, photos, codec_files,
                                                                              other_weights, tiny_clip_file):
    """`elic-comneck-qQ-d2` beside the default `-qQ`: the record's weights digest names its codec; no `weights`."""
    about = {"codec": "mbt2018-mean", "quality": 1}
    registry.import_file("mbt2018-mean-q1", codec_files["mbt2018-mean"], "codec", about)
    registry.import_file("mbt2018-mean-q1-d2", other_weights, "codec", {**about, "scenario": "d2"})
    registry.import_file("mbt2018-mean-q1-d3", _machine_codec(tmp_path), "codec",
                         {**about, "scenario": "d3", "machine_only": True})
    image = tmp_path / "x.png"
    Image.open(photos["coffee"]).convert("RGB").crop((0, 0, 64, 64)).save(image)
    for scenario in ("d2", "d3"):
        r = run("encode", image, "--codec", "mbt2018-mean", "-q", "1", "--weights", f"mbt2018-mean-q1-{scenario}",
                "-o", tmp_path / f"{scenario}.cnk")
        assert r.exit_code == 0, r.stderr
    r = run("decode", tmp_path / "d2.cnk", "-o", tmp_path / "found.png")
    assert r.exit_code == 0, r.stderr
    r = run("decode", tmp_path / "d2.cnk", "--weights", other_weights, "-o", tmp_path / "named.png")
    assert r.exit_code == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "found.png")), np.asarray(Image.open(tmp_path / "named.png")))
    r = run("features", tmp_path / "d2.cnk", "--via", "reconstruction", "--clip", TINY_CLIP, "--clip-tag", "test",
            "--clip-weights", tiny_clip_file, "-o", tmp_path / "f.pt")
    assert r.exit_code == 0, r.stderr
    r = run("decode", tmp_path / "d3.cnk", "-o", tmp_path / "d3.png")
    assert r.exit_code == 1 and "coded for machines only (scenario d3)" in r.stderr
    assert not (tmp_path / "d3.png").exists()
    # named weights still win: the default's digest differs, so the mismatch is said, not worked around
    r = run("decode", tmp_path / "d2.cnk", "--weights", "mbt2018-mean-q1", "-o", tmp_path / "other.png")
    assert r.exit_code == 1 and "decode with the weights that encoded it (--weights FILE)" in r.stderr


@pytest.mark.slow  # converts three full-size released codecs, codes one 64² image with each
def test_released_d2_and_d3_records_decode_without_weights(tmp_path):
    """The authors' releases as `weights import-comneck` registers them: d1 is `elic-comneck-q1`, the default."""
    from comneck_cli import coding as api
    from comneck_cli.codecs import load_codec
    from comneck_cli.models.release import import_releases
    from tests.test_comneck_release import _layout, _save_release

    codec, neck = _layout()
    releases = [_save_release(tmp_path / f"d{s}_1.pth.tar", {**codec, "h_s.4.bias": torch.full((640,), float(s))},
                              neck) for s in (1, 2, 3)]
    import_releases(releases)
    image = np.full((64, 64, 3), 128, np.uint8)
    for scenario in ("d2", "d3"):
        (tmp_path / f"{scenario}.cnk").write_bytes(pack(api.encode(image, load_codec(
            "elic-comneck", 1, weights=f"elic-comneck-q1-{scenario}"))))
    r = run("decode", tmp_path / "d2.cnk", "-o", tmp_path / "d2.png")
    assert r.exit_code == 0, r.stderr
    r = run("decode", tmp_path / "d3.cnk", "-o", tmp_path / "d3.png")
    assert r.exit_code == 1 and "coded for machines only (scenario d3)" in r.stderr


# --------------------------------------------------------------------------- 4: shared registries are readable
@pytest.mark.parametrize("mask", [0o022, 0o077])
@pytest.mark.parametrize("move", [False, True])
def test_registry_files_get_the_mode_open_would_give(mask, move, tmp_path):
    source = tmp_path / "neck.pt"
    source.write_bytes(b"a neck")
    source.chmod(0o600)  # a moved file must not keep its own mode either
    previous = os.umask(mask)
    try:
        entry = registry.import_file("n", source, "neck", move=move)
    finally:
        os.umask(previous)
    written = [entry.path(), entry.path().parent / "manifest.json"]
    assert [oct(p.stat().st_mode & 0o777) for p in written] == [oct(0o666 & ~mask)] * 2
