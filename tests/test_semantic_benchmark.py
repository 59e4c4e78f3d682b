"""benchmarks/semantic_allocation.py (issue #21 item 3): its equal-bpp comparison and a smoke run of main()."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # semantic_allocation.py imports default_codec.py and evalset.py

from .conftest import TINY_CLIP, skimage_photo  # noqa: E402


def test_the_comparison_is_made_at_equal_bpp_not_at_equal_rate():
    """Semantic's curve is plain's moved down by 0.3 but sampled at other bpp: the difference is −0.3 exactly
    (pchip reproduces a curve linear in log bpp); comparing the points rate by rate would give about −0.11."""
    import semantic_allocation

    def curve(bpps, offset):
        return [(b, 2 * math.log10(b) + 5 + offset) for b in bpps]

    plain = curve([0.1, 0.2, 0.4, 0.8], 0.0)
    semantic = curve([0.12, 0.25, 0.5, 1.0], -0.3)
    result = semantic_allocation.equal_bpp_difference(plain, semantic)
    assert result["difference"] == pytest.approx(-0.3, abs=1e-9)
    assert result["bpp_range"] == pytest.approx([0.12, 0.8]) and result["note"] is None
    plain_mean = 2 * (math.log10(0.12) + math.log10(0.8)) / 2 + 5  # a linear curve's mean over the range
    assert result["relative"] == pytest.approx(-0.3 / plain_mean)
    assert semantic_allocation.equal_bpp_difference(plain, curve([1.0, 2.0], 0.0))["difference"] is None
    assert semantic_allocation.equal_bpp_difference(plain, semantic[:1])["note"] == \
        "semantic has 1 usable points; needs 2"


@pytest.mark.slow
def test_main_on_two_tiny_photos_with_a_random_clip_writes_the_report(tiny_clip_file, tmp_path, capsys):
    """Two 128-px photos, the shipped codec at two rates, the tiny CLIP with random weights: the JSON has every
    section, says loudly that the CLIP is random, names no machine path, and the plot is a PNG."""
    from PIL import Image

    import semantic_allocation

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut.png", "coffee.png"):
        Image.open(skimage_photo(name)).convert("RGB").resize((128, 128), Image.LANCZOS).save(photos / name)
    out, png = tmp_path / "report.json", tmp_path / "report.png"
    semantic_allocation.main(["--photos", str(photos), "--clip-model", TINY_CLIP, "--random-clip", "0",
                              "--rates", "2,6", "-o", str(out), "--plot", str(png)])
    text = out.read_text()
    report = json.loads(text)
    assert report["warning"] == semantic_allocation.RANDOM_WARNING and "RANDOM CLIP" in report["warning"]
    assert report["clip"]["random_seed"] == 0 and report["clip"]["model"] == TINY_CLIP
    assert report["photos"] == ["astronaut.png", "coffee.png"] and report["rates"] == [2.0, 6.0]
    assert str(tmp_path) not in text and report["weights"] == "weights/mbt2018-mean-vbr.safetensors"
    assert len(report["rows"]) == 2 * 2 * 2  # photos × rates × (plain, semantic)
    for row in report["rows"]:
        assert row["bpp"] > 0 and row["psnr"] > 15
        assert row["embedding_mse"] >= 0 and 0 <= row["embedding_cosine_distance"] <= 2 and row["patch_mse"] >= 0
    for name in report["photos"]:
        for metric in semantic_allocation.METRICS:
            entry = report["per_photo"][name][metric]
            assert math.isfinite(entry["difference"]) and entry["note"] is None
        assert report["per_photo"][name]["bd_rate_psnr"] == {"percent": None,
                                                            "note": "needs at least 4 points per curve; plain has 2"}
    for metric in semantic_allocation.METRICS:
        assert report["summary"][metric]["photos"] == 2 and 0 <= report["summary"][metric]["semantic_wins"] <= 2
    assert [p["rate"] for p in report["curves"]["semantic"]] == [2.0, 6.0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert printed.startswith(f"*** {semantic_allocation.RANDOM_WARNING} ***")


def test_without_clip_weights_it_says_which_file_is_missing_and_how_to_supply_it(tmp_path):
    """Offline, nothing cached: one sentence naming the weights and how to supply them, before any coding."""
    import semantic_allocation

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(skimage_photo("coffee.png").read_bytes())
    hint = "; or pass --clip-weights FILE, or --random-clip SEED to check the script with random weights"
    missing = tmp_path / "missing.safetensors"
    messages = []
    for options in ([], ["--clip-weights", str(missing)]):
        with pytest.raises(SystemExit) as stopped:
            semantic_allocation.main(["--photos", str(photos), *options, "-o", str(tmp_path / "out.json")])
        messages.append(str(stopped.value.code))
    default, given = messages
    assert default.startswith("semantic_allocation: CLIP weights ViT-L-14/openai are not in the local cache")
    assert "`comneck weights import clip-vit-l-14-openai FILE`" in default
    assert given.startswith(f"semantic_allocation: CLIP weights file {missing} does not exist")
    assert all(m.endswith(hint) and "\n" not in m for m in messages)
    assert not (tmp_path / "out.json").exists()


def test_the_saliency_oracle_marks_only_what_the_measuring_clip_sees(tiny_clip_file):
    """A 128×256 photo: C's eval transform keeps the centre 128×128 (its antialiasing filter reaches a few pixels
    past the crop), so the y-grid blocks of the outer 48 px each side get importance 0 and the centre spreads over
    [0, 1]; the map is the quantiser's input form (the y grid of the padded image) and is reproducible."""
    import open_clip
    import torch

    import semantic_allocation
    from comneck_cli.features import FeatureExtractor
    from comneck_cli.formats import latent_grids

    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP, pretrained=None)
    extractor = FeatureExtractor(clip=clip, k=0, device=torch.device("cpu"))
    image = np.asarray(Image.open(skimage_photo("astronaut.png")).convert("RGB").resize((256, 128), Image.LANCZOS))
    importance = semantic_allocation.saliency(image, extractor, 1.5)
    assert importance.shape == latent_grids(128, 256)[0] == (8, 16)
    assert (importance[:, :3] == 0).all() and (importance[:, 13:] == 0).all()  # never reach C
    centre = importance[:, 4:12]
    assert centre.min() >= 0 and centre.max() == 1 and centre.std() > 0.1
    assert np.array_equal(importance, semantic_allocation.saliency(image, extractor, 1.5))


@pytest.mark.slow
def test_the_saliency_guide_codes_records_with_its_map(tiny_clip_file, tmp_path):
    """--guide saliency: every semantic record carries the oracle's quantised map, and the report says which map."""
    import semantic_allocation

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(skimage_photo("coffee.png")).convert("RGB").resize((192, 128), Image.LANCZOS).save(photos / "c.png")
    out = tmp_path / "report.json"
    semantic_allocation.main(["--photos", str(photos), "--clip-model", TINY_CLIP, "--random-clip", "0",
                              "--rates", "2,6", "--guide", "saliency", "-o", str(out)])
    report = json.loads(out.read_text())
    assert report["guide"] == "saliency" and report["guide_meaning"] == semantic_allocation.GUIDES["saliency"]
    plain, semantic = ([r["bpp"] for r in report["rows"] if r["method"] == m] for m in semantic_allocation.METHODS)
    assert all(s != p for s, p in zip(semantic, plain))  # the map changed what was coded


def test_the_view_control_is_the_centre_square_on_the_y_grid():
    """A 128×256 photo: C sees x in [64, 192), the y blocks 4..11; a 100×100 photo is padded 14 px each side to 128,
    so only the blocks whose centres fall on the image (rows and columns 1..6) are 1."""
    import semantic_allocation

    wide = semantic_allocation.view_map(128, 256)
    assert wide.shape == (8, 16) and (wide[:, 4:12] == 1).all() and wide[:, :4].sum() == wide[:, 12:].sum() == 0
    small = semantic_allocation.view_map(100, 100)
    expected = np.zeros((8, 8))
    expected[1:7, 1:7] = 1
    assert np.array_equal(small, expected)


def test_padded_to_square_the_saliency_oracle_covers_the_whole_photo(tiny_clip_file):
    """With LLaVA-1.5's view (the photo on a square of CLIP's mean colour) C sees every pixel: no block of a
    128×256 photo is left at 0 for being unseen, unlike the centre crop."""
    import open_clip
    import torch

    import semantic_allocation
    from comneck_cli.features import FeatureExtractor

    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP, pretrained=None)
    extractor = FeatureExtractor(clip=clip, k=0, device=torch.device("cpu"), pad_to_square=True)
    image = np.asarray(Image.open(skimage_photo("astronaut.png")).convert("RGB").resize((256, 128), Image.LANCZOS))
    importance = semantic_allocation.saliency(image, extractor, 3.0)
    assert importance[:, :3].max() > 0 and importance[:, 13:].max() > 0 and importance.max() == 1
