"""Issue #34.2's speed table: benchmarks/decode_speed.py times two codec files on one photo in interleaved rounds and
writes every sample. Tiny random codecs: it checks the script, not the speed (no timing is asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import make_codec_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import decode_speed  # noqa: E402


def test_two_codecs_are_timed_round_by_round(tmp_path, capsys):
    first = make_codec_file(tmp_path, "mbt2018-mean-vbr", seed=0, quality=0)
    second = make_codec_file(tmp_path, "mbt2018-mean-vbr", seed=1, quality=0)
    out = tmp_path / "speed.json"
    assert decode_speed.main(["--weights", str(first), "--weights", str(second), "--rates", "1,8", "--repeat", "2",
                              "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["codec"].split()[0], r["rate"]) for r in report["rows"]] == [("mbt2018-mean-vbr", 1.0),
                                                                             ("mbt2018-mean-vbr", 8.0)] * 2
    assert report["rows"][0]["codec"] != report["rows"][2]["codec"]  # named by digest
    for row in report["rows"]:
        assert len(row["decode_samples_ms"]) == len(row["encode_samples_ms"]) == 2 and row["bpp"] > 0
    assert all(r["decode_ratio"] == 1.0 for r in report["rows"][:2])  # the first file is the baseline
    assert "decode ms" in capsys.readouterr().out


def test_a_file_without_codec_metadata_is_one_line(tmp_path):
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))
    with pytest.raises(SystemExit, match="names no codec"):
        decode_speed.main(["--weights", str(bare), "-o", str(tmp_path / "o.json")])
