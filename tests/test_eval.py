"""`comneck eval`: every number in the report recomputed independently, skips with reasons, --resume, BD-rate."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from comneck_cli.cli import main
from comneck_cli.eval import METHOD_NAMES
from comneck_cli.eval.baselines import TRADITIONAL, ImageCodec
from comneck_cli.cli.eval_commands import eval_command, parse_spec
from comneck_cli.eval.report import bd_rate

from .conftest import TINY_CLIP


def run(*args, command=main):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result


def evaluate(*args):
    return run(*args, command=eval_command)


@pytest.fixture
def data(tmp_path, photos):
    """Two classes × two 64×64 crops: the tiny codec's 4×4 latent grid is the tiny ViT's 4×4 patch grid."""
    root = tmp_path / "data"
    crops = {"cat": ("chelsea", [(50, 100), (100, 200)]), "cup": ("coffee", [(100, 200), (200, 300)])}
    for label, (photo, corners) in crops.items():
        (root / label).mkdir(parents=True)
        pixels = np.asarray(Image.open(photos[photo]).convert("RGB"))
        for n, (y, x) in enumerate(corners):
            Image.fromarray(pixels[y : y + 64, x : x + 64]).save(root / label / f"{n}.png")
    return root


@pytest.fixture
def common(data, codec_files, neck_file, tiny_clip_file):
    return ["--data", data, "--codec", "mbt2018-mean", "--qualities", "1", "--weights",
            f"q1={codec_files['mbt2018-mean']}", "--neck", neck_file,
            "--clip-weights", tiny_clip_file, "--size", "64"]


def report_of(folder):
    return json.loads((folder / "points.json").read_text())


def image_row(report, method, image="cat/0.png"):
    return next(r for r in report["images"] if r["method"] == method and r["image"] == image)


def log_points(folder):
    return [line for line in (folder / "points.jsonl").read_text().splitlines()[1:]]


def test_report_numbers_match_an_independent_computation(common, tmp_path, codec_files, neck_file, tiny_clip_file,
                                                          data):
    out = tmp_path / "report"
    r = evaluate(*common, "-o", out, "--methods", "neck,reconstruction,uncompressed,jpeg,webp")
    assert r.exit_code == 0, r.stderr
    report = report_of(out)
    assert len(report["images"]) == 4 * 5 and {m["status"] for m in report["methods"]} == {"ok"}
    image = data / "cat" / "0.png"
    original = np.asarray(Image.open(image).convert("RGB"))

    # Rate: the .cnk file `comneck encode` writes, container included.
    r = run("encode", image, "--codec", "mbt2018-mean", "-q", "1", "--weights", codec_files["mbt2018-mean"], "-o",
            tmp_path / "x.cnk")
    assert r.exit_code == 0, r.stderr
    bpp = 8 * (tmp_path / "x.cnk").stat().st_size / (64 * 64)
    assert image_row(report, "reconstruction")["bpp"] == image_row(report, "neck")["bpp"] == bpp

    # PSNR of what a person sees: `comneck decode`, for the neck as well (same bits, same g_s).
    assert run("decode", tmp_path / "x.cnk", "-o", tmp_path / "x_hat.png", "--weights",
               codec_files["mbt2018-mean"]).exit_code == 0
    x_hat = np.asarray(Image.open(tmp_path / "x_hat.png")).astype(np.float64)
    psnr = 10 * math.log10(255**2 / np.mean((x_hat - original) ** 2))
    assert image_row(report, "reconstruction")["psnr"] == pytest.approx(psnr, abs=1e-9)
    assert image_row(report, "neck")["psnr"] == pytest.approx(psnr, abs=1e-9)

    # Feature fidelity against C(x), from `comneck features` on both sides.
    feats = {}
    for via, source in (("neck", tmp_path / "x.cnk"), ("reconstruction", tmp_path / "x.cnk"), ("uncompressed", image)):
        r = run("features", source, "--via", via, "-o", tmp_path / f"{via}.pt", "--neck", neck_file,
                "--clip-weights", tiny_clip_file, "--weights", codec_files["mbt2018-mean"])
        assert r.exit_code == 0, r.stderr
        feats[via] = torch.load(tmp_path / f"{via}.pt", weights_only=True)["features"][0].double()
    assert feats["neck"].shape == (16, 64)
    for via in ("neck", "reconstruction"):
        row = image_row(report, via)
        cosine = F.cosine_similarity(feats[via], feats["uncompressed"], dim=-1).mean().item()
        assert row["feature_cosine"] == pytest.approx(cosine, abs=1e-5)
        assert row["feature_mse"] == pytest.approx(((feats[via] - feats["uncompressed"]) ** 2).mean().item(), rel=1e-4)
    assert image_row(report, "uncompressed")["feature_mse"] == 0
    assert image_row(report, "uncompressed")["feature_cosine"] == pytest.approx(1.0, abs=1e-12)

    # Traditional codecs: the reported setting reproduces the reported bytes and pixels.
    for name in ("jpeg", "webp"):
        row = image_row(report, name)
        quality = int(row["setting"].removeprefix("quality="))
        buffer = io.BytesIO()
        Image.fromarray(original).save(buffer, format=TRADITIONAL[name].format, quality=quality)
        assert row["bpp"] == 8 * len(buffer.getvalue()) / (64 * 64)
        decoded = np.asarray(Image.open(buffer).convert("RGB")).astype(np.float64)
        assert row["psnr"] == pytest.approx(10 * math.log10(255**2 / np.mean((decoded - original) ** 2)), abs=1e-9)
    # uncompressed: the rate of the image as PNG (the data file is a Pillow PNG with the same defaults).
    assert image_row(report, "uncompressed")["bpp"] == 8 * image.stat().st_size / (64 * 64)
    assert image_row(report, "uncompressed")["psnr"] is None

    # Zero-shot on C(x): open_clip's text tower, "a photo of a {}.", normalised embeddings.
    import open_clip

    model = open_clip.create_model(TINY_CLIP, pretrained=str(tiny_clip_file)).eval()
    with torch.no_grad():
        tokens = open_clip.get_tokenizer(TINY_CLIP)(["a photo of a cat.", "a photo of a cup."])
        text = F.normalize(model.encode_text(tokens), dim=-1)
    for name in ("cat/0.png", "cat/1.png", "cup/0.png", "cup/1.png"):
        r = run("features", data / name, "--via", "uncompressed", "--select", "pooled", "-o", tmp_path / "p.pt",
                "--neck", neck_file, "--clip-weights", tiny_clip_file, "--force")
        embedding = torch.load(tmp_path / "p.pt", weights_only=True)["features"]
        predicted = ["cat", "cup"][int((F.normalize(embedding, dim=-1) @ text.T).argmax())]
        row = image_row(report, "uncompressed", name)
        assert row["predicted"] == predicted and row["correct"] == int(predicted == name.split("/")[0])

    # Averages are the means of the image rows; the CSV carries the same numbers.
    for mean in report["means"]:
        rows = [r for r in report["images"] if (r["method"], r["point"]) == (mean["method"], mean["point"])]
        assert mean["n"] == 4
        assert mean["bpp"] == pytest.approx(sum(r["bpp"] for r in rows) / 4)
        assert mean["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 4)
        assert mean["ms_ssim"] is None and mean["counts"]["ms_ssim"] == 0
    table = list(csv.DictReader(io.StringIO((out / "points.csv").read_text())))
    csv_mean = next(r for r in table if r["kind"] == "mean" and r["method"] == "reconstruction")
    json_mean = next(m for m in report["means"] if m["method"] == "reconstruction")
    assert float(csv_mean["psnr"]) == json_mean["psnr"] and len(table) == len(report["means"]) + 20

    # One PNG per measured metric; MS-SSIM is not measured on 64 px images and the summary says why.
    for metric in ("psnr", "feature_mse", "feature_cosine", "accuracy"):
        assert (out / f"{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "ms_ssim.png").exists()
    summary = (out / "summary.md").read_text()
    assert "MS-SSIM needs the short side > 160 px" in summary
    assert "needs at least 4 points per curve" in summary  # one quality: no BD-rate, and why


def test_methods_that_cannot_run_are_reported_with_their_reason(data, tmp_path, codec_files, tiny_clip_file):
    out = tmp_path / "report"
    r = evaluate("--data", data, "-o", out, "--codec", "mbt2018-mean", "--qualities", "1", "--weights",
                 codec_files["mbt2018-mean"], "--clip", TINY_CLIP, "--clip-tag", "test", "--clip-weights", tiny_clip_file,
                 "--size", "64",
                 "--methods", "reconstruction,neck,postprocess,jxl")
    assert r.exit_code == 0, r.stderr
    report, summary = report_of(out), (out / "summary.md").read_text()
    status = {m["name"]: m for m in report["methods"]}
    skipped = {(s["method"], s["point"]): s["reason"] for s in report["skipped"]}
    assert status["reconstruction"]["status"] == "ok"
    # No U-Net given.
    assert status["postprocess"]["status"] == "skipped"
    assert "no post-processing U-Net given" in skipped[("postprocess", None)]
    assert "**postprocess** skipped: no post-processing U-Net given" in summary
    # No neck given and none registered under mbt2018-mean-q1-neck.
    assert status["neck"]["status"] == "skipped"
    assert "mbt2018-mean-q1-neck" in skipped[("neck", "q1")] and "comneck train neck" in skipped[("neck", "q1")]
    assert "**neck q1** skipped" in summary
    # JPEG XL: Pillow 13 has no encoder; skipped with the reason unless a plugin is installed.
    reason = TRADITIONAL["jxl"].unavailable()
    if reason is None:
        assert status["jxl"]["status"] == "ok"
    else:
        assert "no JPEG XL encoder is installed" in reason and skipped[("jxl", None)] == reason
        assert f"**jxl** skipped: {reason}" in summary and "skipped" in r.stderr
    assert {r["method"] for r in report["images"]} == {"reconstruction"} | ({"jxl"} if reason is None else set())


def test_resume_does_not_recompute_finished_points(common, tmp_path, monkeypatch):
    from comneck_cli import coding as api

    out = tmp_path / "report"
    args = [*common, "-o", out, "--methods", "reconstruction,jpeg,uncompressed", "--batch-size", "2"]
    assert evaluate(*args).exit_code == 0
    first = log_points(out)
    assert len(first) == 12

    calls = {"encode": 0, "jpeg": 0}
    real_encode, real_jpeg = api.encode, ImageCodec.encode

    def counting_encode(*a, **k):
        calls["encode"] += 1
        return real_encode(*a, **k)

    def counting_jpeg(self, *a, **k):
        calls["jpeg"] += 1
        return real_jpeg(self, *a, **k)

    monkeypatch.setattr(api, "encode", counting_encode)
    monkeypatch.setattr(ImageCodec, "encode", counting_jpeg)
    r = evaluate(*args, "--resume")
    assert r.exit_code == 0, r.stderr
    assert calls == {"encode": 0, "jpeg": 0} and log_points(out) == first
    assert "0 point(s) computed, 12 taken from the log" in r.stderr

    # An interrupted run: the last three rows (one jpeg, two uncompressed) are missing, the last line is cut short.
    kept = (out / "points.jsonl").read_text().splitlines()[:-3]
    (out / "points.jsonl").write_text("\n".join(kept) + "\n" + first[-3][:40])
    r = evaluate(*args, "--resume")
    assert r.exit_code == 0, r.stderr
    again = log_points(out)
    assert again[:9] == first[:9]  # untouched, timestamps included

    def keys(lines):
        return [(json.loads(line)["method"], json.loads(line)["image"]) for line in lines]

    assert keys(again[9:]) == keys(first[9:]) and keys(first[9:])[0][0] == "jpeg"
    assert calls["encode"] == 1 and calls["jpeg"] > 0  # only the jpeg row needed its .cnk rate target
    assert len(report_of(out)["images"]) == 12

    # Without --resume the log is not overwritten; other settings cannot be resumed.
    r = evaluate(*args)
    assert r.exit_code == 1 and "already holds an evaluation" in r.stderr and "--resume" in r.stderr
    r = evaluate(*args, "--resume", "--layer", "-1")
    assert r.exit_code == 1 and "layer = -2, not -1" in r.stderr
    assert evaluate(*args, "--force", "--quiet").exit_code == 0 and len(log_points(out)) == 12


def test_bd_rate_of_shifted_curves_is_the_shift():
    rates = [0.1, 0.2, 0.4, 0.8]
    psnr = [30.0, 33.0, 35.0, 36.5]
    anchor = list(zip(rates, psnr))
    value, note = bd_rate(anchor, [(r * 1.1, d) for r, d in anchor])
    assert note is None and value == pytest.approx(10.0, abs=1e-9)
    value, _ = bd_rate(anchor, [(r / 1.1, d) for r, d in anchor])
    assert value == pytest.approx(-100 / 11, abs=1e-9)  # -9.09 %
    # A lower-is-better metric (feature MSE): same answer.
    mse = [0.5, 0.3, 0.2, 0.15]
    value, _ = bd_rate(list(zip(rates, mse)), [(r * 1.1, m) for r, m in zip(rates, mse)], higher_is_better=False)
    assert value == pytest.approx(10.0, abs=1e-9)
    # What cannot be computed says why.
    assert bd_rate(anchor[:3], anchor[:3]) == (None, "needs at least 4 points per curve; anchor has 3")
    value, reason = bd_rate(anchor, [(0.1, 30), (0.2, 32), (0.4, 31), (0.8, 34)], names=("a", "b"), metric="psnr")
    assert value is None and "b's psnr does not improve strictly with rate" in reason
    value, reason = bd_rate(anchor, [(0.1, 30), (0.1, 32), (0.4, 33), (0.8, 34)])
    assert value is None and "two points at the same rate" in reason
    value, reason = bd_rate(anchor, [(r, d + 20) for r, d in anchor])
    assert value is None and "do not overlap" in reason
    value, reason = bd_rate(anchor, [(r, d + 3) for r, d in anchor])
    assert value is not None and reason.startswith("curves overlap only partly in the metric: ")
    assert reason.split(": ")[1].split(" % of their joint range")[0].isdigit()

    # The report's table: every method against reconstruction, on every metric, or the reason.
    from comneck_cli.eval.report import bd_rates

    def means(method, scale, points=4):
        return [{"method": method, "point": f"q{i}", "bpp": rates[i] * scale, "psnr": psnr[i], "ms_ssim": None,
                 "feature_mse": mse[i], "feature_cosine": 0.5 + i / 10, "accuracy": 0.5} for i in range(points)]

    table = bd_rates(means("reconstruction", 1) + means("jpeg", 1.1) + means("webp", 1, 3)
                     + [{**means("uncompressed", 50, 1)[0], "point": "lossless"}],
                     ["reconstruction", "jpeg", "webp", "uncompressed"])
    assert table["reconstruction"]["psnr"] == {"value": None, "reason": "anchor"}
    assert table["jpeg"]["psnr"]["value"] == pytest.approx(10.0)
    assert table["jpeg"]["feature_mse"]["value"] == pytest.approx(10.0)
    assert table["jpeg"]["ms_ssim"]["reason"] == "reconstruction has no ms_ssim at some points"
    assert "does not improve strictly" in table["jpeg"]["accuracy"]["reason"]
    assert table["webp"]["psnr"]["reason"] == "needs at least 4 points per curve; webp has 3"
    assert "single point" in table["uncompressed"]["psnr"]["reason"]


@pytest.mark.parametrize("shape", [(176, 176), (200, 256), (203, 261), (161, 170)])
def test_ms_ssim_is_pytorch_msssim_above_160_px_and_says_why_below(photos, shape):
    """The separable float64 MS-SSIM equals pytorch-msssim's (the reference CompressAI reports), odd sides included."""
    from pytorch_msssim import ms_ssim as reference

    from comneck_cli.eval.metrics import ms_ssim

    pixels = np.asarray(Image.open(photos["astronaut"]).convert("RGB"))[: shape[0], : shape[1]]
    noise = np.random.default_rng(0).integers(-20, 20, pixels.shape)
    noisy = np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8)
    value, reason = ms_ssim(pixels, noisy)
    as_tensor = lambda a: torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)[None]  # noqa: E731
    expected = float(reference(as_tensor(pixels), as_tensor(noisy), data_range=255))
    assert reason is None and expected < 0.99 and value == pytest.approx(expected, abs=1e-5)
    assert ms_ssim(pixels[:160], noisy[:160]) == (None, "MS-SSIM needs the short side > 160 px (pytorch-msssim's 4 "
                                                        "downsamplings); images are 160 px")


def test_postprocess_unet_runs_and_is_counted(common, tmp_path, codec_files, other_weights):
    from comneck_cli import weights as registry
    from comneck_cli.eval.methods import unet_cost
    from comneck_cli.models.unet import PostprocessInfo, UNet, save_postprocess

    # The standard U-Net (base 64, depth 4, 3 -> 3 channels): the paper's 31.04 M parameters.
    cost = unet_cost(UNet(), 64, 64)
    assert cost.params == 31_037_763 and cost.kmac_per_px(64, 64) == pytest.approx(735.104)

    torch.manual_seed(0)
    unet = UNet(base=4, depth=2)
    digest = registry.file_sha256(codec_files["mbt2018-mean"])[:8]
    info = PostprocessInfo("mbt2018-mean", 1, digest, TINY_CLIP, "test")
    save_postprocess(unet, tmp_path / "unet.safetensors", info)
    save_postprocess(unet, tmp_path / "other.safetensors",
                     PostprocessInfo("mbt2018-mean", 1, registry.file_sha256(other_weights)[:8], TINY_CLIP, "test"))
    out = tmp_path / "report"
    r = evaluate(*common, "-o", out, "--methods", "reconstruction,postprocess", "--postprocess",
                 f"q1={tmp_path / 'unet.safetensors'}")
    assert r.exit_code == 0, r.stderr
    report = report_of(out)
    post, recon = image_row(report, "postprocess"), image_row(report, "reconstruction")
    assert post["bpp"] == recon["bpp"] and post["psnr"] == recon["psnr"]  # same bits; people see g_s's output
    assert post["feature_mse"] != recon["feature_mse"]  # CLIP sees the U-Net's output
    assert "U-Net 0.01 M parameters" in (out / "summary.md").read_text()
    r = evaluate(*common, "-o", tmp_path / "r2", "--methods", "postprocess", "--postprocess",
                 tmp_path / "other.safetensors")
    reason = report_of(tmp_path / "r2")["skipped"][0]["reason"]
    assert r.exit_code == 0 and "trained on reconstructions of mbt2018-mean quality 1 weights" in reason
    # Without --postprocess, the registry's CODEC-qQ-postprocess.
    registry.import_file("mbt2018-mean-q1-postprocess", tmp_path / "unet.safetensors", "postprocess")
    r = evaluate(*common, "-o", tmp_path / "r3", "--methods", "postprocess")
    assert r.exit_code == 0, r.stderr
    assert image_row(report_of(tmp_path / "r3"), "postprocess")["feature_mse"] == post["feature_mse"]


def test_registry_lookups_machine_only_neck_and_unlabelled_data(tmp_path, photos, codec_files, tiny_clip_file):
    from comneck_cli import weights as registry
    from comneck_cli.models.neck import NeckInfo, TransformNeck, save_neck

    flat = tmp_path / "flat"
    flat.mkdir()
    for n, key in enumerate(("astronaut", "coffee", "chelsea")):
        Image.open(photos[key]).convert("RGB").crop((100, 100, 180, 164)).save(flat / f"{n}.png")  # 80×64
    torch.manual_seed(1)
    neck = TransformNeck(latent_channels=12, width=64, heads=4, grid=(4, 4))
    digest = registry.file_sha256(codec_files["mbt2018-mean"])[:8]
    save_neck(neck, tmp_path / "d3.safetensors", NeckInfo("mbt2018-mean", 1, digest, TINY_CLIP, "test", 2, "d3"))
    registry.import_file("mbt2018-mean-q1", codec_files["mbt2018-mean"], "codec")
    registry.import_file("mbt2018-mean-q1-neck", tmp_path / "d3.safetensors", "neck")
    out = tmp_path / "report"
    args = ["--data", flat, "--codec", "mbt2018-mean", "--qualities", "1", "--methods", "neck,reconstruction",
            "--clip-weights", tiny_clip_file,
            "--size", "64", "--limit", "2"]
    r = evaluate(*args, "-o", tmp_path / "bad", "--layer", "1")
    skipped = report_of(tmp_path / "bad")["skipped"]
    assert r.exit_code == 0 and "computed inside C's first k=2 blocks" in skipped[0]["reason"]
    r = evaluate(*args, "-o", tmp_path / "bad2", "--layer", "9")
    assert r.exit_code == 1 and "hidden-state layer 9 does not exist" in r.stderr
    r = evaluate(*args, "-o", out, "--select", "pooled")
    assert r.exit_code == 0, r.stderr
    report = report_of(out)
    assert report["settings"]["clip_model"] == TINY_CLIP  # taken from the registered neck
    rows = [r for r in report["images"] if r["method"] == "neck"]
    assert [r["image"] for r in rows] == ["0.png", "1.png"]  # --limit
    assert all(r["psnr"] is None and r["correct"] is None and r["feature_cosine"] is not None for r in rows)
    assert "a machine-only (d3) codec has no reconstruction for people" in rows[0]["notes"]
    assert image_row(report, "reconstruction", "0.png")["psnr"] > 0
    summary = (out / "summary.md").read_text()
    assert "no class labels" in summary and "Not measured: the data has no class labels" in summary
    # Every last-layer token through ln_post and the projection (LLaMA-Adapter's input) compares too.
    r = evaluate(*args, "-o", tmp_path / "projected", "--select", "projected", "--methods", "reconstruction")
    assert r.exit_code == 0, r.stderr
    assert -1 <= image_row(report_of(tmp_path / "projected"), "reconstruction", "0.png")["feature_cosine"] <= 1


NAMES = st.text(st.characters(blacklist_characters=",=", blacklist_categories=("Cs",)), min_size=1)


@given(st.dictionaries(st.integers(1, 8), NAMES.map(str.strip).filter(bool), min_size=1))
def test_per_quality_specs_round_trip(spec):
    assert parse_spec(",".join(f"q{q}={value}" for q, value in spec.items()), "--neck") == spec


def test_option_parsing_and_the_cli_stays_light():
    assert parse_spec("q1=a.safetensors, q3=name", "--neck") == {1: "a.safetensors", 3: "name"}
    assert parse_spec("2=x", "--neck") == {2: "x"} and parse_spec("file", "--neck") == {None: "file"}
    assert parse_spec(None, "--neck") == {}
    with pytest.raises(Exception, match="one FILE for every quality"):
        parse_spec("a,b", "--neck")
    r = CliRunner().invoke(eval_command, ["--data", ".", "-o", "x", "--methods", "neck,vvc"])
    assert r.exit_code == 2 and "unknown method 'vvc'" in r.stderr
    r = CliRunner().invoke(eval_command, ["--data", ".", "-o", "x", "--for", "honeybee", "--layer", "-2"])
    assert r.exit_code == 2 and "--for honeybee sets --layer -1; drop --layer -2" in r.stderr
    from comneck_cli.eval.methods import METHODS

    assert tuple(METHODS) == METHOD_NAMES
    code = "import sys, comneck_cli.cli.eval_commands; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_pixel_methods_run_without_clip_weights(data, tmp_path, codec_files, monkeypatch):
    """Issue #23.12: `eval --methods jpeg,webp` offline: PSNR/MS-SSIM are measured, CLIP's metrics say why not."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    out = tmp_path / "report"
    args = ["--data", data, "--codec", "mbt2018-mean", "--qualities", "1", "--weights",
            f"q1={codec_files['mbt2018-mean']}", "--size", "64", "-o", out]
    r = evaluate(*args, "--methods", "reconstruction,jpeg,webp")
    assert r.exit_code == 0, r.stderr
    assert "feature metrics and accuracy are not measured" in r.stderr
    rows = report_of(out)["images"]
    assert len(rows) == 4 * 3
    assert all(row["psnr"] is not None and row["feature_mse"] is None and row["correct"] is None for row in rows), rows
    assert "CLIP: not available" in (out / "summary.md").read_text()
    # a method that compares features still needs the tower: one error line, not a pixels-only report
    r = evaluate(*args, "--methods", "uncompressed", "--force")
    assert r.exit_code == 1 and "CLIP weights" in r.stderr
