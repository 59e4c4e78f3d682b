"""``comneck train neck --clip-from-mllm DIR`` (issue #29): a neck trained for a LLaVA checkpoint's own vision tower,
which ``comneck ask --via neck`` then takes, on the tiny random LLaVA of tests/mllm_fixtures.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from comneck_cli.cli import main
from tests.conftest import make_image_folder
from tests.mllm_fixtures import llava_dir  # noqa: F401 (a fixture)
from tests.mllm_fixtures import train_mllm_neck as _train

PROMPT = "what is this ?"


def test_neck_trained_for_the_mllm_tower_serves_ask(llava_dir, codec_files, photos, tmp_path):
    """A few distillation steps against the model's own tower (converted, read from its checkpoint): the neck
    records the tower as ``ask`` identifies it and the layer the model reads, and ``ask --via neck`` answers with
    it."""
    from comneck_cli import coding as api
    from comneck_cli import weights as registry
    from comneck_cli.codecs import load_codec
    from comneck_cli.formats import pack
    from comneck_cli.mllm import load_mllm
    from comneck_cli.models.neck import load_neck

    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "neck.safetensors"
    result = _train(llava_dir, data, codec_files["mbt2018-mean"], out, "--steps", "0,0,3")
    assert result.exit_code == 0, result.output
    _, info = load_neck(out)
    mllm = load_mllm(llava_dir)
    assert (info.clip_model, info.clip_tag) == mllm.tower_id
    assert info.clip_tag.startswith("mllm-") and info.clip_model == "hf-clip-w64-l4-p14-56"
    assert tuple(info.config["grid"]) == mllm.tower.grid and info.k == 2

    registry.import_file("mbt2018-mean-q1", codec_files["mbt2018-mean"], "codec")  # found by the record's digest
    codec = load_codec("mbt2018-mean", 1, weights=codec_files["mbt2018-mean"])
    image = np.asarray(Image.open(photos["rocket"]).convert("RGB").resize((64, 64)))
    record = tmp_path / "rocket.cnk"
    record.write_bytes(pack(api.encode(image, codec)))
    asked = CliRunner().invoke(main, ["ask", str(record), "--prompt", PROMPT, "--mllm", str(llava_dir), "--via",
                                      "neck", "--neck", str(out), "--max-new-tokens", "4"])
    assert asked.exit_code == 0, asked.output
    assert asked.stdout.strip() == mllm.ask([record], PROMPT, via="neck", neck=out, max_new_tokens=4)[0].answer


def test_cross_entropy_stages_and_other_towers_are_refused(llava_dir, codec_files, tmp_path):
    """The MLLM has no text tower: d1's cross-entropy stages must have no steps (one line, exit 1); naming another
    CLIP beside it is a usage error."""
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "neck.safetensors"
    result = _train(llava_dir, data, codec_files["mbt2018-mean"], out, "--steps", "2,0,3")
    assert result.exit_code == 1 and not out.exists()
    assert result.stderr == ("comneck: error: --clip-from-mllm trains by distillation alone: the MLLM has no CLIP "
                             "text tower for the cross-entropy of d1's stages 1 and 2; give them no steps (--steps "
                             "0,0,N)\n")
    usage = _train(llava_dir, data, codec_files["mbt2018-mean"], out, "--steps", "0,0,3", "--clip-tag", "openai")
    assert usage.exit_code == 2 and "--clip-from-mllm takes the tower from the MLLM" in usage.output
