"""benchmarks/run.py in its smoke mode: tiny codecs, 64×64, one repeat, no ViT-L. Outcomes only, never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
CODECS = {"bmshj2018-hyperprior", "mbt2018-mean", "cheng2020-anchor", "elic2022-official"}
TIMING = {"median_s", "min_s", "runs", "first_s", "samples_s"}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "run.json"
    proc = subprocess.run([sys.executable, str(RUN), "--smoke", "-o", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Codecs" in proc.stdout and "Start-up" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


@pytest.mark.slow
def test_report_has_machine_settings_and_every_section(report):
    assert report["smoke"] is True and report["failures"] == []
    assert {"cpu_count", "platform", "python", "torch", "torch_threads", "loadavg_start", "loadavg_end"} <= set(
        report["machine"])
    assert report["machine"]["torch_threads"] == report["settings"]["threads"] == 1
    assert {"date", "settings", "images", "codecs", "batch", "features_paths", "traditional", "startup"} <= set(report)
    assert report["settings"]["sizes"] == ["64x64"]
    assert report["features_paths"] == {"skipped": "--smoke"}  # no ViT-L in smoke mode
    assert [im["source"] for im in report["images"]["64x64"]][:3] == ["astronaut.png", "coffee.png", "chelsea.png"]


@pytest.mark.slow
def test_every_codec_row_is_complete_and_matches_compressai_byte_for_byte(report):
    rows = report["codecs"]
    assert {r["codec"] for r in rows} == CODECS and all(r["size"] == "64x64" for r in rows)
    for r in rows:
        for key in ("encode", "decode", "g_a", "g_s"):
            assert TIMING <= set(r[key])
        assert {"loaded", "batch1"} <= set(r["peak_rss_mib"])
        assert r["file_bytes"] == r["payload_bytes"] + r["overhead_bytes"]
        assert r["strings"] == (11 if r["codec"] == "elic2022-official" else 2)
        assert {"batch1_x8", "batch8", "img_per_s_b1", "img_per_s", "speedup_over_b1", "g_a_b1_x8", "g_a_b8", "entropy_encode", "entropy_decode",
                "speedup_bound_if_g_a_free", "speedup_over_b1_from_min"} <= set(r["batch8"])
        h = r["head_to_head"]
        # The same model and image through CompressAI's own compress/decompress: the same bytes and pixels.
        assert h["payload_identical"] is True and h["decoded_identical"] is True
        assert h["payload_bytes"] == r["payload_bytes"]
        assert {"of_medians", "median_of_rounds"} <= set(h["encode_ratio"]) and TIMING <= set(h["decode"]["compressai"])
        if r["codec"] == "elic2022-official":
            assert h["compressai_example_can_write"] is False  # no zoo model id, dict shape
        else:
            assert h["compressai_example_can_write"] is True and h["compressai_header_bytes"] == 31
    assert report["batch"]["codec"] == "mbt2018-mean"


@pytest.mark.slow
def test_traditional_codecs_land_near_the_target_bpp(report):
    rows = report["traditional"]
    assert {(r["format"], r["size"]) for r in rows} == {("JPEG", "64x64"), ("WEBP", "64x64")}
    for r in rows:
        assert r["bytes"] * 8 / (64 * 64) == pytest.approx(r["bpp"])
        assert r["target_bpp"] == 0.5 and TIMING <= set(r["encode"]) and TIMING <= set(r["decode"])
    webp = next(r for r in rows if r["format"] == "WEBP")
    assert abs(webp["bpp"] - 0.5) < 0.25


@pytest.mark.slow
def test_startup_section_reports_commands_modules_and_imports(report):
    s = report["startup"]
    assert any(cmd.endswith("--help") for cmd in s["commands"]) and any(cmd.endswith("info") for cmd in s["commands"])
    assert set(s["torch_imported"]) == {"--help", "info"}
    assert all(isinstance(v, bool) for v in s["torch_imported"].values())
    for section in s["importtime"].values():
        assert section["modules"] > 0 and section["top_level"][0]["cumulative_us"] > 0
    # encode/decode/features as a user starts them, each against importing torch in the same rounds (issue #20)
    coding = s["coding"]["commands"]
    assert list(coding) == ['python -c "import torch"', "comneck encode", "comneck decode", "comneck features"]
    assert coding['python -c "import torch"']["ratio_to_import_torch"] == 1
    assert all(TIMING - {"first_s"} <= set(v) and v["ratio_to_import_torch"] > 0 for v in coding.values())


DEFAULT_CODEC_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "default_codec.py"


@pytest.mark.slow
def test_default_codec_benchmark_writes_json_plot_and_the_cards_results_block(vbr_codec_file, tmp_path):
    """The model card's results block comes from the run's JSON, replaces itself on a rerun and leaves the rest."""
    sys.path.insert(0, str(DEFAULT_CODEC_BENCH.parent))
    import default_codec

    card = tmp_path / "card.md"
    card.write_text("# Model card\n\nHow it was trained.\n\n## Results\n\nThe plot.\n")
    out = tmp_path / "bench.json"
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(DEFAULT_CODEC_BENCH), "--tiny", "--weights", str(vbr_codec_file),
                               "-o", str(out), "--plot", str(tmp_path / "plot.png"), "--card", str(card)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["held_out"] == ["astronaut.png", "chelsea.png"] and set(report["bd_rate"]) == {"jpeg", "webp"}
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = card.read_text()
    assert text.startswith("# Model card\n\nHow it was trained.\n\n## Results\n\nThe plot.\n\n")
    assert text.count(default_codec.CARD_BEGIN) == 1 and text.count(default_codec.CARD_END) == 1
    assert default_codec.card_results(report) in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 8 |")]
    assert len(rows) == 2  # the rates the tiny sweep has among CARD_RATES
    low, high = (float(row.split("|")[2]) for row in rows)
    assert low < high  # bpp grows with R
