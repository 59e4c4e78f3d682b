"""Issue #32 (items 1, 2, 3, 4, 7, 8, 10, 11): what a new user hit on a fresh clone, offline. One test per defect."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from comneck_cli.cli import main

from .conftest import TINY_CLIP
from .test_new_user import photo, run  # noqa: F401 (the 64×64 crop fixture; the CLI helper)

ROOT = Path(__file__).parent.parent
TINY_CONFIGS = Path(__file__).parent / "tiny_configs"
VBR = "mbt2018-mean-vbr"


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets past its option checks to where it imports torch and loads models."""
    from comneck_cli.cli import coding_commands, features_commands

    def started():
        raise AssertionError("the command went on to load models")

    for module in (coding_commands, features_commands):
        monkeypatch.setattr(module, "quiet_imports", started)


# --------------------------------------------------------------------------- 1: README's zoo file names
ZOO_FILE = re.compile(r"\b([a-z0-9]+(?:-[a-z0-9]+)*?)-(\d+)-([0-9a-f]{8})\.pth\.tar\b")


def test_every_zoo_file_the_docs_name_is_the_one_the_code_downloads():
    """`weights fetch CODEC-qQ` downloads compressai.zoo.image.model_urls[CODEC]["mse"][Q] (models.release.fetch_zoo):
    every zoo file name the README or a model card gives must be that table's, and an import line's registry name
    must be its codec and quality."""
    from compressai.zoo.image import model_urls

    docs = [ROOT / "README.md", *sorted((ROOT / "weights").glob("*.md"))]
    found = []
    for doc in docs:
        for line in doc.read_text(encoding="utf-8").splitlines():
            for match in ZOO_FILE.finditer(line):
                codec, quality, filename = match.group(1), int(match.group(2)), match.group(0)
                url = model_urls.get(codec, {}).get("mse", {}).get(quality)
                assert url is not None and url.rsplit("/", 1)[-1] == filename, (
                    f"{doc.name}: {filename} is not CompressAI's {codec} quality {quality} ({url})")
                imported = re.search(r"weights import (\S+) " + re.escape(filename), line)
                if imported:
                    assert imported.group(1) == f"{codec}-q{quality}", line
                found.append(filename)
    assert "mbt2018-mean-3-723404a8.pth.tar" in found  # the offline import example is checked, not skipped


# --------------------------------------------------------------------------- 2, 3: a neck trained on random CLIP
class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}:{record.name}:{record.getMessage()}")


@pytest.fixture(scope="module")
def random_clip_neck(tmp_path_factory, codec_files, tiny_clip_file):
    """`train neck --clip-tag none` (the only offline way the help offers) over the tiny variable-rate codec, run
    as a user runs it, with the tower the run distilled from kept to compare with; registered in its own home."""
    import comneck_cli.train.neck as trainer
    from tests.conftest import make_image_folder

    home = tmp_path_factory.mktemp("home")
    folder = tmp_path_factory.mktemp("neck")
    data = make_image_folder(folder / "data", side=64)
    towers, real_load = [], trainer.load_training_clip

    def keep(cfg, device):
        towers.append(real_load(cfg, device))
        return towers[-1]

    logs = _Lines()
    logging.getLogger().addHandler(logs)  # what open_clip's raw logging.warning(...) would print
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("COMNECK_HOME", str(home))
            mp.setattr(trainer, "load_training_clip", keep)
            result = CliRunner().invoke(main, [
                "train", "neck", "--codec", VBR, "--codec-weights", str(codec_files[VBR]), "--data", str(data),
                "--clip-config", str(TINY_CONFIGS), "--clip-model", TINY_CLIP, "--clip-tag", "none",
                "--steps", "2,1,1", "--batch-size", "3", "--crop", "64", "-o", str(folder / "neck.safetensors"),
                "--device", "cpu", "--workers", "0"])
    finally:
        logging.getLogger().removeHandler(logs)
    assert result.exit_code == 0, result.output
    return {"home": home, "neck": folder / "neck.safetensors", "tower": towers[0], "output": result.output,
            "logs": logs.lines}


def test_training_output_says_every_rate_and_leaks_no_library_log_lines(random_clip_neck, monkeypatch):
    out = random_clip_neck["output"]
    assert f"comneck: trained neck d1 for {VBR} (every rate):" in out
    assert "None" not in out
    assert not [line for line in random_clip_neck["logs"] if "pretrained" in line.lower()], random_clip_neck["logs"]
    monkeypatch.setenv("COMNECK_HOME", str(random_clip_neck["home"]))
    listed = run("weights", "list").stdout
    row = next(line for line in listed.splitlines() if line.startswith(f"{VBR}-neck\t"))
    assert "None" not in row and "clip_tag=none" in row and "lmbda" not in row and "quality" not in row, row
    assert '"family": null' in row  # nested values as JSON, as `weights list --json` gives them


def test_a_neck_trained_on_random_clip_gives_the_features_of_the_tower_it_was_trained_with(
        random_clip_neck, codec_files, photo, tmp_path, monkeypatch):
    """The neck records the seed its random tower was drawn from; `features` draws the same tower again, so the
    features are C'(T(y_hat)) with exactly the tower the neck was distilled against."""
    import torch

    from comneck_cli import coding as api
    from comneck_cli.features import FeatureExtractor
    from comneck_cli.formats import read_file
    from comneck_cli.models.neck import load_neck

    monkeypatch.setenv("COMNECK_HOME", str(random_clip_neck["home"]))
    neck, info = load_neck(random_clip_neck["neck"])
    assert (info.clip_tag, info.clip_seed) == ("none", 0)
    record_file = tmp_path / "photo.cnk"
    assert run("encode", photo, "--weights", codec_files[VBR], "-q", "2", "-o", record_file).exit_code == 0
    r = run("features", record_file, "--weights", codec_files[VBR], "-o", tmp_path / "f.pt")  # the registry's neck
    assert r.exit_code == 0, r.stderr
    got = torch.load(tmp_path / "f.pt", weights_only=True)
    assert got["metadata"]["clip_tag"] == "none"

    record = read_file(record_file)[0]
    y_hat = api.decode_latents(record, api.load_codec(VBR, 2, weights=codec_files[VBR]))
    trained = FeatureExtractor(clip=random_clip_neck["tower"], k=info.k, device=torch.device("cpu"), neck=neck,
                               info=info)
    assert torch.equal(got["features"][0], trained.from_latents([y_hat], -2, "patch")[0])


def test_a_neck_whose_random_tower_is_not_recorded_says_how_to_supply_it(
        random_clip_neck, codec_files, tiny_clip_file, photo, tmp_path):
    """A neck trained against random weights from a file (or an older file, which wrote the tag "None") cannot draw
    its tower again: one line says what it was trained with and how to give it; given, it works."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(random_clip_neck["neck"]), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    older = tmp_path / "older-neck.safetensors"
    save_file(tensors, str(older), metadata={**{k: v for k, v in meta.items() if k != "clip_seed"},
                                              "clip_tag": "None"})
    record_file = tmp_path / "photo.cnk"
    assert run("encode", photo, "--weights", codec_files[VBR], "-q", "2", "-o", record_file).exit_code == 0
    common = [record_file, "--weights", codec_files[VBR], "--neck", older]
    r = run("features", *common, "-o", tmp_path / "f.pt")
    assert r.exit_code == 1 and not (tmp_path / "f.pt").exists()
    assert r.stderr == (
        f"comneck: error: {record_file}: neck {older} was trained against CLIP {TINY_CLIP} with random weights "
        "(--clip-tag none) that it does not record; pass that tower's weights file as --clip-weights, or register "
        f"it once with `comneck weights import clip-{TINY_CLIP.lower()}-none FILE --kind clip`\n")
    r = run("features", *common, "--clip-weights", tiny_clip_file, "-o", tmp_path / "f.pt")
    assert r.exit_code == 0, r.stderr


def test_a_registered_random_clip_neck_does_not_break_an_image_codec_eval(random_clip_neck, photo, tmp_path,
                                                                         monkeypatch):
    """`eval --methods jpeg,webp` compares with the registered neck's CLIP: its random tower, drawn again."""
    monkeypatch.setenv("COMNECK_HOME", str(random_clip_neck["home"]))
    data = tmp_path / "data"
    data.mkdir()
    Image.open(photo).save(data / "a.png")
    r = run("eval", "--data", data, "-o", tmp_path / "report", "--methods", "jpeg,webp", "--qualities", "2",
            "--size", "64", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert "weights tag" not in r.stderr and "not measured" not in r.stderr, r.stderr
    report = json.loads((tmp_path / "report" / "points.json").read_text())
    assert (report["settings"]["clip_model"], report["settings"]["clip_tag"]) == (TINY_CLIP, "none")
    assert all(mean["feature_mse"] is not None for mean in report["means"])


# --------------------------------------------------------------------------- 4: usage errors before the work
@pytest.mark.parametrize("command,output,message", [
    ("features", "f.txt", "cannot write features to {out}: use a .pt, .safetensors, .npy file, or a folder"),
    ("features", "-", "cannot write features to {out}: use a .pt, .safetensors, .npy file, or a folder"),
    ("decode", "out.bmp", "cannot write images to {out}: use a .png, .jpg, .jpeg, .webp, .tif, .tiff file"),
])
def test_an_output_type_the_command_cannot_write_is_a_usage_error_before_any_model(command, output, message,
                                                                                  tmp_path, no_model):
    record = tmp_path / "photo.cnk"
    record.write_bytes(b"not read: the option is refused first")
    out = output if output == "-" else tmp_path / output
    r = run(command, record, "-o", out)
    assert r.exit_code == 2, r.stderr
    assert r.stderr.splitlines()[-1].startswith("Error: " + message.format(out=out)), r.stderr
    assert output == "-" or not Path(out).exists()


@pytest.mark.parametrize("args,what", [(["encode", "-", "-o", "-"], ".cnk records"), (["decode", "-"], "PNG images")])
def test_binary_output_to_a_terminal_is_a_usage_error(args, what, tmp_path):
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "comneck_cli", *args], stdin=subprocess.DEVNULL,
                              stdout=follower, stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, "COMNECK_HOME": str(tmp_path)})
    finally:
        os.close(follower)
        os.close(leader)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (f"Error: refusing to write {what} to a terminal; redirect stdout "
                                            "(> FILE or | COMMAND) or pass -o FILE")


# --------------------------------------------------------------------------- 10: the "no neck" error
@pytest.mark.parametrize("codec,quality,entry,train", [
    (VBR, 3, f"{VBR}-neck", f"`comneck train neck --codec {VBR}`"),
    ("mbt2018-mean", 1, "mbt2018-mean-q1-neck", "`comneck train neck --codec mbt2018-mean -q 1`"),
])
def test_no_neck_names_the_entry_it_looked_for_the_clip_it_needs_and_the_offline_route(
        codec, quality, entry, train, codec_files, photo, tmp_path):
    record = tmp_path / "photo.cnk"
    weights = codec_files[codec]
    assert run("encode", photo, "--codec", codec, "-q", quality, "--weights", weights, "-o", record).exit_code == 0
    r = run("features", record, "--weights", weights, "-o", tmp_path / "f.pt")
    assert r.exit_code == 1
    [line] = r.stderr.splitlines()
    assert f"no {entry};" in line and f"train one with {train}," in line
    assert "CLIP ViT-L-14's openai weights" in line and "comneck weights import clip-vit-l-14-openai FILE" in line
    assert "--clip-tag none" in line and "pass --neck FILE" in line
    assert ("quality" in line) == (codec != VBR), line  # one neck serves every rate of a variable-rate codec


# --------------------------------------------------------------------------- 11: one wording
def test_a_missing_input_is_said_the_same_way_by_every_command(tmp_path):
    for command in ("encode", "decode", "info", "features"):
        missing = tmp_path / f"missing.{'png' if command == 'encode' else 'cnk'}"
        args = ["-o", tmp_path / "f.pt"] if command == "features" else []
        r = run(command, missing, *args)
        assert r.exit_code == 1 and r.stderr == f"comneck: error: {missing}: no such file\n", (command, r.stderr)


@pytest.mark.parametrize("quality", ["0", "9", "-1"])
def test_a_quality_out_of_range_is_said_the_same_way_whichever_side(quality, photo, tmp_path, no_model):
    for command in (["encode", photo, "-o", tmp_path / "x.cnk"],
                    ["batch", "encode", "--input", photo.parent, "--output", tmp_path / "b"]):
        r = run(*command, "-q", quality)
        assert r.exit_code == 2, r.stderr
        assert r.stderr.splitlines()[-1] == f"Error: codec {VBR} has quality levels 1..8, not {quality}"


def test_codec_and_image_encoder_have_a_short_repr(codec_files):
    from comneck_cli import coding as api

    codec = api.load_codec(VBR, 3, weights=codec_files[VBR])
    for obj, name in ((codec, "Codec"), (codec.at_rate(3.4), "Codec"), (api.ImageEncoder.load(codec), "ImageEncoder"),
                      (api.ImageEncoder.load(codec, bpp_target=0.5), "ImageEncoder")):
        text = repr(obj)
        assert text.startswith(f"{name}(") and "\n" not in text and len(text) < 240, text
        assert VBR in text and codec.digest.hex() in text, text
    assert "rate=3.4" in repr(codec.at_rate(3.4)) and "bpp_target=0.5" in repr(api.ImageEncoder.load(codec,
                                                                                                  bpp_target=0.5))


# --------------------------------------------------------------------------- 7: one true reason in the eval report
def test_the_eval_report_gives_the_true_reason_and_names_the_files_it_skipped(photo, tmp_path):
    """Offline (no CLIP weights), one class folder and three loose photos: accuracy is missing because CLIP is, not
    for want of labels, and the three files left out are named, on stderr and in the report."""
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    Image.open(photo).save(data / "cat" / "a.png")
    for name in ("x.png", "y.png", "z.png"):
        Image.open(photo).save(data / name)
    r = run("eval", "--data", data, "-o", tmp_path / "report", "--methods", "jpeg,webp", "--qualities", "2",
            "--size", "64")
    assert r.exit_code == 0, r.stderr
    assert f"3 image(s) directly in {data} are not in a class folder and are not evaluated: x.png, y.png, z.png" \
        in r.stderr
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "class labels" not in summary and "zero-shot prompt" not in summary, summary
    assert "1 classes; zero-shot accuracy not measured, CLIP is not available (below)" in summary
    assert f"- not evaluated: 3 image(s) directly in `{data}`, outside the class folders: x.png, y.png, z.png" \
        in summary
    for title in ("feature MSE vs C(x)", "zero-shot top-1 accuracy"):
        section = summary.split(f"## {title}", 1)[1].split("##", 1)[0]
        assert "Not measured: CLIP is not available (see the CLIP line above)." in section, (title, section)


# --------------------------------------------------------------------------- 8: a sign of life on one long step
def _stderr_on_a_terminal(code: str, *args: str, env: dict) -> tuple[int, str]:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=follower, env=env)
    finally:
        os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout=120), b"".join(chunks).decode(errors="replace")


SLOW_DECODE = """import sys, time
import comneck_cli.coding.files as files
real = files.decode
def slow(*args):  # one record whose g_s takes seconds, as a 3000x2000 photo's does
    time.sleep(3.5)
    return real(*args)
files.decode = slow
from comneck_cli.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_a_single_long_decode_shows_a_spinner_with_the_elapsed_time_on_a_terminal(quiet, photo, codec_files,
                                                                                 tmp_path):
    record = tmp_path / "photo.cnk"
    weights = ["--weights", str(codec_files[VBR])]
    assert run("encode", photo, "-q", "2", *weights, "-o", record).exit_code == 0
    env = {**os.environ, "COMNECK_HOME": str(tmp_path / "home"), "COLUMNS": "120"}
    code, stderr = _stderr_on_a_terminal(SLOW_DECODE, "decode", str(record), *weights, "-o",
                                         str(tmp_path / "out.png"), *(["--quiet"] if quiet else []), env=env)
    assert code == 0 and (tmp_path / "out.png").is_file(), stderr
    if quiet:
        assert stderr == ""
    else:
        assert re.search(r"decoding.*0:00:0[1-4]", stderr), repr(stderr)
