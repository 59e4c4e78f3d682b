"""``comneck eval --mllm DIR --prompts FILE`` (issue #29 item 4) on the tiny random LLaVA of tests/mllm_fixtures.py:
answer agreement and the teacher-forced KL against the model's answers about the original image."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from comneck_cli.cli.eval_commands import eval_command
from tests.mllm_fixtures import llava_dir, mllm, mllm_neck  # noqa: F401 (fixtures)

PROMPT = "what is this ?"


def _pixels(path: Path, side: int = 64) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC))


def _own_logprobs(mllm, image: np.ndarray, answer: torch.Tensor) -> torch.Tensor:
    """By hand, through the model's own processor and pixel path: the prompt's tokens, then the answer's, one forward
    pass, and the log-softmax of the logits at the positions just before each answer token."""
    inputs = mllm.processor(images=Image.fromarray(image), text=mllm.prompt_text(PROMPT), return_tensors="pt")
    start = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], answer.view(1, -1)], dim=1)
    with torch.inference_mode():
        logits = mllm.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                            pixel_values=inputs["pixel_values"]).logits[0]
    return torch.log_softmax(torch.stack([logits[start - 1 + j] for j in range(len(answer))]).float(), dim=-1)


def test_teacher_forced_logprobs_and_kl_match_a_hand_computation(mllm, photos):
    """The log-probabilities follow the reference answer on the right positions (each row's argmax is the greedy
    token it predicts) and equal the model's own forward pass on pixels; the judge's KL is KL(original || compressed)
    averaged over the answer's positions, computed here by hand."""
    from comneck_cli.eval.data import Item
    from comneck_cli.eval.methods import Entry, Outcome, Point
    from comneck_cli.eval.mllm import AnswerJudge

    original, other = _pixels(photos["chelsea"]), _pixels(photos["rocket"])
    features = mllm.image_features(original)
    answer = mllm.answer_ids(mllm.generate_ids(features, PROMPT, 6)[0])
    assert len(answer) >= 2
    ours = mllm.answer_logprobs(features, PROMPT, answer)
    assert ours.argmax(dim=-1).tolist() == answer.tolist()  # greedy: row j predicts token j
    torch.testing.assert_close(ours, _own_logprobs(mllm, original, answer), atol=1e-5, rtol=1e-5)

    p, q = _own_logprobs(mllm, original, answer), _own_logprobs(mllm, other, answer)
    by_hand = sum(float(torch.sum(p[j].exp() * (p[j] - q[j]))) for j in range(len(answer))) / len(answer)
    assert by_hand > 1e-4  # the two images are told apart, so a KL on the wrong distribution would show

    judge = AnswerJudge(mllm, [PROMPT], max_new_tokens=6)
    entry = Entry(Item("cat.png", Path("cat.png"), None), original)
    point = Point("jpeg", "q1", 1, {})
    scores = judge.score(None, None, point, entry, Outcome(100, other, clip_image=other))
    assert scores["mllm_kl"] == pytest.approx(by_hand, rel=1e-4)
    other_answer = mllm.generate(mllm.image_features(other), PROMPT, 6)
    assert scores["mllm_agreement"] == float(other_answer == judge.reference(entry)[0].text)
    same = judge.score(None, None, Point("uncompressed", "lossless", None, {}), entry,
                       Outcome(100, None, clip_image=original, is_reference=True))
    assert (same["mllm_agreement"], same["mllm_kl"]) == (1.0, pytest.approx(0.0, abs=1e-6))


def _data(root: Path, photos) -> Path:
    for label, names in {"cat": ("chelsea", "astronaut"), "cup": ("coffee", "rocket")}.items():
        (root / label).mkdir(parents=True)
        for name in names:
            Image.fromarray(_pixels(photos[name])).save(root / label / f"{name}.png")
    return root


def test_eval_mllm_report_and_plots(llava_dir, photos, tmp_path, codec_files, neck_file, tiny_clip_file):
    """Every method's rows carry agreement and KL; the uncompressed input against itself agrees fully with KL 0; a
    neck of another tower keeps its CLIP metrics and says why its answers are not measured; the report's JSON, CSV
    and PNGs hold the new metrics."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\nwhat is the big red ?\n")
    out = tmp_path / "report"
    result = CliRunner().invoke(eval_command, [str(a) for a in (
        "--data", _data(tmp_path / "data", photos), "--codec", "mbt2018-mean", "--qualities", "1", "--weights",
        f"q1={codec_files['mbt2018-mean']}", "--neck", neck_file, "--clip-weights", tiny_clip_file, "--size", "64",
        "--methods", "uncompressed,reconstruction,jpeg,neck", "--mllm", llava_dir, "--prompts", prompts,
        "--max-new-tokens", "4", "-o", out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "points.json").read_text())
    assert report["settings"]["mllm"]["prompts"] == [PROMPT, "what is the big red ?"]
    rows = {(r["method"], r["image"]): r for r in report["images"]}
    assert len(rows) == 4 * 4
    for image in ("cat/chelsea.png", "cup/rocket.png"):
        lossless = rows[("uncompressed", image)]
        assert lossless["mllm_agreement"] == 1.0 and lossless["mllm_kl"] == pytest.approx(0.0, abs=1e-6)
        assert len(lossless["mllm_answers"]) == 2
        for method in ("reconstruction", "jpeg"):
            row = rows[(method, image)]
            assert 0.0 <= row["mllm_agreement"] <= 1.0 and row["mllm_kl"] >= 0.0
        neck = rows[("neck", image)]
        assert neck["mllm_kl"] is None and neck["feature_mse"] is not None
        assert any(n.startswith(f"MLLM answers not measured: neck {neck_file} was trained for CLIP "
                                "comneck-tiny-ViT-14/test") for n in neck["notes"])
    assert any(r["mllm_kl"] > 0 for r in report["images"] if r["method"] in ("reconstruction", "jpeg"))
    means = {m["method"]: m for m in report["means"]}
    assert means["uncompressed"]["mllm_agreement"] == 1.0
    for name in ("mllm_agreement.png", "mllm_kl.png", "accuracy.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    table = list(csv.DictReader(io.StringIO((out / "points.csv").read_text())))
    assert {"mllm_agreement", "mllm_kl"} <= set(table[0])
    summary = (out / "summary.md").read_text()
    assert "## MLLM answer agreement with the original" in summary and "- MLLM: " in summary


def test_eval_mllm_usage_and_missing_model(tmp_path, photos, codec_files):
    """--mllm without --prompts is a usage error; a model that is not there is one line before anything loads."""
    base = ["--data", str(_data(tmp_path / "data", photos)), "--codec", "mbt2018-mean", "--qualities", "1",
            "--weights", f"q1={codec_files['mbt2018-mean']}", "--methods", "jpeg", "-o", str(tmp_path / "r")]
    usage = CliRunner().invoke(eval_command, base + ["--mllm", "x"])
    assert usage.exit_code == 2 and "--mllm and --prompts go together" in usage.output
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    missing = CliRunner().invoke(eval_command, base + ["--mllm", "llava-hf/llava-1.5-7b-hf", "--prompts",
                                                       str(prompts)])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert missing.stderr.startswith("comneck: error: MLLM llava-hf/llava-1.5-7b-hf is neither a folder nor in the "
                                     "Hugging Face cache")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    r = CliRunner().invoke(eval_command, base + ["--mllm", "llava-hf/llava-1.5-7b-hf", "--prompts", str(empty)])
    assert r.exit_code == 1 and "holds no prompt; write one prompt a line" in r.stderr


def test_eval_mllm_with_a_neck_trained_for_the_models_tower(llava_dir, mllm_neck, photos, tmp_path, codec_files):
    """A neck trained with `train neck --clip-from-mllm` (3 steps): eval's C and C' are the model's own tower, so
    the neck rows carry CLIP fidelity and the MLLM's agreement and KL; zero-shot accuracy is skipped (no text
    tower); the neck's answers are those `ask --via neck` gives for the same image's record."""
    from comneck_cli import coding as api
    from comneck_cli.codecs import load_codec
    from comneck_cli.formats import pack, unpack
    from comneck_cli.mllm import load_mllm

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n")
    out = tmp_path / "report"
    data = _data(tmp_path / "data", photos)
    result = CliRunner().invoke(eval_command, [str(a) for a in (
        "--data", data, "--codec", "mbt2018-mean", "--qualities", "1", "--weights",
        f"q1={codec_files['mbt2018-mean']}", "--neck", mllm_neck, "--size", "64",
        "--methods", "uncompressed,neck,reconstruction", "--mllm", llava_dir, "--prompts", prompts,
        "--max-new-tokens", "4", "-o", out)])
    assert result.exit_code == 0, result.output
    assert "zero-shot accuracy is not measured: the MLLM's vision tower has no text tower" in result.output
    report = json.loads((out / "points.json").read_text())
    assert report["settings"]["clip_model"] == "hf-clip-w64-l4-p14-56"
    assert report["settings"]["clip_tag"].startswith("mllm-")
    rows = {(r["method"], r["image"]): r for r in report["images"]}
    assert len(rows) == 3 * 4
    for row in rows.values():
        assert row["correct"] is None and row["feature_mse"] is not None
        assert not any(n.startswith("MLLM answers not measured") for n in row["notes"]), row["notes"]
        assert row["mllm_agreement"] is not None and row["mllm_kl"] is not None and len(row["mllm_answers"]) == 1
    lossless = [r for (method, _), r in rows.items() if method == "uncompressed"]
    assert all(r["mllm_agreement"] == 1.0 and r["mllm_kl"] == pytest.approx(0.0, abs=1e-6) for r in lossless)
    assert all(r["feature_mse"] == pytest.approx(0.0, abs=1e-10) for r in lossless)  # C is the model's own tower
    assert all(r["mllm_kl"] > 0.0 for (method, _), r in rows.items() if method == "neck")
    mllm = load_mllm(llava_dir)
    codec = load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    for image in ("cat/chelsea.png", "cup/rocket.png"):  # already 64², so eval codes these very pixels
        record = pack(api.encode(_pixels(data / image), codec))
        asked, = mllm.ask([record], PROMPT, via="neck", neck=mllm_neck, weights=codec_files["mbt2018-mean"],
                          max_new_tokens=4)
        assert rows[("neck", image)]["mllm_answers"] == [asked.answer]
        features = mllm.neck_features(unpack(record), mllm_neck, codec_files["mbt2018-mean"])
        assert rows[("neck", image)]["mllm_kl"] == pytest.approx(_kl_by_hand(mllm, _pixels(data / image), features),
                                                                 rel=1e-4)
    means = {m["method"]: m for m in report["means"]}
    assert means["neck"]["mllm_agreement"] is not None and means["neck"]["accuracy"] is None
    assert (out / "mllm_agreement.png").read_bytes().startswith(b"\x89PNG")


def _kl_by_hand(mllm, image: np.ndarray, features: torch.Tensor) -> float:
    """KL(original || ``features``) along the model's 4-token greedy answer about ``image``, as eval defines it."""
    from comneck_cli.eval.mllm import kl_along

    original = mllm.image_features(image)
    answer = mllm.answer_ids(mllm.generate_ids(original, PROMPT, 4)[0])
    return kl_along(mllm.answer_logprobs(original, PROMPT, answer), mllm.answer_logprobs(features, PROMPT, answer))


@pytest.mark.slow
def test_eval_mllm_semantic_adapter_for_the_models_tower(llava_dir, vbr_codec_file, photos, tmp_path):
    """`--methods semantic-adapter` with a decoder adapter made for the tiny LLaVA's tower (random, as `train
    adapter` cannot train against an MLLM's tower): the adapter's tower becomes eval's C without --clip, and its rows
    carry the KL of E(x_hat) + A(y_hat) through the model's own tower, computed here by hand."""
    from comneck_cli import coding as api
    from comneck_cli import weights as registry
    from comneck_cli.codecs import load_codec
    from comneck_cli.coding.semantic import DEFAULT_STRENGTH, Guide, semantic_map
    from comneck_cli.formats import pack
    from comneck_cli.mllm import load_mllm
    from comneck_cli.models.adapter import AdapterInfo, DecoderAdapter, save_adapter

    mllm = load_mllm(llava_dir)
    torch.manual_seed(1)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(DecoderAdapter(latent_channels=24, width=64, heads=4, grid=mllm.tower.grid), adapter, AdapterInfo(
        codec="mbt2018-mean-vbr", codec_digest=registry.file_sha256(vbr_codec_file)[:8], clip_model=mllm.tower_id[0],
        clip_tag=mllm.tower_id[1], shallow_layer=0, loss_weights=(0.1, 1.0), warmup_epochs=0.0))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n")
    data = _data(tmp_path / "data", photos)
    result = CliRunner().invoke(eval_command, [str(a) for a in (
        "--data", data, "--codec", "mbt2018-mean-vbr", "--qualities", "2", "--weights", f"q2={vbr_codec_file}",
        "--adapter", adapter, "--size", "64", "--methods", "semantic-adapter", "--mllm", llava_dir,
        "--prompts", prompts, "--max-new-tokens", "4", "-o", tmp_path / "report")])
    assert result.exit_code == 0, result.output
    rows = {r["image"]: r for r in json.loads((tmp_path / "report" / "points.json").read_text())["images"]}
    assert len(rows) == 4 and all(r["mllm_agreement"] is not None and r["feature_mse"] is not None
                                  for r in rows.values())
    codec = load_codec("mbt2018-mean-vbr", 2, weights=vbr_codec_file)
    image = _pixels(data / "cup" / "rocket.png")
    record = api.encode(image, codec, importance=semantic_map(image, Guide(mllm.open_clip_model()), DEFAULT_STRENGTH))
    assert rows["cup/rocket.png"]["bytes"] == len(pack(record))
    features = mllm.adapter_features(record, adapter, vbr_codec_file)
    assert rows["cup/rocket.png"]["mllm_kl"] == pytest.approx(_kl_by_hand(mllm, image, features), rel=1e-4)


def test_models_of_an_mllm_tower_need_that_mllm(llava_dir, mllm_neck, photos, tmp_path, codec_files):
    """A neck trained for the tiny LLaVA's tower, evaluated without --mllm or with another checkpoint (another
    tower), is refused in one line naming the tower and what to pass, not as an unknown open_clip model."""
    from tests.mllm_fixtures import build_tiny_llava

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n")
    base = ["--data", str(_data(tmp_path / "data", photos)), "--codec", "mbt2018-mean", "--qualities", "1",
            "--weights", f"q1={codec_files['mbt2018-mean']}", "--neck", str(mllm_neck), "--size", "64",
            "--methods", "neck", "-o", str(tmp_path / "r")]
    alone = CliRunner().invoke(eval_command, base)
    assert alone.exit_code == 1 and "Traceback" not in alone.output
    assert alone.stderr.startswith("comneck: error: the models were trained for the vision tower of an MLLM "
                                   "(hf-clip-w64-l4-p14-56/mllm-")
    assert alone.stderr.endswith("but no --mllm is given; pass that checkpoint as --mllm, with --prompts\n")
    other = build_tiny_llava(tmp_path / "other-llava", seed=1)
    wrong = CliRunner().invoke(eval_command, base + ["--mllm", str(other), "--prompts", str(prompts), "--force"])
    assert wrong.exit_code == 1 and wrong.stderr.count("\n") == 1
    assert f"but {other}'s tower is hf-clip-w64-l4-p14-56/mllm-" in wrong.stderr
