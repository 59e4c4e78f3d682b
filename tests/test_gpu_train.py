"""Issue #34.3: training for the minutes a lent GPU has. ``minutes`` stops a run after a step, checkpoints and exports
it, and ``resume`` goes on to the planned length; benchmarks/gpu_train.py does one leg per loan and resumes its own
folder. Tiny codec, CPU path, a few steps."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from comneck_cli.train.codec import CodecTrainConfig, train_codec
from comneck_cli.train.loop import read_metrics
from tests.conftest import TINY_CODECS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_train  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from tests.conftest import skimage_photo

    folder = tmp_path_factory.mktemp("gpu-data")
    for name in ("chelsea.png", "coffee.png"):
        shutil.copy(skimage_photo(name), folder / name)
    return folder


def _config(data: Path, folder: Path, **extra) -> CodecTrainConfig:
    return CodecTrainConfig(codec="mbt2018-mean-vbr", config=TINY_CODECS["mbt2018-mean-vbr"], data=data, crop=64,
                            batch_size=2, output=folder / "codec.safetensors", register=None, quiet=True,
                            run_dir=folder / "run", device="cpu", workers=0, log_every=100, **extra)


def test_minutes_stop_checkpoint_export_and_resume(data, tmp_path):
    """Out of time after the first step: the checkpoint is at step 1 but keeps the planned 4, the exported file says
    1 step, and resuming trains steps 2..4 exactly like the run that was never stopped."""
    torch.set_num_threads(1)
    stopped = train_codec(_config(data, tmp_path / "a", steps=4, minutes=1e-6))
    assert stopped.steps == 1 and stopped.output.is_file()
    state = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (state["step"], state["total"]) == (1, 4)
    assert [row["step"] for row in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")] == [1]

    resumed = train_codec(CodecTrainConfig(resume=tmp_path / "a" / "run" / "checkpoint.pt", device="cpu", quiet=True,
                                           output=tmp_path / "a" / "codec.safetensors", register=None, workers=0))
    assert resumed.steps == 4
    whole = train_codec(_config(data, tmp_path / "b", steps=4))
    from safetensors.torch import load_file

    a, b = load_file(resumed.output), load_file(whole.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_script_refuses_before_training(data, tmp_path, capsys):
    assert gpu_train.main(["--minutes", "5", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                           "--device", "cpu"]) == 1
    assert "holds no images" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_train.main(["--minutes", "5", "--data", str(data), "--out", str(tmp_path / "o")]) == 1
        assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "o" / "run").exists()


def test_script_legs_add_up(data, tmp_path):
    """Two legs into one folder: the second resumes the first's checkpoint and ends at the planned length."""
    args = ["--data", str(data), "--out", str(tmp_path / "o"), "--device", "cpu", "--workers", "0", "--threads", "1",
            "--config", json.dumps(TINY_CODECS["mbt2018-mean-vbr"]), "--crop", "64", "--batch-size", "2",
            "--minutes", "5"]
    assert gpu_train.main([*args, "--steps", "2"]) == 0
    first = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (first["resumed_from_step"], first["step"]) == (0, 2)
    assert gpu_train.main([*args, "--steps", "3"]) == 0
    second = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (second["resumed_from_step"], second["step"]) == (2, 3)
    assert (tmp_path / "o" / "codec.safetensors").is_file() and second["sha256"] != first["sha256"]


def test_script_freeze_holds_across_legs(data, tmp_path):
    """A staged leg (``--freeze g_a``): the resumed leg takes the freeze from the checkpoint, so g_a is the same in
    both legs' files while the entropy model moved."""
    from safetensors.torch import load_file

    args = ["--data", str(data), "--out", str(tmp_path / "o"), "--device", "cpu", "--workers", "0", "--threads", "1",
            "--config", json.dumps(TINY_CODECS["mbt2018-mean-vbr"]), "--crop", "64", "--batch-size", "2",
            "--minutes", "5", "--lr", "1e-2"]
    assert gpu_train.main([*args, "--steps", "1", "--freeze", "g_a"]) == 0
    first = load_file(tmp_path / "o" / "codec.safetensors")
    assert gpu_train.main([*args, "--steps", "2"]) == 0
    second = load_file(tmp_path / "o" / "codec.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first if k.startswith("g_a."))
    assert not torch.equal(first["h_s.4.weight"], second["h_s.4.weight"])
