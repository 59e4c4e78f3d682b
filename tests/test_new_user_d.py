"""A new user's pass over `comneck ask`, `serve --mllm` and `train neck --clip-from-mllm`, offline on the tiny LLaVA:
one test per defect found."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from comneck_cli.cli import main
from tests.mllm_fixtures import llava_dir  # noqa: F401 (fixture)

PROMPT = "what is this ?"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def broken_checkpoints(llava_dir: Path, root: Path) -> dict[str, Path]:
    """Folders a user may pass as --mllm by mistake: no LLaVA config at all, a config without weights, weights
    without the processor's files, a truncated weights file."""
    folders = {name: root / name for name in ("no-config", "no-weights", "no-processor", "truncated")}
    folders["no-config"].mkdir()
    (folders["no-config"] / "config.json").write_text("{}")
    folders["no-weights"].mkdir()
    shutil.copy(llava_dir / "config.json", folders["no-weights"])
    shutil.copytree(llava_dir, folders["no-processor"])
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (folders["no-processor"] / name).unlink(missing_ok=True)
    shutil.copytree(llava_dir, folders["truncated"])
    weights = folders["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return folders


# ---------------------------------------------------------------- a folder that is not a usable LLaVA checkpoint
def test_ask_refuses_a_broken_checkpoint_folder_in_one_line(llava_dir, photos, tmp_path):
    """transformers' OSError/ValueError and safetensors' header error came out as tracebacks."""
    for name, folder in broken_checkpoints(llava_dir, tmp_path).items():
        result = run("ask", photos["chelsea"], "--prompt", PROMPT, "--mllm", folder, "--via", "uncompressed")
        assert result.exit_code == 1, (name, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"comneck: error: {folder} is not a usable LLaVA checkpoint"), \
            (name, result.stderr)
        assert result.stdout == ""


def test_train_neck_refuses_a_broken_checkpoint_folder_in_one_line(llava_dir, codec_files, tmp_path):
    folders = broken_checkpoints(llava_dir, tmp_path)
    for name in ("no-config", "truncated"):
        out = tmp_path / f"{name}.safetensors"
        result = run("train", "neck", "--codec", "mbt2018-mean", "-q", "1", "--codec-weights",
                     codec_files["mbt2018-mean"], "--clip-from-mllm", folders[name], "--data", tmp_path,
                     "--crop", "64", "--steps", "0,0,1", "--no-register", "-o", out, "--quiet")
        assert result.exit_code == 1, (name, result.output)
        assert result.stderr.startswith(f"comneck: error: {folders[name]} is not a usable LLaVA checkpoint"), \
            (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


# ---------------------------------------------------------------- serve checks --mllm before it starts listening
def test_serve_refuses_a_wrong_mllm_before_it_starts(llava_dir, tmp_path, monkeypatch):
    """The MLLM loads at the first /v1/ask: a mistyped --mllm served /healthz happily and failed every /v1/ask."""
    pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'comneck[serve]')")
    from comneck_cli.serve import engines

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(engines, "run_local", started)
    for model in (tmp_path / "missing", broken_checkpoints(llava_dir, tmp_path)["no-config"]):
        result = run("serve", "--mllm", model, "--port", "0")
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("comneck: error: ") and str(model) in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- ask --via neck with no neck: which neck to train
def test_ask_without_a_neck_names_the_training_that_fits_the_model(llava_dir, photos, tmp_path):
    """The hint was `comneck train neck --codec ...` against open_clip's ViT-L-14, whose neck `ask` then refuses."""
    record = tmp_path / "photo.cnk"
    assert run("encode", photos["chelsea"], "-q", "3", "-o", record, "--quiet").exit_code == 0
    result = run("ask", record, "--prompt", PROMPT, "--mllm", llava_dir)
    assert result.exit_code == 1 and result.stdout == ""
    assert f"--clip-from-mllm {llava_dir}" in result.stderr, result.stderr
    assert "ViT-L-14" not in result.stderr and "--neck FILE" in result.stderr


# ---------------------------------------------------------------- eval --prompts: a bad prompt names the file
def test_eval_names_the_prompts_file_for_a_bad_prompt_before_any_point(llava_dir, photos, tmp_path):
    """A prompt of --prompts with two <image> placeholders was blamed on `--prompt` (eval's zero-shot CLIP prompt),
    after the log had been started."""
    from PIL import Image

    data = tmp_path / "data" / "cat"
    data.mkdir(parents=True)
    Image.open(photos["chelsea"]).convert("RGB").resize((64, 64)).save(data / "chelsea.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("what is this ?\n\n<image> <image> what\n")
    report = tmp_path / "report"
    result = run("eval", "--data", tmp_path / "data", "-o", report, "--methods", "jpeg", "--qualities", "3",
                 "--size", "64", "--mllm", llava_dir, "--prompts", prompts, "--quiet")
    assert result.exit_code == 2, result.output
    assert f"{prompts}, prompt 2: the prompt holds 2 image placeholders" in result.stderr, result.stderr
    assert "--prompt " not in result.stderr and not (report / "points.jsonl").exists()


# ---------------------------------------------------------------- a mistyped folder is not a hub id
def test_a_missing_mllm_folder_is_not_sent_to_hf_download(photos, tmp_path):
    """`--mllm ./llava` (a typo) said "download it with `hf download ./llava`", a command that cannot work."""
    for model, why in ((f".{tmp_path.anchor}missing", "does not exist"), (tmp_path / "missing", "does not exist"),
                       (photos["chelsea"], "is not a folder")):
        result = run("ask", photos["chelsea"], "--prompt", PROMPT, "--mllm", model, "--via", "uncompressed")
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr == f"comneck: error: MLLM folder {model} {why}; pass the folder a LLaVA checkpoint was " \
                                "saved in, or a hub id already in the Hugging Face cache\n"


def test_serve_keeps_transformers_progress_bars_off_its_log(llava_dir, monkeypatch):
    """`ask` silences transformers' "Loading weights" bar; `serve --mllm` printed it at the first /v1/ask."""
    pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'comneck[serve]')")
    from transformers.utils import logging

    from comneck_cli.serve import engines

    seen = []
    monkeypatch.setattr(engines, "run_local", lambda *args: seen.append(logging.is_progress_bar_enabled()))
    logging.enable_progress_bar()
    try:
        assert run("serve", "--mllm", llava_dir, "--port", "0").exit_code == 0
    finally:
        logging.disable_progress_bar()  # as `ask` leaves it, whatever the outcome
    assert seen == [False]
