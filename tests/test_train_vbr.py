"""`comneck train vbr --pre-edit` and `comneck encode --pre-edit`: joint training on semantic tokens with a tiny CLIP
and the tiny variable-rate codec, then real records."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from comneck_cli.cli import main
from comneck_cli.formats import unpack

from .conftest import TINY_CLIP
from .test_train import one_thread  # noqa: F401 (autouse fixture)

TINY_CONFIGS = Path(__file__).parent / "tiny_configs"
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


@pytest.fixture(scope="module")
def photo_folder(photos, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vbr-photos")
    for name in PHOTOS:
        shutil.copy(photos[name], folder / Path(photos[name]).name)
    return folder


def train_args(data: Path, init: Path, clip: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "vbr", "--pre-edit", "--init", str(init), "--data", str(data), "--steps", str(steps),
            "--crop", "64", "--batch-size", "4", "--clip-config", str(TINY_CONFIGS), "--clip-model", TINY_CLIP,
            "--clip-tag", "test", "--clip-weights", str(clip), "--log-every", "1", "--workers", "0", "--quiet",
            "--device", "cpu", "-o", str(out), *extra]


# For the LVLM alone (no pixel term), a low token-MSE weight, no rank term and a fast P: in a few dozen steps the rate
# term wins and P learns to drop detail. (With ρ = 1 the rank term, which resists the smoothing, cancels P's saving
# at R = 4 in these 40 steps: 2829 against 2825 bytes; at R = 8 it still saves 6%.)
FAST = ("--gamma", "0", "--beta", "0.3", "--rank-weight", "0", "--lr", "3e-4", "--pre-edit-lr", "1e-2")


@pytest.fixture(scope="module")
def trained(photo_folder, vbr_codec_file, tiny_clip_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-vbr")
    out = folder / "vbr.safetensors"
    result = CliRunner().invoke(main, train_args(photo_folder, vbr_codec_file, tiny_clip_file, out, 40, *FAST,
                                                 "--no-register", "--run-dir", str(folder / "run")))
    assert result.exit_code == 0, result.output
    return out, folder / "vbr.preedit.safetensors", folder / "run"


def test_loss_drops_and_p_learns_to_edit(trained):
    from comneck_cli.models.preedit import load_preedit
    from comneck_cli.train.loop import read_metrics

    codec_file, p_file, run = trained
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert all(1 <= r["rate"] <= 8 for r in rows) and len({r["rate"] for r in rows}) == 40  # rates over the range
    first, last = (sum(r["loss"] for r in part) / 10 for part in (rows[:10], rows[-10:]))
    assert last < 0.6 * first, (first, last)
    assert rows[-1]["edit"] > 3 * rows[0]["edit"]  # P moved away from the identity
    # The loss logged is the objective of its terms: none is left out or weighted otherwise.
    for r in rows:
        tokens = 0.3 * r["sem"]  # β (L_sem + ρ·L_rank), ρ = 0: L_rank logged, not trained on
        assert r["loss"] == pytest.approx(r["bpp"] + rate_lambda_of(codec_file, r["rate"]) * tokens, rel=1e-4)
    _, info = load_preedit(p_file)
    from comneck_cli import weights as registry

    assert info.codec_digest == registry.file_sha256(codec_file)[:8]  # P names the codec it was trained with
    assert (info.clip_model, info.clip_tag, info.config["layers"]) == (TINY_CLIP, "test", [1, 2])


def rate_lambda_of(codec_file: Path, rate: float) -> float:
    from comneck_cli.codecs import load_codec
    from comneck_cli.train.vbr import rate_lambda

    return rate_lambda(load_codec("mbt2018-mean-vbr", 1, weights=codec_file).model, rate)


def _run(name: str, folder: Path, data: Path, init: Path, clip: Path, steps: int = 16, **weights) -> list[dict]:
    """``steps`` steps of `train vbr` (codec only) from the fixture codec, written to ``folder/name/codec.safetensors``;
    the metrics of each step (every term is logged whatever its weight). Runs with the same seed see the same batches
    and draw the same rates."""
    from comneck_cli.train.loop import read_metrics
    from comneck_cli.train.vbr import VbrTrainConfig, train_vbr

    out = folder / name
    train_vbr(VbrTrainConfig(init=init, data=data, steps=steps, crop=64, batch_size=4, lr=1e-3, clip_model=TINY_CLIP,
                             clip_tag="test", clip_weights=clip, log_every=1, quiet=True, device="cpu",
                             output=out / "codec.safetensors", register=None, run_dir=out / "run", **weights))
    return read_metrics(out / "run" / "metrics.jsonl")


def _late(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows[-5:]) / 5


@pytest.mark.slow  # two 16-step runs: 20-40 s on 2 busy cores
def test_the_semantic_token_term_lowers_the_token_error(photo_folder, vbr_codec_file, tiny_clip_file, tmp_path):
    """Remove L_sem (β = 0: rate-distortion alone) and the decoded image's CLIP tokens stay much further from the
    original's than with it, over the same batches and rates."""
    common = dict(gamma=255.0**2, rank_weight=0.0)
    off = _run("off", tmp_path, photo_folder, vbr_codec_file, tiny_clip_file, beta=0.0, **common)
    on = _run("on", tmp_path, photo_folder, vbr_codec_file, tiny_clip_file, beta=4 * 255.0**2, **common)
    assert [r["rate"] for r in on] == [r["rate"] for r in off]
    assert _late(on, "sem") < 0.8 * _late(off, "sem"), (_late(on, "sem"), _late(off, "sem"))


def _fixed_crops(photos: dict[str, Path]) -> torch.Tensor:
    """16 crops of 64 px, the training crop size: four fixed places in each photo."""
    from comneck_cli.io.images import read_image

    crops = []
    for name in PHOTOS:
        pixels = torch.tensor(read_image(photos[name])).permute(2, 0, 1).float() / 255
        h, w = pixels.shape[1:]
        for i, j in ((1, 1), (1, 3), (3, 1), (3, 3)):
            y, x = (h - 64) * i // 4, (w - 64) * j // 4
            crops.append(pixels[:, y : y + 64, x : x + 64])
    return torch.stack(crops)


def _token_rank_gaps(codec_file: Path, clip_file: Path, x: torch.Tensor) -> tuple[float, float]:
    """Over the images x at every rate 1..8, coded as records code them (rounded, no noise): the trainer's L_rank
    (mean |H(x̂) - H(x)|) and the mean signed gap H(x̂) - H(x) of the log effective ranks, at the layers `train vbr`
    compares (the trainer's own ``rank_loss`` and ``token_entropy``)."""
    from comneck_cli.clip.tower import resolve_clip
    from comneck_cli.codecs import load_codec, rate_gain
    from comneck_cli.models.preedit import ClipTokens, default_layers
    from comneck_cli.train.latents import variable_rate_path
    from comneck_cli.train.losses import rank_loss, token_entropy
    from comneck_cli.train.vbr import TOKEN_FRACTIONS

    model = load_codec("mbt2018-mean-vbr", 1, weights=codec_file).model.eval()
    clip = resolve_clip(TINY_CLIP, "test", clip_file).eval()
    tokens = ClipTokens(clip, default_layers(len(clip.visual.transformer.resblocks), TOKEN_FRACTIONS))
    ranks, gaps = [], []
    with torch.no_grad():
        targets = tokens(x)
        for rate in range(1, 9):
            decoded = tokens(model.g_s(variable_rate_path(model, x, rate_gain(model, float(rate))).y_hat))
            ranks.append(rank_loss(decoded, targets).item())
            gaps += [(token_entropy(a) - token_entropy(b)).mean().item() for a, b in zip(decoded, targets)]
    return sum(ranks) / len(ranks), sum(gaps) / len(gaps)


@pytest.mark.slow  # two 200-step runs: 30-40 s on 2 busy cores
def test_the_rank_term_keeps_the_effective_rank_of_the_tokens(photo_folder, vbr_codec_file, tiny_clip_file, photos,
                                                              tmp_path):
    """Token MSE alone lets the decoded image's tokens collapse into fewer directions than the original's; the rank
    term (ρ > 0) keeps their effective rank near the original's.

    Judged on the trained codecs, on fixed crops at every rate without noise: a step's logged L_rank depends on its
    batch and rate far more than on ρ (0.1 to 0.6 from one step to the next), so a few steps' values decide nothing.
    ρ = 3: enough to matter against L_sem within 200 steps; ρ = 30 overshoots (more directions than the original's).
    """
    common = dict(gamma=0.0, beta=255.0**2, steps=200)
    _run("off", tmp_path, photo_folder, vbr_codec_file, tiny_clip_file, rank_weight=0.0, **common)
    _run("on", tmp_path, photo_folder, vbr_codec_file, tiny_clip_file, rank_weight=3.0, **common)
    x = _fixed_crops(photos)
    off_rank, off_gap = _token_rank_gaps(tmp_path / "off" / "codec.safetensors", tiny_clip_file, x)
    on_rank, on_gap = _token_rank_gaps(tmp_path / "on" / "codec.safetensors", tiny_clip_file, x)
    assert off_gap < -0.15, off_gap  # collapsed: measured -0.20 to -0.36
    assert on_rank < 0.85 * off_rank, (on_rank, off_rank)  # measured 0.53 to 0.74 of off's
    assert abs(on_gap) < 0.5 * abs(off_gap), (on_gap, off_gap)  # measured 0.06 to 0.32 of off's


def test_rank_loss_is_the_gap_of_log_effective_ranks_and_reaches_the_tokens():
    from comneck_cli.train.losses import rank_loss, token_entropy

    torch.manual_seed(0)
    spread = torch.randn(2, 16, 64)
    collapsed = torch.randn(2, 1, 64).expand(2, 16, 64) * torch.rand(2, 16, 1)  # one direction, 16 lengths
    assert token_entropy(spread).exp().min() > 10  # 16 random tokens: nearly full rank
    assert torch.allclose(token_entropy(collapsed + 1e-3 * spread).exp(), torch.ones(2), atol=0.05)
    assert torch.allclose(token_entropy(3 * spread + 5), token_entropy(spread), atol=1e-5)  # scale, offset: same
    decoded = (collapsed + 0.1 * spread).requires_grad_(True)
    loss = rank_loss([decoded], [spread])
    assert loss.item() == pytest.approx((token_entropy(spread) - token_entropy(decoded)).mean().item(), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, decoded)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert rank_loss([spread], [spread]).item() == pytest.approx(0.0, abs=1e-6)


def test_a_pre_edited_image_codes_to_fewer_bits_at_the_same_rate(trained, photos, tiny_clip_file, tmp_path):
    """Real records, written by `comneck encode`, raw and pre-edited, at the same rate parameter R."""
    import sys
    codec_file, p_file, _ = trained
    runner = CliRunner()
    sizes = {}
    for rate in ("4", "8"):
        for edit in ((), (f"--pre-edit={p_file}", "--clip-weights", str(tiny_clip_file))):
            out = tmp_path / f"{rate}-{bool(edit)}"
            result = runner.invoke(main, ["encode", *(str(photos[n]) for n in PHOTOS), "--codec", "mbt2018-mean-vbr",
                                          "--weights", str(codec_file), "--rate", rate, *edit, "-o", f"{out}/",
                                          "--quiet"])
            assert result.exit_code == 0, result.output
            for name in PHOTOS:
                record = unpack((out / f"{name}.cnk").read_bytes())
                assert record.rate == int(rate) * 1000
                assert (record.metadata or {}).get("pre_edit") == (p_file and edit and _digest(p_file) or None)
                sizes[rate, bool(edit), name] = len((out / f"{name}.cnk").read_bytes())
    print("record bytes (rate, pre-edited, photo):", sizes, file=sys.stderr)  # shown with -s: the measured savings
    for name in PHOTOS:
        assert sizes["8", True, name] < sizes["8", False, name], (name, sizes)
    for rate in ("4", "8"):
        raw, edited = (sum(sizes[rate, e, n] for n in PHOTOS) for e in (False, True))
        assert edited < (0.97 if rate == "8" else 1.0) * raw, (rate, sizes)
    # A pre-edited record is an ordinary record: it decodes with the codec alone.
    result = runner.invoke(main, ["decode", str(tmp_path / "8-True" / "coffee.cnk"), "--weights", str(codec_file),
                                  "-o", str(tmp_path / "coffee.png"), "--quiet"])
    assert result.exit_code == 0, result.output


def _digest(path: Path) -> str:
    from comneck_cli import weights as registry

    return registry.file_sha256(path)[:8]


def test_resume_is_exact_and_defaults_register_both(photo_folder, vbr_codec_file, tiny_clip_file, tmp_path, photos):
    from comneck_cli import weights as registry
    from comneck_cli.modelfiles import read_safetensors
    from comneck_cli.train.loop import read_metrics

    runner = CliRunner()
    straight = runner.invoke(main, train_args(photo_folder, vbr_codec_file, tiny_clip_file, tmp_path / "a.safetensors",
                                              6, *FAST, "--no-register", "--run-dir", str(tmp_path / "a")))
    assert straight.exit_code == 0, straight.output
    half = runner.invoke(main, train_args(photo_folder, vbr_codec_file, tiny_clip_file, tmp_path / "b.safetensors", 3,
                                          *FAST, "--no-register", "--run-dir", str(tmp_path / "b")))
    assert half.exit_code == 0, half.output
    resumed = runner.invoke(main, ["train", "vbr", "--resume", str(tmp_path / "b" / "checkpoint.pt"), "--steps", "6",
                                   "--clip-config", str(TINY_CONFIGS), "--quiet", "--workers", "0", "--device", "cpu",
                                   "--log-every", "1", "-o", str(tmp_path / "b.safetensors")])  # default registration
    assert resumed.exit_code == 0, resumed.output
    a_rows, b_rows = ([{k: v for k, v in r.items() if k != "seconds"}  # wall time differs, nothing else may
                       for r in read_metrics(tmp_path / d / "metrics.jsonl")] for d in ("a", "b"))
    assert len(a_rows) == 6 and a_rows == b_rows
    for suffix in (".safetensors", ".preedit.safetensors"):
        a, _ = read_safetensors(tmp_path / f"a{suffix}", "model")
        b, _ = read_safetensors(tmp_path / f"b{suffix}", "model")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), suffix
    assert registry.lookup("mbt2018-mean-vbr").kind == "codec"
    entry = registry.lookup("mbt2018-mean-vbr-preedit")
    assert entry.kind == "preedit" and entry.info["codec_digest"] == registry.lookup("mbt2018-mean-vbr").sha256[:8]
    # `encode --pre-edit` without a value finds both in the registry.
    registry.import_file(f"clip-{TINY_CLIP.lower()}-test", tiny_clip_file, "clip")
    out = tmp_path / "c.cnk"
    result = runner.invoke(main, ["encode", str(photos["chelsea"]), "--codec", "mbt2018-mean-vbr", "--rate", "2.5",
                                  "-o", str(out), "--quiet", "--pre-edit"])
    assert result.exit_code == 0, result.output
    assert unpack(out.read_bytes()).metadata == {"pre_edit": entry.sha256[:8]}


def test_batch_encode_pre_edit_writes_what_encode_writes(trained, photos, tiny_clip_file, tmp_path):
    _, p_file, _ = trained
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("coffee", "chelsea"):
        shutil.copy(photos[name], src / Path(photos[name]).name)
    runner = CliRunner()
    codec = ["--codec", "mbt2018-mean-vbr", "--weights", str(trained[0]), "--rate", "2.5", "--quiet"]
    edit = [f"--pre-edit={p_file}", "--clip-weights", str(tiny_clip_file)]
    base = ["batch", "encode", "--input", str(src), "--output", str(out), *codec]
    result = runner.invoke(main, [*base, *edit])
    assert result.exit_code == 0, result.output
    for name in ("coffee", "chelsea"):
        single = tmp_path / f"{name}.cnk"
        result = runner.invoke(main, ["encode", str(photos[name]), *codec, *edit, "-o", str(single)])
        assert result.exit_code == 0, result.output
        assert (out / f"{name}.cnk").read_bytes() == single.read_bytes()
        assert unpack(single.read_bytes()).metadata == {"pre_edit": _digest(p_file)}
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*.cnk")}
    assert runner.invoke(main, [*base, *edit]).exit_code == 0
    assert stamp == {p: p.stat().st_mtime_ns for p in out.glob("*.cnk")}  # done already: skipped
    assert runner.invoke(main, base).exit_code == 0  # unedited is other work: redone
    assert all(unpack(p.read_bytes()).metadata is None for p in out.glob("*.cnk"))


def test_bad_input_is_one_error_line(photo_folder, vbr_codec_file, tiny_clip_file, codec_files, photos, tmp_path):
    runner = CliRunner()
    cases = [
        (train_args(photo_folder, vbr_codec_file, tiny_clip_file, tmp_path / "x.safetensors", 2, "--codec",
                    "mbt2018-mean", "--no-register"), "fixed quality levels"),
        (train_args(photo_folder, vbr_codec_file, tiny_clip_file, tmp_path / "x.safetensors", 2, "--token-layers",
                    "0,9", "--no-register"), "must lie in 1..4"),
        (train_args(photo_folder, vbr_codec_file, tiny_clip_file, tmp_path / "x.safetensors", 2, "--beta", "0",
                    "--gamma", "0", "--no-register"), "--beta or --gamma must be positive"),
        (train_args(photo_folder, vbr_codec_file, tiny_clip_file, tmp_path / "x.safetensors", 2, "--rank-weight",
                    "-1", "--no-register"), "must not be negative"),
        (["encode", str(photos["chelsea"]), "--codec", "mbt2018-mean", "--weights", str(codec_files["mbt2018-mean"]),
          "-q", "1", "--pre-edit", "-o", str(tmp_path / "x.cnk")], "no pre-editing module 'mbt2018-mean-preedit' is registered"),
        (["encode", str(photos["chelsea"]), "--codec", "mbt2018-mean-vbr", "--weights", str(vbr_codec_file),
          f"--pre-edit={tmp_path / 'missing.safetensors'}", "-o", str(tmp_path / "x.cnk")], "does not exist"),
    ]
    for args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output
        assert result.output.count("comneck: error:") == 1
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.cnk").exists()


def test_one_neck_serves_every_rate(vbr_codec_file, tiny_clip_file, photos, tmp_path):
    """`train neck --codec mbt2018-mean-vbr` (no -q): rates drawn over 1..8, y_hat exactly what records hold; then
    `features` takes records of several rates with the one neck, found in the registry."""
    from comneck_cli import weights as registry
    from comneck_cli.codecs import load_codec, rate_gain
    from comneck_cli.models.neck import EVERY_RATE, load_neck
    from comneck_cli.train.latents import frozen_latents
    from comneck_cli.train.loop import read_metrics

    from .conftest import make_image_folder

    photo_folder = make_image_folder(tmp_path / "data")  # class folders: stage 1's cross-entropy needs labels
    codec = load_codec("mbt2018-mean-vbr", 1, weights=vbr_codec_file)
    x = torch.rand(1, 3, 64, 64)
    for rate in (1.0, 3.217, 8.0):  # the frozen path the neck trains on is the y_hat Codec.code writes
        at = codec.at_rate(rate)
        assert torch.equal(frozen_latents(at.model, at.spec.family, x, rate_gain(at.model, rate)), at.compress(x)[1])

    runner = CliRunner()
    result = runner.invoke(main, ["train", "neck", "--codec", "mbt2018-mean-vbr", "--codec-weights",
                                  str(vbr_codec_file), "--data", str(photo_folder), "--clip-config", str(TINY_CONFIGS),
                                  "--clip-model", TINY_CLIP, "--clip-tag", "test", "--clip-weights", str(tiny_clip_file),
                                  "--steps", "0,0,12", "--lr", "3e-3", "--crop", "64", "--batch-size", "4",
                                  "--log-every", "1", "--workers", "0", "--quiet", "--device", "cpu",
                                  "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    entry = registry.lookup("mbt2018-mean-vbr-neck")
    _, info = load_neck(entry.path())
    assert info.quality == EVERY_RATE and info.codec_digest == codec.digest.hex()
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 12
    registry.import_file(f"clip-{TINY_CLIP.lower()}-test", tiny_clip_file, "clip")
    files = []
    for rate in ("1.5", "4", "7.25"):
        out = tmp_path / f"r{rate}.cnk"
        assert runner.invoke(main, ["encode", str(photos["coffee"]), "--codec", "mbt2018-mean-vbr", "--weights",
                                    str(vbr_codec_file), "--rate", rate, "-o", str(out), "--quiet"]).exit_code == 0
        files.append(str(out))
    result = runner.invoke(main, ["features", *files, "--weights", str(vbr_codec_file), "-o",
                                  str(tmp_path / "f.pt"), "--layer", "-1", "--quiet"])
    assert result.exit_code == 0, result.output
    feats = torch.load(tmp_path / "f.pt", weights_only=True)["features"]
    assert feats.shape[0] == 3 and torch.isfinite(feats).all()
    assert not torch.equal(feats[0], feats[2])  # other rates, other latents, other features
    result = runner.invoke(main, ["train", "neck", "--scenario", "d2", "--codec", "mbt2018-mean-vbr", "--data",
                                  str(photo_folder), "--steps", "1", "--quiet"])
    assert result.exit_code == 1 and "scenario d1 only" in result.output


def test_eval_reports_the_pre_edit_method(trained, photos, tiny_clip_file, tmp_path):
    """`comneck eval --methods reconstruction,vbr-preedit` with the variable-rate codec: rates are the pre-edited
    records' bytes (P's digest in their metadata included); without a registered P the method is skipped."""
    import json

    from PIL import Image

    from comneck_cli import weights as registry
    from comneck_cli.cli.eval_commands import eval_command
    from comneck_cli.io.images import read_image

    codec_file, p_file, _ = trained
    data = tmp_path / "data"
    data.mkdir()
    pixels = read_image(photos["astronaut"])
    for n, (y, x) in enumerate([(40, 60), (250, 300)]):
        Image.fromarray(pixels[y : y + 128, x : x + 128]).save(data / f"{n}.png")
    args = ["--data", str(data), "--codec", "mbt2018-mean-vbr", "--qualities", "4,8", "--weights", str(codec_file),
            "--clip", TINY_CLIP, "--clip-tag", "none", "--clip-weights", str(tiny_clip_file), "--size", "128",
            "--methods", "reconstruction,vbr-preedit"]
    out = CliRunner().invoke(eval_command, [*args, "-o", str(tmp_path / "r1")])
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "r1" / "points.json").read_text())
    assert "mbt2018-mean-vbr-preedit" in json.dumps({m["name"]: m for m in report["methods"]}["vbr-preedit"])
    out = CliRunner().invoke(eval_command, [*args, "--pre-edit", str(p_file), "-o", str(tmp_path / "r0")])
    assert out.exit_code == 0, out.output
    given = {m["name"]: m for m in json.loads((tmp_path / "r0" / "points.json").read_text())["methods"]}
    assert given["vbr-preedit"]["status"] == "ok", given["vbr-preedit"]

    registry.import_file("mbt2018-mean-vbr-preedit", p_file, "preedit")
    out = CliRunner().invoke(eval_command, [*args, "-o", str(tmp_path / "r2")])
    assert out.exit_code == 0, out.output
    rows = json.loads((tmp_path / "r2" / "points.json").read_text())["images"]
    got = {(r["method"], r["image"]): r for r in rows if r["point"] == "q8"}
    from comneck_cli import coding as api
    from comneck_cli.codecs import load_codec
    from comneck_cli.models.preedit import load_pre_edit
    from comneck_cli.formats import pack

    codec = load_codec("mbt2018-mean-vbr", 8, weights=codec_file)
    editor = load_pre_edit(p_file, codec, clip_weights=tiny_clip_file)
    for image in ("0.png", "1.png"):
        pixels = read_image(data / image)
        expected = len(pack(api.encode(editor(pixels), codec, metadata={"pre_edit": editor.digest})))
        raw, edited = got["reconstruction", image], got["vbr-preedit", image]
        assert edited["bytes"] == expected and edited["bpp"] == 8 * expected / (128 * 128)
        assert edited["psnr"] != raw["psnr"] and edited["feature_mse"] > 0  # people and CLIP see the edit's decode
